"""The three targets of the benchmark and the helpers that run things on them.

native: the backing directory itself. lockfs: ``lockfs mount SRC DST`` with
default options (allow_other, default_permissions, nosuid, nodev, hold=process).
bindfs: Debian's bindfs mounted the same way, SRC -> DST, with the same
semantics: ``bindfs -f -o default_permissions,nosuid,nodev SRC DST`` (as root
bindfs adds allow_other by itself and runs single-threaded, like lockfs's one
trio thread; -f keeps it in the foreground so we know its pid).

Every mount made here is unmounted by ``Target.unmount`` (called from a
finally in run.py), lazily and with a kill of the daemon if a plain umount
fails, so an error never leaves a mount behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lockfs.cli import process_alive

BENCH_DIR = Path(__file__).resolve().parent
WORKER = BENCH_DIR / "worker.py"
BINDFS_OPTIONS = "default_permissions,nosuid,nodev"


def log(message: str) -> None:
    """Progress on stderr, with the time, so a long run can be followed."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(argv: list[str], *, timeout: float = 3600, check: bool = True,
        env: dict[str, str] | None = None, cwd: str | None = None) -> str:
    """Run a command to completion; its stdout, or an error with its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                            cwd=cwd, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: "
                           f"{result.stderr.strip()[-2000:]}")
    return result.stdout


def worker(*args: object, timeout: float = 3600, prefix: tuple[str, ...] = ()) -> dict:
    """Run one worker.py command in a child process and parse its JSON line."""
    out = run([*prefix, sys.executable, str(WORKER), *map(str, args)], timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def drop_caches(level: int) -> None:
    """sync, then drop the page cache (1), dentries and inodes (2) or both (3)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write(f"{level}\n")


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Target:
    """One place a workload runs: ``path``; ``backing`` is the directory behind it."""

    name: str
    path: Path
    backing: Path
    lockfs_env: dict[str, str] | None = None
    daemon_pid: int | None = None
    log_file: Path | None = None
    _bindfs: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def is_fuse(self) -> bool:
        return self.name != "native"

    def mount(self) -> None:
        """Create the directories and mount (nothing to mount for native)."""
        self.backing.mkdir(parents=True, exist_ok=True)
        os.chmod(self.backing, 0o755)
        if self.name == "native":
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if self.name == "lockfs":
            self.log_file = self.path.with_name(self.path.name + ".log")
            run([sys.executable, "-m", "lockfs", "mount", str(self.backing), str(self.path),
                 "--log-file", str(self.log_file)], env=self.lockfs_env, timeout=120)
            self.daemon_pid = lockfs_status(self.path)["daemon_pid"]
        elif self.name == "bindfs":
            self._bindfs = subprocess.Popen(
                ["bindfs", "-f", "-o", BINDFS_OPTIONS, str(self.backing), str(self.path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.daemon_pid = self._bindfs.pid
            deadline = time.monotonic() + 30
            while not is_mounted(self.path):
                if self._bindfs.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bindfs did not mount {self.path}")
                time.sleep(0.01)
        else:
            raise ValueError(self.name)

    def unmount(self) -> None:
        """Unmount and make sure the daemon is gone; safe to call twice."""
        if self.name == "native":
            return
        if is_mounted(self.path):
            if self.name == "lockfs":
                run([sys.executable, "-m", "lockfs", "unmount", str(self.path)], check=False,
                    env=self.lockfs_env, timeout=60)
            else:
                run(["umount", str(self.path)], check=False, timeout=60)
        if is_mounted(self.path):
            log(f"{self.path} is busy: lazy unmount")
            run(["umount", "-l", str(self.path)], check=False, timeout=60)
        pid = self.daemon_pid
        if pid is not None:
            deadline = time.monotonic() + 10
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if process_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._bindfs is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._bindfs.wait(timeout=10)
            self._bindfs = None
        self.daemon_pid = None


def lockfs_status(path: Path, env: dict[str, str] | None = None) -> dict:
    """``lockfs status --json``: reads an xattr of the root, which takes no lease."""
    return json.loads(run([sys.executable, "-m", "lockfs", "status", "--json", str(path)],
                          env=env, timeout=30))


def wait_lease_free(target: Target, timeout: float = 30.0) -> None:
    """Before a step runs in another mount namespace, the host must hold nothing."""
    if target.name != "lockfs":
        return
    deadline = time.monotonic() + timeout
    while True:
        status = lockfs_status(target.path, target.lockfs_env)
        if status["state"] == "free":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"lease on {target.path} still held: {status}")
        time.sleep(0.05)
