"""A test client: one process, run in a namespace of its own, driven over stdin/stdout.

Each input line is a JSON list ``[op, *args]``; each output line is JSON
``{"ok": result}`` or ``{"errno": n, "error": "..."}``. Tests use it to hold a
file open in one mount namespace while another namespace tries its luck, with
no sleeps: every answer comes back only after the system call returned.
"""

from __future__ import annotations

import json
import os
import sys

FLAGS = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT, "rw": os.O_RDWR | os.O_CREAT,
         "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT}
fds: dict[int, int] = {}
children: list[int] = []


def handle(op: str, *args: object) -> object:  # one branch per op
    if op == "pid":
        return os.getpid()
    if op == "open":
        path, mode = args
        fd = os.open(path, FLAGS[mode], 0o644)
        fds[fd] = fd
        return fd
    if op == "close":
        os.close(fds.pop(args[0]))
        return None
    if op == "write":
        return os.write(args[0], str(args[1]).encode())
    if op == "fsync":
        os.fsync(args[0])
        return None
    if op == "read":
        return os.pread(args[0], 1 << 20, 0).decode(errors="replace")
    if op == "mkdir":
        os.mkdir(args[0])
        return None
    if op == "unlink":
        os.unlink(args[0])
        return None
    if op == "rename":
        os.rename(args[0], args[1])
        return None
    if op == "chmod":
        os.chmod(args[0], args[1])
        return None
    if op == "truncate":
        os.truncate(args[0], args[1])
        return None
    if op == "stat":
        return os.stat(args[0]).st_size
    if op == "listdir":
        return sorted(os.listdir(args[0]))
    if op == "fork_open":
        # A child process of this client opens, closes and keeps living.
        path = args[0]
        pid = os.fork()
        if pid == 0:
            os.close(os.open(path, os.O_RDONLY))
            os.execvp("sleep", ["sleep", "600"])
        children.append(pid)
        return pid
    raise ValueError(f"unknown op {op}")


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": handle(*request)}
        except OSError as exc:
            reply = {"errno": exc.errno, "error": exc.strerror}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
