"""Real PostgreSQL servers for the tests: Debian's binaries, run as ``postgres``.

A postmaster runs the way a container runs it: in its own PID, IPC, network and
mount namespaces (``unshare --ipc --net --pid --fork --kill-child --mount-proc``),
so that ``postmaster.pid`` cannot protect the data directory and only lockfs can.
Sockets live in a temporary directory (no TCP). The pytest process never opens
anything through a mount: initdb, postmasters and ``pg_ctl`` run as children in
namespaces of their own, and psql/pgbench talk to the server over its socket.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount, child_of, require, wait_for

AS_POSTGRES = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
CONTAINER = ["unshare", "--ipc", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
READY = "ready to accept connections"
EBUSY_TEXT = "Device or resource busy"


def pg_bin(name: str) -> str:
    """The newest installed PostgreSQL's ``name`` binary; fails the test when missing."""
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name), reverse=True):
        path = os.path.join(bindir, name)
        if os.access(path, os.X_OK):
            return path
    pytest.fail(f"this test needs PostgreSQL's '{name}' (Debian package postgresql), "
                "found under no /usr/lib/postgresql/*/bin")


def postgres_ids() -> tuple[int, int]:
    """uid and gid of the host's ``postgres`` user."""
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("this test needs the 'postgres' user (Debian package postgresql)")
    return entry.pw_uid, entry.pw_gid


def owned_dir(path: Path, mode: int = 0o700) -> Path:
    """Create ``path`` (directly on the host, never through a mount) owned by postgres."""
    uid, gid = postgres_ids()
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


def initdb(datadir: Path) -> subprocess.CompletedProcess:
    """initdb as postgres in a new mount namespace (a client of its own, gone when done)."""
    for tool in ("unshare", "setpriv"):
        require(tool)
    return subprocess.run(
        ["unshare", "-m", *AS_POSTGRES, pg_bin("initdb"), "-D", str(datadir),
         "--no-locale", "-E", "UTF8", "-A", "trust"],
        capture_output=True, text=True, timeout=120, check=False)


def in_new_namespace_as_postgres(*command: str) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool as postgres from a mount namespace of its own."""
    return subprocess.run(["unshare", "-m", *AS_POSTGRES, *command], capture_output=True,
                          text=True, timeout=60, check=False)


class Postmaster:
    """One postmaster in its own namespaces; its output goes to ``log`` on the host."""

    def __init__(self, datadir: Path, sockdir: Path, log: Path, *settings: str) -> None:
        self.datadir = datadir
        self.sockdir = sockdir
        self.log = log
        command = [*CONTAINER, *AS_POSTGRES, pg_bin("postgres"), "-D", str(datadir),
                   "-k", str(sockdir), "-c", "listen_addresses="]
        for setting in settings:
            command += ["-c", setting]
        with open(log, "wb") as output:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                            stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def inner_pid(self) -> int:
        """The postmaster's pid as the host sees it (PID 1 of its namespace)."""
        return child_of(self.process.pid)

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait for "ready to accept connections"; fail with the log if it exited first."""
        def ready() -> bool:
            if READY in self.log_text():
                return True
            if self.process.poll() is not None:
                pytest.fail(f"postmaster exited ({self.process.returncode}) before it was "
                            f"ready:\n{self.log_text()}")
            return False
        wait_for(ready, timeout, f"postmaster on {self.datadir} to be ready")

    def wait_exit(self, timeout: float = 60) -> int:
        """Wait until the namespace is gone; its exit status."""
        wait_for(lambda: self.process.poll() is not None, timeout,
                 f"postmaster on {self.datadir} to exit")
        return int(self.process.returncode)

    def stop(self, timeout: float = 60) -> int:
        """Fast shutdown: SIGINT to the postmaster itself (pg_ctl cannot, see NOTES.md)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.inner_pid(), signal.SIGINT)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """Cleanup: fast shutdown, then SIGKILL (``--kill-child`` takes the namespace)."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            pid = self.inner_pid()
            os.kill(pid, signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def psql(self, query: str) -> str:
        """Run ``query`` over the socket; its unaligned, tuples-only output."""
        return psql(self.sockdir, query)

    def pgbench(self, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [pg_bin("pgbench"), "-h", str(self.sockdir), "-U", "postgres", *args, "postgres"],
            capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, f"pgbench {args} failed: {result.stderr}"
        return result


class PgEnv:
    """Directories postgres can reach, lockfs mounts in them, postmasters; all cleaned up.

    pytest's tmp_path is mode 0700 under root, which postgres cannot traverse, so the
    mounts and socket directories live in a 0755 directory of their own in /tmp.
    """

    def __init__(self, mount_factory: Callable[..., Mount]) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="lockfs-pg-", dir="/tmp"))
        self.base.chmod(0o755)
        self._mount_factory = mount_factory
        self.mounts: list[Mount] = []
        self.postmasters: list[Postmaster] = []
        self._count = 0

    def mount(self, *options: str, src: Path | None = None) -> Mount:
        """A lockfs mount whose DST root is a fresh data directory for postgres."""
        self._count += 1
        if src is None:
            src = owned_dir(self.base / f"src{self._count}")
        dst = self.base / f"dst{self._count}"
        dst.mkdir()
        mount = self._mount_factory(src, *options, dst=dst)
        self.mounts.append(mount)
        return mount

    def sockdir(self, name: str) -> Path:
        return owned_dir(self.base / f"sock-{name}", 0o755)

    def postmaster(self, datadir: Path, name: str, *settings: str) -> Postmaster:
        server = Postmaster(datadir, self.sockdir(name), self.base / f"{name}.log", *settings)
        self.postmasters.append(server)
        return server

    def close(self) -> None:
        for server in self.postmasters:
            server.kill()
        for mount in self.mounts:
            mount.teardown()
        if not any(mount.is_mounted() for mount in self.mounts):
            shutil.rmtree(self.base, ignore_errors=True)


def psql(sockdir: Path, query: str) -> str:
    """Run ``query`` against the server listening in ``sockdir``; tuples-only output."""
    result = subprocess.run(
        [pg_bin("psql"), "-X", "-h", str(sockdir), "-U", "postgres", "-d", "postgres",
         "-v", "ON_ERROR_STOP=1", "-Atc", query],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"psql {query!r} via {sockdir} failed: {result.stderr}"
    return result.stdout.strip()
