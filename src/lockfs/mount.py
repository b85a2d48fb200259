"""Mount: validate, detach, serve, and report readiness only once the mount answers.

Order matters:
1. Every check that can fail with a clear line runs first, in the caller's
   process, so errors land on the user's terminal.
2. Without --foreground the process forks; the parent waits on a pipe for the
   child's "ready" or its one-line error and exits with the matching code.
3. The child opens the lockfile *after* the fork: an OFD lock lives as long as
   any descriptor of its open file description, and a parent holding a copy
   would keep the lock alive after the daemon died.
4. "ready" (and systemd's READY=1) is sent once a stat of DST, made from a
   worker thread, has been answered by this very daemon.
SIGTERM, SIGINT and SIGHUP end the FUSE loop; the mount is then unmounted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import resource
import select
import signal
import socket
import sys
from collections.abc import Iterator

import pyfuse3
import trio

from lockfs.checks import (
    check_fuse_device,
    check_mountpoint,
    check_not_nested,
    check_source,
)
from lockfs.errors import (
    BadPathError,
    FuseUnavailableError,
    LockfileUnusableError,
    LockfsError,
)
from lockfs.guard import Guard, MountInfo
from lockfs.identity import Identities
from lockfs.inodes import InodeTable
from lockfs.lease import Lease
from lockfs.lockfile import F_OFD_SETLK, LockFile, LockfileError, ofd_whole_file
from lockfs.logsetup import setup_logging
from lockfs.ops import Operations
from lockfs.options import DEFAULT_LOCKFILE_NAME, MountOptions

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
# Caching (see docs/how-it-works.md): while this mount serves, only its holder
# writes, and every change made through the mount updates the kernel's caches
# for that inode itself, so entries and attributes may be cached. The timeouts
# stay short so that a change made directly in SRC (not supported, but it
# happens) is seen within a second; with the writeback cache, not even then
# for the size and mtime of a regular file the kernel knows (it trusts its own
# values; measured on 6.18). What another lockfs mount of SRC changed is
# handled exactly: the guard retires every cached inode (how-it-works.md).
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0
KEEP_CACHE = True  # page cache kept across opens; dropped after another mount held SRC
# Off: with the writeback cache a write to a full (or size-limited) SRC
# succeeds into the page cache and ENOSPC/EFBIG surface only at fsync or close,
# with a file size through DST that SRC never had. PostgreSQL handles ENOSPC
# from write() (relation extension) but PANICs on a failed fsync, so the speed
# it buys (NOTES.md: 1 MiB writes 0.8 instead of 0.5 of native) is not worth it.
# tests/test_passthrough.py::test_a_full_disk_fails_the_write_as_on_the_backing_store
# "-o writeback_cache" turns it on for workloads of many small writes that can
# live with errors reported at fsync/close.
READ_AHEAD_KB = 1024  # FUSE's default is 128: four times fewer round trips per MiB read


def run_mount(options: MountOptions) -> int:
    """Mount as asked; returns the exit status for the command line."""
    source = check_source(options.source)
    check_fuse_device()
    # Before the emptiness check: SRC inside DST would otherwise only be "not empty".
    check_not_nested(source, os.path.realpath(options.mountpoint))
    mountpoint = check_mountpoint(options.mountpoint)
    check_not_nested(source, mountpoint)
    lockfile_path = resolve_lockfile(options.lockfile, source, mountpoint)
    fresh_lockfile = not os.path.lexists(lockfile_path)
    probe_lockfile(lockfile_path)
    options = _with_paths(options, source, mountpoint, lockfile_path)

    try:
        if options.foreground:
            return serve(options, report=None)
        return _detach_and_wait(options)
    except (FuseUnavailableError, _ReportedError) as exc:
        # The kernel refused the mount (no privilege, no FUSE): a failed mount
        # leaves the disk as it was, so the lockfile the probe created goes.
        if fresh_lockfile and exc.code == FuseUnavailableError.code \
                and not isinstance(exc, _NoReport):
            _remove_unused_lockfile(lockfile_path)
        raise


def _probe_unnamed(directory: str) -> bool:
    """Take and drop an OFD lock on an O_TMPFILE in ``directory``; False if unsupported."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return False
        raise LockfileUnusableError(f"lockfile directory {directory}: cannot create a file "
                                    f"there: {exc.strerror}") from None
    try:
        ofd_whole_file(fd, F_OFD_SETLK, fcntl.F_WRLCK)
    except OSError as exc:
        raise LockfileUnusableError(
            f"lockfile directory {directory}: the filesystem cannot take OFD locks "
            f"({exc.strerror}); lockfs refuses to run without them") from None
    finally:
        os.close(fd)
    return True


def _remove_unused_lockfile(path: str) -> None:
    """Unlink a lockfile nobody locks and nobody wrote (best effort, never raises)."""
    if not os.path.lexists(path):
        return  # the O_TMPFILE probe created nothing
    lockfile = LockFile(path)
    try:
        lockfile.open()
        if lockfile.try_lock() and os.stat(path).st_size == 0:
            os.unlink(path)
    except (LockfileError, OSError):
        pass
    finally:
        lockfile.close()


def resolve_lockfile(requested: str | None, source: str, mountpoint: str) -> str:
    if requested is None:
        return os.path.join(source, DEFAULT_LOCKFILE_NAME)
    path = os.path.abspath(requested)
    parent = os.path.realpath(os.path.dirname(path))
    if parent == mountpoint or parent.startswith(mountpoint + "/"):
        raise LockfileUnusableError(f"lockfile {requested}: must not be inside DST {mountpoint}")
    if not os.path.isdir(parent):
        raise LockfileUnusableError(f"lockfile {requested}: directory {parent} does not exist")
    return os.path.join(parent, os.path.basename(path))


def probe_lockfile(path: str) -> None:
    """Fail now, with a clear line, when the lockfile cannot take OFD locks.

    A lockfile that does not exist yet is not created here: an unnamed
    O_TMPFILE in its directory is locked instead, so that a mount refused
    later leaves the directory exactly as it was (the daemon creates the
    lockfile once mounted). Filesystems without O_TMPFILE get the real file.
    """
    if not os.path.lexists(path) and _probe_unnamed(os.path.dirname(path) or "."):
        return
    lockfile = LockFile(path)
    try:
        lockfile.open()
    except LockfileError as exc:
        raise LockfileUnusableError(str(exc)) from None
    lockfile.close()


def _with_paths(options: MountOptions, source: str, mountpoint: str,
                lockfile: str) -> MountOptions:
    return dataclasses.replace(options, source=source, mountpoint=mountpoint, lockfile=lockfile)


# ----------------------------------------------------------------- detaching


def _detach_and_wait(options: MountOptions) -> int:
    """Fork; the parent relays the child's readiness or error and exits accordingly."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        _redirect_stdio()
        report = os.fdopen(write_end, "w", buffering=1)
        code = 1
        try:
            code = serve(options, report=report)
        except LockfsError as exc:
            _report(report, f"error {exc.code} {exc}")
            code = exc.code
        except BaseException as exc:
            logging.getLogger(__name__).exception("lockfs daemon failed")
            _report(report, f"error 1 daemon failed: {exc}")
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = _read_with_timeout(pipe, READY_TIMEOUT)
    if message == "ready":
        return 0
    if message.startswith("error "):
        _, code, text = message.split(" ", 2)
        raise _ReportedError(int(code), text)
    raise _NoReport(f"lockfs daemon (pid {pid}) did not report readiness: "
                    f"{message or 'it exited'}")


class _ReportedError(LockfsError):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


class _NoReport(FuseUnavailableError):
    """The daemon neither reported ready nor failed: it may still mount, so touch nothing."""


def _read_with_timeout(pipe, timeout: float) -> str:
    ready, _, _ = select.select([pipe], [], [], timeout)
    if not ready:
        return "timed out"
    return pipe.readline().strip()


def _redirect_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _report(report, message: str) -> None:
    if report is None:
        return
    try:
        report.write(message + "\n")
        report.flush()
    except OSError:
        pass


# ----------------------------------------------------------------- serving


def serve(options: MountOptions, report) -> int:
    """Mount and serve until unmounted or signalled; returns the exit status."""
    where = setup_logging(foreground=options.foreground and report is None,
                          debug=options.debug, log_file=options.log_file)
    _raise_fd_limit()
    os.umask(0)  # the kernel already applied the caller's umask to every mode
    if report is not None:
        os.chdir("/")

    if options.lockfile is None:
        raise LockfileUnusableError("no lockfile path was resolved")
    root_fd = os.open(options.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    # Half the descriptors for the inode table, the rest for open files, pidfds
    # and the identity cache (inodes.py: colder entries are reopened by handle).
    descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    table = InodeTable(root_fd, fd_budget=descriptors // 2)
    lockfile = LockFile(options.lockfile)
    hidden = _hidden_entries(options.lockfile, options.source)
    guard = Guard(
        Lease(options.hold), Identities(cache_size=max(64, min(4096, descriptors // 8))), lockfile,
        MountInfo(options.source, options.mountpoint, options.lockfile),
        hidden,
    )
    operations = Operations(table, guard, entry_timeout=ENTRY_TIMEOUT,
                            attr_timeout=ATTR_TIMEOUT, keep_cache=KEEP_CACHE,
                            writeback=options.writeback_cache,
                            pinned=_pinned_directories(options.lockfile, options.source))
    guard.revoke = operations.revoke_handles
    guard.distrust_caches = operations.distrust_kernel_caches
    try:
        with _libfuse_messages() as messages:
            pyfuse3.init(operations, options.mountpoint, options.libfuse_options())
    except RuntimeError as exc:
        guard.close()
        table.close_all()
        why = messages[-1] if messages else str(exc)
        raise FuseUnavailableError(f"DST {options.mountpoint}: mounting failed ({why})") from None
    for line in messages:
        log.warning("libfuse: %s", line)
    # Created only now, so that a mount the kernel refused leaves SRC untouched.
    try:
        lockfile.open()
    except LockfileError as exc:
        pyfuse3.close(unmount=True)
        guard.close()
        table.close_all()
        raise LockfileUnusableError(str(exc)) from None
    log.info("mounted %s at %s (hold=%s, lockfile %s, logs to %s)", options.source,
             options.mountpoint, options.hold.value, options.lockfile, where)
    try:
        trio.run(_serve_async, options, guard, report)
    except BaseExceptionGroup as group:
        failure = _first_lockfs_error(group)
        if failure is None:
            raise
        raise failure from None
    finally:
        pyfuse3.close(unmount=True)
        guard.close()
        table.close_all()
        log.info("unmounted %s", options.mountpoint)
    return 0


@contextlib.contextmanager
def _libfuse_messages() -> Iterator[list[str]]:
    """Collect what libfuse and fusermount3 print on fd 2 while mounting.

    Why: their lines ("fusermount3: mount failed: Operation not permitted")
    explain a failure best, but would be a second line on the user's terminal
    (and lost on /dev/null in a detached daemon); they go into our one line.
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    capture = os.memfd_create("lockfs-libfuse", os.MFD_CLOEXEC)
    os.dup2(capture, 2)
    try:
        yield lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        text = os.pread(capture, 65536, 0).decode(errors="replace")
        os.close(capture)
        lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _first_lockfs_error(group: BaseExceptionGroup) -> LockfsError | None:
    """The first LockfsError in a (nested) nursery exception group, if any."""
    for exc in group.exceptions:
        if isinstance(exc, LockfsError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_lockfs_error(exc)
            if found is not None:
                return found
    return None


async def _serve_async(options: MountOptions, guard: Guard, report) -> None:
    async with trio.open_nursery() as nursery:
        guard.start(nursery)
        nursery.start_soon(_terminate_on_signals, name="signals")
        nursery.start_soon(_announce_ready, options.mountpoint, report, name="readiness")
        await pyfuse3.main()
        nursery.cancel_scope.cancel(reason="FUSE session ended")


async def _terminate_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _announce_ready(mountpoint: str, report) -> None:
    try:
        st = await trio.to_thread.run_sync(os.stat, mountpoint)
    except OSError as exc:
        # The kernel took the mount but refused the session (an option it did
        # not accept at FUSE_INIT): one clear line, not a traceback.
        raise FuseUnavailableError(f"DST {mountpoint}: the new mount does not answer "
                                   f"({exc.strerror})") from None
    _tune_bdi(st.st_dev)
    log.info("mount ready at %s", mountpoint)
    _report(report, "ready")
    _notify_systemd(b"READY=1")


def _tune_bdi(device: int) -> None:
    """Set the mount's readahead (the kernel's FUSE default of 128 KiB costs round trips)."""
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as knob:
            knob.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.warning("could not set %s: %s", path, exc)


def _notify_systemd(message: bytes) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)


def _raise_fd_limit() -> None:
    """Each known inode costs a descriptor: allow as many as the kernel lets us."""
    try:
        with open("/proc/sys/fs/nr_open") as nr_open:
            ceiling = int(nr_open.read())
    except (OSError, ValueError):
        ceiling = 1 << 20
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (ceiling, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
            return
        except (ValueError, OSError):
            continue


def _pinned_directories(lockfile: str, source: str) -> frozenset[tuple[int, int]]:
    """The directories strictly between SRC and a lockfile below SRC's root."""
    keys = set()
    parent = os.path.dirname(lockfile)
    while parent.startswith(source + "/"):
        st = os.stat(parent)
        keys.add((st.st_dev, st.st_ino))
        parent = os.path.dirname(parent)
    return frozenset(keys)


def _hidden_entries(lockfile: str, source: str) -> set[tuple[tuple[int, int], bytes]]:
    """The (directory, name) of the lockfile when it lives inside SRC."""
    parent = os.path.dirname(lockfile)
    if parent != source and not parent.startswith(source + "/"):
        return set()
    st = os.stat(parent)
    return {((st.st_dev, st.st_ino), os.fsencode(os.path.basename(lockfile)))}


__all__ = ["BadPathError", "resolve_lockfile", "run_mount", "serve"]
