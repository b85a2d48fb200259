"""The passthrough: one short pyfuse3 handler per FUSE operation.

This module only translates FUSE requests into system calls on the backing
store; it knows nothing of leases. Before any side effect, a handler that
SPEC.md lists as needing the lease asks its ``Gate`` (``gate.admit``), which
raises EBUSY for a refused caller. Handles given out are reported to the gate
so that it can count what the holder has open.

Rules every handler follows:
- No path strings: names are resolved with ``*at()`` calls relative to O_PATH
  descriptors held in the inode table, never followed through symlinks, and
  ``..`` of the root is the root.
- Cheap system calls run inline on the trio thread (a thread hop costs about
  ten times a 128 KiB pread); only fsync-like calls go to a worker thread.
- ``fuse_errors`` turns OSError into FUSEError(errno) and anything else into
  EIO with a logged traceback, because pyfuse3 ends the daemon on any other
  exception.

Caching: the timeouts, keep_cache and the writeback cache are chosen (and
explained) next to ``ENTRY_TIMEOUT`` in mount.py.

Limitations, decided and left on purpose:
- Ownership is set after creation (create as root, then chown through the
  parent descriptor): for a moment a new object is root's. A store that
  refuses the chown fails the request and the object is removed again.
- A directory that someone moves out of SRC *directly in the backing store*
  stays reachable through the mount while the kernel knows it (like a
  process's cwd would): the descriptor follows the directory. Swapping names
  for symlinks never leads out (tests/test_passthrough_safety.py).
- create() of a name that a writer of SRC itself made between the kernel's
  lookup (no such name) and the create opens that file without O_EXCL the
  way the caller asked, with the daemon's (root's) rights: the kernel checked
  permissions on the directory, not on a file it did not know.
- XATTR_CREATE/XATTR_REPLACE are checked by pyfuse3 with a getxattr before the
  setxattr: atomic towards requests through the mount (both run on the trio
  thread without awaiting), not towards writers of SRC itself.
- POSIX ACLs are on (``enable_acl``): the kernel enforces the ACLs stored in
  SRC, as the backing store would (with them off, an ACL entry that denies a
  user was ignored and one that grants was refused). The kernel still applies
  the caller's umask before a create reaches the daemon, also below a default
  ACL (pyfuse3 cannot ask for FUSE_DONT_MASK). statfs answers for SRC's filesystem
  also below a mount point inside SRC. No lseek SEEK_DATA/SEEK_HOLE (no
  handler in pyfuse3: a sparse file reads as all data), no fallocate, no
  ioctl (chattr/lsattr fail), no copy_file_range offload, no O_TMPFILE
  (EOPNOTSUPP: applications fall back to a named temporary file).
- DST (or a bind mount of it) mounted inside SRC after mounting would make
  the daemon call into its own mount and hang; ``lockfs mount`` refuses DST
  inside SRC, later mounts are the administrator's to avoid.
- Inline system calls (pread, pwrite, openat...) on a backing store that
  hangs (a dead NFS server, a frozen filesystem) stall the whole daemon;
  only fsync, fdatasync and fsyncdir run in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, RequestContext

from lockfs import syscalls
from lockfs.identity import has_capability
from lockfs.inodes import ROOT_INODE, Inode, InodeTable

log = logging.getLogger(__name__)

STATUS_XATTR = b"user.lockfs.status"
CAP_FSETID = 4  # linux/capability.h
ACL_ACCESS_XATTR = b"system.posix_acl_access"
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Flags the backing open must not see: creation is done by create(), O_NOFOLLOW
# would refuse the /proc/self/fd magic link, O_DIRECT needs aligned buffers.
OPEN_FLAGS_DROPPED = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT


class Gate(Protocol):
    """What the passthrough asks of the lease (implemented by guard.Guard)."""

    def admit(self, ctx: RequestContext, what: str) -> object:
        """Return a token for an admitted caller; raise FUSEError(EBUSY) otherwise."""

    def handle_opened(self, token: object, handle: int) -> None: ...

    def dir_handle_opened(self, ctx: RequestContext, handle: int) -> None: ...

    def handle_closed(self, handle: int) -> None: ...

    def is_hidden(self, parent_key: tuple[int, int], name: bytes) -> bool: ...

    def status(self) -> bytes: ...


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_errors(handler: F) -> F:
    """Map every failure of ``handler`` to a FUSEError so the daemon survives it."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except FUSEError:
            raise
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                log.error("%s: out of file descriptors: %s", handler.__name__, exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s; answering EIO", handler.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def proc_path(fd: int) -> str:
    """The /proc magic link that reopens an O_PATH descriptor with real access."""
    return f"/proc/self/fd/{fd}"


class DirHandle:
    """An open directory: its descriptor and a snapshot of its names.

    The snapshot, taken at offset 0, makes offsets stable: a listing that runs
    while entries are created or removed reports every name exactly once.
    """

    __slots__ = ("fd", "inode", "names")

    def __init__(self, fd: int, inode: Inode) -> None:
        self.fd = fd
        self.inode = inode
        self.names: list[tuple[str, int]] | None = None  # (name, d_ino)

    def snapshot(self) -> list[tuple[str, int]]:
        with os.scandir(self.fd) as entries:
            listed = [(entry.name, entry.inode()) for entry in entries]
        self.names = [(".", 0), ("..", 0), *listed]
        return self.names


class Operations(pyfuse3.Operations):
    """A faithful passthrough of one backing directory, descriptor-based throughout."""

    supports_dot_lookup = True
    enable_acl = True

    def __init__(self, table: InodeTable, gate: Gate, *, entry_timeout: float,
                 attr_timeout: float, keep_cache: bool, writeback: bool,
                 pinned: frozenset[tuple[int, int]] = frozenset()) -> None:
        super().__init__()
        self.table = table
        self.gate = gate
        # Directories between SRC and a lockfile below SRC's root: moving one
        # would move the lockfile away from the path every daemon locks.
        self.pinned = pinned
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.keep_cache = keep_cache
        # Read by pyfuse3 at FUSE init. With it the kernel gathers small writes in
        # its page cache and computes O_APPEND offsets itself, so the backing
        # descriptor must be readable (partial pages are read first) and must
        # not append on its own.
        self.enable_writeback_cache = writeback
        self.dirs: dict[int, DirHandle] = {}

    def revoke_handles(self, handles: frozenset[int]) -> None:
        """Make every request on ``handles`` fail from now on (fencing a lost lease).

        Each handle is its backing descriptor; pointing that descriptor number
        at an O_PATH descriptor makes read, write and fsync fail with EBADF,
        at no cost to the I/O path. release() still closes it normally.
        """
        if not handles:
            return
        revoked = os.open("/", os.O_PATH | os.O_CLOEXEC)
        try:
            for handle in handles:
                os.dup2(revoked, handle, inheritable=False)
        finally:
            os.close(revoked)

    def distrust_kernel_caches(self) -> None:
        """Another mount may have changed SRC: make the kernel drop all it cached.

        Every inode is retired (inodes.py: requests naming one get ESTALE and
        the kernel looks the path up again, getting fresh inodes), and its
        attributes invalidated so that the next permission check or stat of
        an old inode reaches the daemon and learns it is stale. attr_only
        invalidation takes no page or inode lock in the kernel, so it is safe
        from inside a request handler.
        """
        retired = self.table.inode_numbers()
        self.table.retire()
        for ino in retired:
            if ino == ROOT_INODE:
                continue
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError:
                continue  # forgotten by the kernel meanwhile

    # ----------------------------------------------------------- helpers

    def _attributes(self, entry: Inode, st: os.stat_result) -> EntryAttributes:
        attr = EntryAttributes()
        attr.st_ino = entry.ino
        attr.generation = 0
        attr.entry_timeout = self.entry_timeout
        attr.attr_timeout = self.attr_timeout
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _child(self, parent: Inode, name: bytes,
               parent_fd: int | None = None) -> tuple[Inode, os.stat_result]:
        """Look ``name`` up in ``parent`` and count one kernel reference to it.

        ``parent_fd``: a descriptor of ``parent`` to use instead of its entry's
        (readdir passes its directory's own, which stays open however many
        entries the listing makes the table close).
        """
        at = parent.fd if parent_fd is None else parent_fd
        if name == b"." or (name == b".." and parent.ino == ROOT_INODE):
            self.table.add_reference(parent)
            return parent, os.fstat(at)
        if self.gate.is_hidden(parent.key, name):
            raise FUSEError(errno.ENOENT)
        fd = os.open(name, PATH_FLAGS, dir_fd=at)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        return self.table.remember(fd, st), st

    def _known_child(self, parent: Inode, name: bytes, parent_fd: int,
                     d_ino: int) -> tuple[Inode, os.stat_result] | None:
        """``_child`` for a listed name whose object the table already holds open.

        One fstatat instead of openat, fstat and close (listings of known
        entries are the common case: ``ls`` after creating files). Safe because
        a descriptor the table holds keeps its object alive, so no other object
        can have that (st_dev, st_ino) now: if the name still leads to that
        key, it leads to that object. Anything else takes the full path:
        unknown objects, entries closed to save descriptors (their inode number
        may have been reused) and mount points (d_ino is the covered directory).
        """
        known = self.table.find((parent.key[0], d_ino))
        if known is None or known.fd < 0:
            return None
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != known.key:
            return None
        self.table.add_reference(known)
        return known, st

    def _entry(self, parent: Inode, name: bytes) -> EntryAttributes:
        entry, st = self._child(parent, name)
        return self._attributes(entry, st)

    def _refuse_hidden(self, parent: Inode, name: bytes) -> None:
        """The reserved lockfile name can be neither made nor replaced."""
        if self.gate.is_hidden(parent.key, name):
            log.warning("refused to touch the reserved lockfile name %r", name)
            raise FUSEError(errno.EPERM)

    def _refuse_pinned(self, parent: Inode, name: bytes) -> None:
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return  # the rename itself reports it
        if (st.st_dev, st.st_ino) in self.pinned:
            log.warning("refused to move %r: the lockfile lives below it", name)
            raise FUSEError(errno.EBUSY)

    def _give_to_caller(self, parent: Inode, name: bytes, ctx: RequestContext) -> None:
        """Make a new object the caller's, as the kernel would have.

        The daemon creates as root; the object then gets the caller's uid and
        gid, or keeps the directory's gid when the directory is setgid.
        """
        parent_mode = os.fstat(parent.fd).st_mode
        gid = -1 if parent_mode & stat.S_ISGID else ctx.gid
        if ctx.uid == os.geteuid() and gid in (-1, os.getegid()):
            return  # already the caller's (root creating as root)
        try:
            os.chown(name, ctx.uid, gid, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            # A backing store that refuses chown (root squash) must not keep a
            # root-owned object for a request that failed.
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
                (os.rmdir if stat.S_ISDIR(st.st_mode) else os.unlink)(name, dir_fd=parent.fd)
            raise

    # ----------------------------------------------------------- lookups

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: RequestContext) -> EntryAttributes:
        return self._entry(self.table.get(parent_inode), name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                self.table.forget(ino, count)
            except Exception:  # forget has no reply: log, never end the daemon
                log.exception("forget of inode %d failed", ino)

    @fuse_errors
    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        entry = self.table.get(inode)
        return self._attributes(entry, os.fstat(entry.fd))

    @fuse_errors
    async def setattr(self, inode: int, attr: EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: RequestContext) -> EntryAttributes:
        if fh is None:  # on an open handle (ftruncate, the kernel's time updates) it is
            self.gate.admit(ctx, "setattr")  # the holder's: handles are only given to it
        entry = self.table.get(inode)
        if fields.update_mode:
            if fh is not None:
                os.fchmod(fh, stat.S_IMODE(attr.st_mode))
            else:
                os.chmod(proc_path(entry.fd), stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            syscalls.chown_fd(entry.fd, uid, gid)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(proc_path(entry.fd), attr.st_size)
        if fields.update_atime or fields.update_mtime:
            syscalls.utimens_fd(
                entry.fd,
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None,
            )
        if not (fields.update_mode or fields.update_uid or fields.update_gid
                or fields.update_size or fields.update_atime or fields.update_mtime):
            # chown(f, -1, -1) arrives as a SETATTR with nothing (or only ctime, with
            # the writeback cache) to set: a no-change chown of the backing object
            # gives it the new ctime that the same call gives natively.
            syscalls.chown_fd(entry.fd, -1, -1)
        return self._attributes(entry, os.fstat(entry.fd))

    @fuse_errors
    async def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        return os.readlink(b"", dir_fd=self.table.get(inode).fd)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: RequestContext) -> bool:
        st = os.fstat(self.table.get(inode).fd)
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
        if ctx.uid == st.st_uid:
            bits = (st.st_mode >> 6) & 7
        elif ctx.gid == st.st_gid or st.st_gid in _supplementary_groups(ctx.pid):
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return (mode & bits) == mode

    @fuse_errors
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.table.get(ROOT_INODE).fd)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(data, field, getattr(st, field))
        return data

    # ----------------------------------------------------------- creating and removing

    def _make(self, ctx: RequestContext, what: str, parent_inode: int, name: bytes,
              make: Callable[[int], None]) -> EntryAttributes:
        """Create ``name`` with ``make(parent_fd)``, give it to the caller, look it up."""
        self.gate.admit(ctx, what)
        parent = self.table.get(parent_inode)
        self._refuse_hidden(parent, name)
        make(parent.fd)
        self._give_to_caller(parent, name, ctx)
        return self._entry(parent, name)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        return self._make(ctx, "mknod", parent_inode, name,
                          lambda parent_fd: os.mknod(name, mode, rdev, dir_fd=parent_fd))

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: RequestContext) -> EntryAttributes:
        return self._make(ctx, "mkdir", parent_inode, name,
                          lambda parent_fd: os.mkdir(name, mode, dir_fd=parent_fd))

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: RequestContext) -> EntryAttributes:
        return self._make(ctx, "symlink", parent_inode, name,
                          lambda parent_fd: os.symlink(target, name, dir_fd=parent_fd))

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: RequestContext) -> EntryAttributes:
        self.gate.admit(ctx, "link")
        entry = self.table.get(inode)
        parent = self.table.get(new_parent_inode)
        self._refuse_hidden(parent, new_name)
        syscalls.link_fd(entry.fd, parent.fd, new_name)
        self.table.add_reference(entry)
        return self._attributes(entry, os.fstat(entry.fd))

    def _remove(self, ctx: RequestContext, what: str, parent_inode: int, name: bytes,
                remove: Callable[..., None]) -> None:
        self.gate.admit(ctx, what)
        parent = self.table.get(parent_inode)
        self._refuse_hidden(parent, name)
        remove(name, dir_fd=parent.fd)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._remove(ctx, "unlink", parent_inode, name, os.unlink)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._remove(ctx, "rmdir", parent_inode, name, os.rmdir)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: RequestContext) -> None:
        self.gate.admit(ctx, "rename")
        old = self.table.get(parent_inode_old)
        new = self.table.get(parent_inode_new)
        self._refuse_hidden(old, name_old)
        self._refuse_hidden(new, name_new)
        if self.pinned:
            self._refuse_pinned(old, name_old)
            self._refuse_pinned(new, name_new)
        if flags == 0:
            os.rename(name_old, name_new, src_dir_fd=old.fd, dst_dir_fd=new.fd)
        elif flags & ~(syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE
                       | syscalls.RENAME_WHITEOUT):
            raise FUSEError(errno.EINVAL)
        else:
            syscalls.rename2(old.fd, name_old, new.fd, name_new, flags)

    # ----------------------------------------------------------- files

    def _file_info(self, fd: int, entry: Inode, flags: int, direct: bool) -> FileInfo:
        """Keep the kernel's page cache across opens (see distrust_kernel_caches).

        Only the holder writes, and only through this mount, so cached pages
        stay right; after another mount held SRC, inodes are retired and new
        kernel inodes start with empty caches. Except files ever opened with
        O_DIRECT: the kernel does not drop their cached pages when an
        asynchronous direct write (io_submit, io_uring) completes, so pages
        that buffered readers cached meanwhile go stale (xfstests generic/451).
        """
        if flags & os.O_DIRECT:
            entry.direct_io_seen = True
        return FileInfo(fh=fd, direct_io=direct,
                        keep_cache=self.keep_cache and not entry.direct_io_seen)

    def _backing_flags(self, flags: int) -> int:
        flags &= ~OPEN_FLAGS_DROPPED
        if self.enable_writeback_cache:
            flags &= ~os.O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags | os.O_CLOEXEC

    def _open_backing(self, path: str | bytes, flags: int, ctx: RequestContext,
                      dir_fd: int | None = None, extra: int = 0) -> tuple[int, bool]:
        """Open a backing file for a FUSE open; True when its writes must skip the page cache.

        An append-only file (chattr +a) refuses the read-write, non-append
        descriptor that the writeback cache needs: it is opened as asked, and
        the kernel sends its writes straight through (direct_io), where they
        land as appends, as they do natively.
        """
        try:
            fd, direct = os.open(path, self._backing_flags(flags) | extra, dir_fd=dir_fd), False
        except PermissionError:
            if not (self.enable_writeback_cache and flags & os.O_APPEND):
                raise
            asked = (flags & ~OPEN_FLAGS_DROPPED) | os.O_CLOEXEC | extra
            fd, direct = os.open(path, asked, dir_fd=dir_fd), True
        if flags & os.O_TRUNC:
            try:
                _drop_set_id_bits_after_truncate(fd, ctx.pid)
            except OSError:
                os.close(fd)
                raise
        return fd, direct

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        token = self.gate.admit(ctx, "open")
        entry = self.table.get(inode)
        fd, direct = self._open_backing(proc_path(entry.fd), flags, ctx)
        self.gate.handle_opened(token, fd)
        return self._file_info(fd, entry, flags, direct)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        token = self.gate.admit(ctx, "create")
        parent = self.table.get(parent_inode)
        self._refuse_hidden(parent, name)
        base = self._backing_flags(flags) | os.O_NOFOLLOW
        direct = False
        try:
            fd = os.open(name, base | os.O_CREAT | os.O_EXCL, mode, dir_fd=parent.fd)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd, direct = self._open_backing(name, flags, ctx, parent.fd, os.O_NOFOLLOW)
        else:
            try:
                self._give_to_caller(parent, name, ctx)
                if mode & (stat.S_ISUID | stat.S_ISGID):
                    os.fchmod(fd, stat.S_IMODE(mode))  # chown cleared them
            except OSError:
                os.close(fd)
                raise
        try:
            # The entry is the very file ``fd`` has open, even if the name was
            # replaced in SRC meanwhile (the magic link needs no name).
            path_fd = os.open(proc_path(fd), os.O_PATH | os.O_CLOEXEC)
            try:
                st = os.fstat(path_fd)
            except OSError:
                os.close(path_fd)
                raise
            entry = self.table.remember(path_fd, st)
        except OSError:
            os.close(fd)
            raise
        self.gate.handle_opened(token, fd)
        return self._file_info(fd, entry, flags, direct), self._attributes(entry, st)

    # read and write skip the fuse_errors wrapper (one coroutine less on the
    # hot path) but map errors the same way.
    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(fh, size, off)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in read; answering EIO")
            raise FUSEError(errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in write; answering EIO")
            raise FUSEError(errno.EIO) from None

    async def flush(self, fh: int) -> None:
        """Not implemented on purpose: ENOSYS tells the kernel never to send FLUSH again.

        Writes reach the backing file synchronously in write(), so a flush has
        nothing to report; the kernel still writes back its dirty pages on
        close, and fsync still reaches the backing store. This saves one round
        trip per close().
        """
        raise FUSEError(errno.ENOSYS)

    @fuse_errors
    async def release(self, fh: int) -> None:
        try:
            os.close(fh)
        finally:
            self.gate.handle_closed(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)

    # ----------------------------------------------------------- directories

    @fuse_errors
    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        entry = self.table.get(inode)
        fd = os.open(proc_path(entry.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dirs[fd] = DirHandle(fd, entry)
        self.gate.dir_handle_opened(ctx, fd)
        return fd

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dirs[fh]
        names = handle.snapshot() if start_id == 0 or handle.names is None else handle.names
        directory = handle.inode
        replied = False
        for index in range(start_id, len(names)):
            text, d_ino = names[index]
            name = os.fsencode(text)
            if index < 2:
                st = os.fstat(handle.fd) if index == 0 or directory.ino == ROOT_INODE \
                    else os.stat(b"..", dir_fd=handle.fd, follow_symlinks=False)
                attrs = EntryAttributes()
                attrs.st_ino = self.table.ino_for((st.st_dev, st.st_ino))
                attrs.st_mode = st.st_mode
                # The kernel takes no lookup reference for "." and "..".
                if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                    return
                replied = True
                continue
            if self.gate.is_hidden(directory.key, name):
                continue
            try:
                found = self._known_child(directory, name, handle.fd, d_ino)
                entry, st = found or self._child(directory, name, handle.fd)
            except FUSEError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ESTALE):
                    continue  # removed since the snapshot
                if replied:
                    # Never drop a name silently (EMFILE would make `ls` lie): end
                    # this batch; the kernel asks again from here and gets the error.
                    return
                raise
            if not pyfuse3.readdir_reply(token, name, self._attributes(entry, st), index + 1):
                self.table.forget(entry.ino, 1)
                return
            replied = True

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        handle = self.dirs.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)
            self.gate.handle_closed(fh)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)

    # ----------------------------------------------------------- extended attributes

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: RequestContext) -> None:
        if inode == ROOT_INODE and name == STATUS_XATTR:
            raise FUSEError(errno.EPERM)
        self.gate.admit(ctx, "setxattr")
        entry = self.table.get(inode)
        os.setxattr(proc_path(entry.fd), name, value)
        if name == ACL_ACCESS_XATTR and ctx.uid != 0:
            # Setting an access ACL drops S_ISGID when the setter is neither in
            # the file's group nor privileged. The kernel asks for that only of
            # daemons with FUSE_SETXATTR_EXT (pyfuse3 has none), and the backing
            # store keeps the bit for the daemon itself, which is root.
            st = os.fstat(entry.fd)
            if (st.st_mode & stat.S_ISGID and ctx.gid != st.st_gid
                    and st.st_gid not in _supplementary_groups(ctx.pid)):
                os.chmod(proc_path(entry.fd), stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        if inode == ROOT_INODE and name == STATUS_XATTR:
            return self.gate.status()
        try:
            return os.getxattr(proc_path(self.table.get(inode).fd), name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise

    @fuse_errors
    async def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        names = os.listxattr(proc_path(self.table.get(inode).fd))
        return [os.fsencode(name) for name in names]

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        self.gate.admit(ctx, "removexattr")
        try:
            os.removexattr(proc_path(self.table.get(inode).fd), name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise


def _drop_set_id_bits_after_truncate(fd: int, pid: int) -> None:
    """Clear set-user-ID (and set-group-ID with group execute) after an open(O_TRUNC).

    A truncation by a caller without CAP_FSETID clears them natively. Through
    FUSE with atomic O_TRUNC the kernel hands that job to the daemon and then
    drops the mode change it computed (fuse_do_setattr skips ATTR_OPEN), and
    the daemon's own truncation, as root, keeps the bits.
    """
    st = os.fstat(fd)
    kill = st.st_mode & stat.S_ISUID
    if st.st_mode & stat.S_ISGID and st.st_mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    if kill and stat.S_ISREG(st.st_mode) and not has_capability(pid, CAP_FSETID):
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~kill)


def _supplementary_groups(pid: int) -> list[int]:
    try:
        return list(pyfuse3.get_sup_groups(pid))
    except OSError:
        return []
