"""Child-process workloads of the benchmark: every access to a mount happens here.

Why a separate process: in lockfs's default hold mode a process that opens or
changes anything through the mount becomes (part of) the lease holder for as
long as it lives. The orchestrator (run.py) therefore never touches a mount
itself; it runs this script, which exits when its step is done.

Each command prints one JSON object on stdout (the handover commands print
one line per event instead).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time


def _name(index: int) -> str:
    return f"f{index:06d}"


def metadata(directory: str, count: int) -> dict[str, float]:
    """Create, stat, list, rename and unlink ``count`` small files; ops/s per phase."""
    os.mkdir(directory)
    payload = b"x" * 100
    rates: dict[str, float] = {}
    start = time.perf_counter()
    for index in range(count):
        fd = os.open(os.path.join(directory, _name(index)),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    rates["create"] = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for index in range(count):
        os.stat(os.path.join(directory, _name(index)))
    rates["stat"] = count / (time.perf_counter() - start)
    listings = 3
    start = time.perf_counter()
    for _ in range(listings):
        names = os.listdir(directory)
        if len(names) != count:
            raise RuntimeError(f"listing found {len(names)} of {count} entries")
    rates["list"] = listings * count / (time.perf_counter() - start)
    start = time.perf_counter()
    for index in range(count):
        os.rename(os.path.join(directory, _name(index)),
                  os.path.join(directory, "r" + _name(index)))
    rates["rename"] = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for index in range(count):
        os.unlink(os.path.join(directory, "r" + _name(index)))
    rates["unlink"] = count / (time.perf_counter() - start)
    os.rmdir(directory)
    return rates


def make_files(directory: str, count: int, size: int) -> dict[str, float]:
    """Create ``count`` files of ``size`` bytes (set-up, not measured)."""
    os.makedirs(directory, exist_ok=True)
    payload = b"y" * size
    for index in range(count):
        with open(os.path.join(directory, _name(index)), "wb") as handle:
            handle.write(payload)
    return {"files": count}


def open_close(directory: str, count: int, start_at: float, seconds: float) -> dict[str, float]:
    """Open and close existing files in a loop from ``start_at`` (CLOCK_MONOTONIC) on."""
    paths = [os.path.join(directory, _name(index)) for index in range(count)]
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    end = start_at + seconds
    done = 0
    while True:
        for path in paths:
            os.close(os.open(path, os.O_RDONLY))
        done += len(paths)
        now = time.monotonic()
        if now >= end:
            break
    return {"ops": done, "seconds": now - start_at}


def stat_walk(root: str, dirs: int, per_dir: int) -> dict[str, float]:
    """stat every file of the tree that run.py laid out (by name: no readdir)."""
    start = time.perf_counter()
    for d in range(dirs):
        base = os.path.join(root, f"d{d:04d}")
        for index in range(per_dir):
            os.stat(os.path.join(base, _name(index)))
    return {"files": dirs * per_dir, "seconds": time.perf_counter() - start}


def hold(path: str) -> None:
    """Handover holder: open, say so, wait for a line, print the exit time, exit."""
    fd = os.open(path, os.O_RDONLY)
    print("held", flush=True)
    sys.stdin.readline()
    os.write(1, f"{time.monotonic():.9f}\n".encode())
    del fd  # closed by the exit below, as a real holder's last process would
    os._exit(0)


def wait(path: str, timeout: float) -> None:
    """Handover waiter: retry open on EBUSY; print the monotonic time of success."""
    said = False
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            if not said:
                print("waiting", flush=True)
                said = True
            time.sleep(0.0002)
            continue
        now = time.monotonic()
        os.close(fd)
        if not said:
            print("not-refused", flush=True)
        print(f"{now:.9f}", flush=True)
        return


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "metadata":
        result = metadata(args[0], int(args[1]))
    elif command == "mkfiles":
        result = make_files(args[0], int(args[1]), int(args[2]))
    elif command == "openclose":
        result = open_close(args[0], int(args[1]), float(args[2]), float(args[3]))
    elif command == "statwalk":
        result = stat_walk(args[0], int(args[1]), int(args[2]))
    elif command == "hold":
        hold(args[0])
        return
    elif command == "wait":
        wait(args[0], float(args[1]))
        return
    else:
        raise SystemExit(f"unknown command {command}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
