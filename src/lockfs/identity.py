"""Who is calling: a request's pid mapped to its process and mount namespace.

The request's pid is a thread id as the daemon's PID namespace sees it (0 when
the caller is not visible there). A client is the caller's mount namespace,
named by the (st_dev, st_ino) of /proc/<tid>/ns/mnt.

Why a cache: reading /proc costs three system calls, and open is the hot path.
Why it is safe: each cached thread id keeps a pidfd of that very thread; a hit
is trusted only while that pidfd is not readable, i.e. the thread has not
exited, so a recycled thread id never inherits a stale identity.

Concurrency: called on the trio thread only; never awaits.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import OrderedDict

from lockfs.lease import Caller, Client

PIDFD_THREAD = os.O_EXCL  # linux/pidfd.h: a pidfd for one thread (kernel 6.9+)
CACHE_SIZE = 4096


class UnknownCaller(Exception):
    """The caller's identity cannot be established; the request must be refused."""


class Identities:
    """Resolves request pids to Callers, with an exit-checked cache."""

    def __init__(self, proc: str = "/proc", cache_size: int = CACHE_SIZE) -> None:
        self._proc = proc
        self._cache_size = cache_size
        self._cache: OrderedDict[int, tuple[Caller, int]] = OrderedDict()
        self._thread_pidfds = True

    def resolve(self, pid: int) -> Caller:
        """The Caller behind request pid ``pid``.

        Raises:
            UnknownCaller: pid 0 (not visible from the daemon's PID namespace),
                a process that vanished, or /proc entries that cannot be read.
        """
        if pid <= 0:
            raise UnknownCaller("pid 0: the caller is in a PID namespace the daemon cannot see")
        cached = self._cache.get(pid)
        if cached is not None:
            caller, pidfd = cached
            if not _has_exited(pidfd):
                return caller
            self._evict(pid)
        return self._resolve_fresh(pid)

    def forget_all(self) -> None:
        for pid in list(self._cache):
            self._evict(pid)

    def __len__(self) -> int:
        return len(self._cache)

    # ----------------------------------------------------------- internals

    def _resolve_fresh(self, pid: int) -> Caller:
        pidfd = self._open_pidfd(pid)
        try:
            caller = self._read_proc(pid)
            if pidfd is not None and _has_exited(pidfd):
                raise UnknownCaller(f"pid {pid} exited while it was being identified")
        except BaseException:
            if pidfd is not None:
                os.close(pidfd)
            raise
        if pidfd is not None:
            self._cache[pid] = (caller, pidfd)
            if len(self._cache) > self._cache_size:
                self._evict(next(iter(self._cache)))
        return caller

    def _open_pidfd(self, pid: int) -> int | None:
        """A pidfd of thread ``pid``, or None where the kernel cannot give one."""
        try:
            if self._thread_pidfds:
                return os.pidfd_open(pid, PIDFD_THREAD)
            return os.pidfd_open(pid, 0)
        except OSError as exc:
            if exc.errno == errno.EINVAL and self._thread_pidfds:
                self._thread_pidfds = False  # kernel before 6.9
                return self._open_pidfd(pid)
            if exc.errno == errno.ESRCH:
                raise UnknownCaller(f"pid {pid} vanished before it could be identified") from None
            if exc.errno == errno.ENOENT:
                return None  # not a thread-group leader and no PIDFD_THREAD: do not cache
            raise UnknownCaller(f"pid {pid}: pidfd_open failed: {exc.strerror}") from None

    def _read_proc(self, pid: int) -> Caller:
        base = f"{self._proc}/{pid}"
        try:
            ns = os.stat(f"{base}/ns/mnt")
            with open(f"{base}/status", "rb") as status:
                lines = status.read()
            tgid = _field(lines, b"Tgid:")
            kernel = _field(lines, b"Kthread:") == 1
            with open(f"{base}/comm", "rb") as comm:
                command = comm.read().rstrip(b"\n").decode(errors="replace")
        except FileNotFoundError:
            raise UnknownCaller(f"pid {pid} vanished before it could be identified") from None
        except OSError as exc:
            raise UnknownCaller(f"pid {pid}: cannot read {base}: {exc.strerror}") from None
        if tgid is None:
            raise UnknownCaller(f"pid {pid}: no Tgid in {base}/status")
        return Caller(pid, tgid, command, Client(ns.st_dev, ns.st_ino), kernel)

    def _evict(self, pid: int) -> None:
        entry = self._cache.pop(pid, None)
        if entry is not None:
            os.close(entry[1])


def _field(status: bytes, name: bytes, base: int = 10) -> int | None:
    for line in status.splitlines():
        if line.startswith(name):
            return int(line[len(name):].strip(), base)
    return None


def has_capability(pid: int, capability: int, proc: str = "/proc") -> bool:
    """Whether thread ``pid`` has ``capability`` in its effective set (False if unknown).

    Read at each call, never cached with the identity: a process may drop
    capabilities during its life.
    """
    try:
        with open(f"{proc}/{pid}/status", "rb") as status:
            effective = _field(status.read(), b"CapEff:", 16)
    except (OSError, ValueError):
        return False
    return effective is not None and bool(effective >> capability & 1)


def _has_exited(pidfd: int) -> bool:
    """Whether the thread behind ``pidfd`` is gone (reaped), so its id may be reused.

    Signal 0 is one system call and no allocation (a poll object costs more on
    this hot path). A zombie still counts as present, which is safe: its id
    cannot be given to another thread before it is reaped.
    """
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return True  # anything else: do not trust the cached identity
    return False
