"""Shared fixtures: real lockfs mounts that are always unmounted, and namespaced clients.

Rules for tests (NOTES.md): the pytest process must never become the lease
holder, so it only stats and lists through the mount; everything that opens
or changes files through the mount runs in a child process (``run_in_ns``) or
an ``Agent`` in its own mount namespace. Tools a test needs are required, not
optional: a missing one fails the test with a clear message (never a skip).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lockfs.cli import process_alive

LOCKFS = [sys.executable, "-m", "lockfs"]
AGENT = Path(__file__).with_name("agent.py")


def require(tool: str) -> str:
    """The path of ``tool``; fails the test loudly when the machine lacks it."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"this test needs '{tool}', which is not installed (see .ci/run)")
    return path


def wait_for(predicate: Callable[[], object], timeout: float = 10.0,
             what: str = "condition") -> object:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def lockfs(*args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the lockfs command line."""
    return subprocess.run([*LOCKFS, *args], capture_output=True, text=True, check=check,
                          timeout=timeout)


def child_of(pid: int) -> int:
    """The first child of ``pid`` (the process ``unshare --fork`` started)."""
    def child() -> int:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as children:
                pids = children.read().split()
        except OSError:
            return 0
        return int(pids[0]) if pids else 0
    return int(wait_for(child, 10, f"a child of {pid}"))  # type: ignore[arg-type]


class Mount:
    """A running lockfs mount of ``src`` at ``dst``, logging to ``log``."""

    def __init__(self, src: Path, dst: Path, log: Path) -> None:
        self.src = src
        self.dst = dst
        self.log = log
        self.daemon_pid = self.status()["daemon_pid"]

    def status(self) -> dict:
        result = lockfs("status", "--json", str(self.dst))
        if result.returncode != 0:
            raise AssertionError(f"lockfs status failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def is_mounted(self) -> bool:
        return _mounted(self.dst)

    def teardown(self) -> None:
        """Unmount (lazily if busy) and make sure the daemon is gone."""
        if _mounted(self.dst):
            subprocess.run(["umount", str(self.dst)], capture_output=True, check=False)
        if _mounted(self.dst):
            subprocess.run(["umount", "-l", str(self.dst)], capture_output=True, check=False)
        if process_alive(self.daemon_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.daemon_pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while process_alive(self.daemon_pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if process_alive(self.daemon_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.daemon_pid, signal.SIGKILL)


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Mount lockfs filesystems; every one is unmounted at the end of the test."""
    mounts: list[Mount] = []
    counter = iter(range(1000))

    def make(src: Path | None = None, *options: str, dst: Path | None = None) -> Mount:
        index = next(counter)
        if src is None:
            src = tmp_path / f"src{index}"
            src.mkdir()
        if dst is None:
            dst = tmp_path / f"dst{index}"
            dst.mkdir()
        log = tmp_path / f"lockfs{index}.log"
        result = lockfs("mount", str(src), str(dst), "--log-file", str(log), *options)
        if result.returncode != 0:
            raise AssertionError(f"lockfs mount failed ({result.returncode}): "
                                 f"{result.stderr.strip()}")
        mount = Mount(src, dst, log)
        mounts.append(mount)
        return mount

    yield make
    for mount in reversed(mounts):
        mount.teardown()


@pytest.fixture
def mounted(mount_factory: Callable[..., Mount]) -> Mount:
    """One lockfs mount with default options over an empty SRC."""
    return mount_factory()


def run_in_ns(script: str, *, cwd: Path | None = None, user: str | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a shell script in a new mount namespace (a new lockfs client), to completion."""
    command = ["unshare", "-m", "sh", "-c", script]
    if user is not None:
        command = ["unshare", "-m", "setpriv", f"--reuid={user}", f"--regid={user}",
                   "--init-groups", "sh", "-c", script]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          check=False)


class Agent:
    """A long-lived client in its own mount namespace (see agent.py)."""

    def __init__(self, *prefix: str) -> None:
        self.process = subprocess.Popen(
            [*prefix, "unshare", "-m", sys.executable, str(AGENT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.call("pid")

    def call(self, op: str, *args: object) -> object:
        """Run one operation; raise OSError with the errno the client saw."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps([op, *args]) + "\n")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"agent {self.process.pid} died during {op}")
        reply = json.loads(line)
        if "errno" in reply:
            raise OSError(reply["errno"], reply["error"])
        return reply["ok"]

    def errno_of(self, op: str, *args: object) -> int:
        """The errno ``op`` failed with, 0 if it succeeded."""
        try:
            self.call(op, *args)
        except OSError as exc:
            return exc.errno or -1
        return 0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)

    def exit(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            self.process.stdin.close()
            self.process.wait(timeout=10)


@pytest.fixture
def agents() -> Iterator[Callable[..., Agent]]:
    """Start Agents; all are killed at the end of the test."""
    started: list[Agent] = []

    def start(*prefix: str) -> Agent:
        agent = Agent(*prefix)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="lockfs-pub-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mount_with_reference(public_dir: Path, mount_factory: Callable[..., Mount],
                         *options: str) -> tuple[Mount, Path]:
    """A mount of public_dir/src and a plain reference directory public_dir/ref."""
    src, dst, ref = public_dir / "src", public_dir / "dst", public_dir / "ref"
    for path in (src, dst, ref):
        path.mkdir()
        path.chmod(0o755)
    return mount_factory(src, *options, dst=dst), ref


@pytest.fixture
def pair(public_dir: Path, mount_factory: Callable[..., Mount]) -> tuple[Mount, Path]:
    """A mount with default options and its plain reference directory."""
    return mount_with_reference(public_dir, mount_factory)
