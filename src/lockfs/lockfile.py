"""The OFD lock that makes the lease exclusive across lockfs daemons and hosts.

Why OFD locks (fcntl F_OFD_SETLK): they belong to the open file description,
not the process, so they are neither dropped by an unrelated close() in the
daemon nor shared with forked children the way classic POSIX locks are, and
they conflict across hosts on filesystems that forward them (NFSv4,
GlusterFS). flock is never used: it does not cross hosts on most filesystems.

While locked, the file holds a one-line JSON record naming the holding daemon,
so that another mount can say who holds the directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"  # struct flock on x86_64/aarch64: type, whence, start, len, pid


def ofd_whole_file(fd: int, command: int, lock_type: int) -> int:
    """An OFD lock request over the whole file; returns the lock type the kernel answered."""
    request = struct.pack(_FLOCK, lock_type, os.SEEK_SET, 0, 0, 0)
    return struct.unpack(_FLOCK, fcntl.fcntl(fd, command, request))[0]


class LockfileError(Exception):
    """The lockfile cannot be used; the message names it and says why."""


class LockFile:
    """One OFD write lock over the whole lockfile, taken without blocking."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self.locked = False
        self.opens = 0  # how often the path was (re)opened: a check spans one open

    def open(self) -> None:
        """Open (creating if needed) and prove that OFD locks work on it.

        Raises:
            LockfileError: it cannot be created or opened, or the filesystem
                does not support OFD locks.
        """
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                               0o600)
        except OSError as exc:
            raise LockfileError(f"lockfile {self.path}: cannot open: {exc.strerror}") from None
        if os.path.isdir(self.path):
            self.close()
            raise LockfileError(f"lockfile {self.path}: is a directory")
        try:
            if self.try_lock():  # a real lock proves more than F_OFD_GETLK would
                self.unlock()
        except OSError as exc:
            self.close()
            raise LockfileError(
                f"lockfile {self.path}: the filesystem cannot take OFD locks "
                f"({exc.strerror}); lockfs refuses to run without them") from None

    def try_lock(self) -> bool:
        """Take the write lock; False when another open file description holds it.

        If the lockfile was removed or replaced in the backing store since it
        was opened, the path is opened again first: every daemon must lock
        the file that the path names now, or two could each hold "a" lock.
        """
        if not self._names_our_file():
            self._reopen()
        try:
            self.locked = self._set_write_lock()
        except OSError:
            # A network filesystem may leave the description unusable after it
            # dropped the lock (GlusterFS: EBADFD); a fresh one can lock again.
            self._reopen()
            self.locked = self._set_write_lock()
        return self.locked

    def _set_write_lock(self) -> bool:
        """F_OFD_SETLK; False when another description holds a conflicting lock."""
        try:
            self._fcntl(F_OFD_SETLK, fcntl.F_WRLCK)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _names_our_file(self) -> bool:
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(self._fd)
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)

    def _reopen(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.close(self._fd)
        self._fd = fd
        self.locked = False
        self.opens += 1

    def unlock(self) -> None:
        """Drop the lock. Raises OSError when the filesystem cannot (the lock is gone)."""
        if self.locked:
            self.locked = False
            self._fcntl(F_OFD_SETLK, fcntl.F_UNLCK)

    def held_elsewhere(self) -> bool:
        """Whether another open file description (another daemon) holds the lock now."""
        if self.locked or self._fd < 0:
            return False
        return ofd_whole_file(self._fd, F_OFD_GETLK, fcntl.F_WRLCK) != fcntl.F_UNLCK

    def still_locked(self) -> bool:
        """Whether our lock still stands, as another open file description sees it.

        Two ways to lose it without being told: the lockfile was removed or
        replaced in the backing store (a new daemon would lock the new file),
        or a network filesystem dropped the lock (lease expiry, server reboot).
        A second description of the path must see our lock as a conflict.
        """
        if not self.locked:
            return False
        if not self._names_our_file():
            return False
        try:
            probe = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            answer = ofd_whole_file(probe, F_OFD_GETLK, fcntl.F_WRLCK)
        except OSError:
            return False
        finally:
            os.close(probe)  # closing another description never drops an OFD lock
        return answer != fcntl.F_UNLCK

    def write_record(self, record: dict[str, object]) -> None:
        """Replace the file's content with ``record`` (only while locked)."""
        data = json.dumps(record, sort_keys=True).encode() + b"\n"
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def read_record(self) -> dict[str, object] | None:
        """The record written by the current or last holder, if readable."""
        try:
            data = os.pread(self._fd, 4096, 0)
            record = json.loads(data) if data.strip() else None
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the description drops the OFD lock
            self._fd = -1
            self.locked = False

    def _fcntl(self, command: int, lock_type: int) -> int:
        return ofd_whole_file(self._fd, command, lock_type)
