"""The few *at() system calls that Python's os module cannot make on O_PATH descriptors.

Why: operating on an object through its own O_PATH descriptor needs
``AT_EMPTY_PATH`` (chown, utimes and link of the descriptor itself, so that a
symlink is never followed) and ``renameat2`` for RENAME_NOREPLACE and
RENAME_EXCHANGE; os offers neither. Each wrapper raises OSError like os does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                           ctypes.c_int]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec),
                            ctypes.c_int]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_int]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the object behind an O_PATH descriptor (-1 keeps a value); never follows."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def utimens_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set atime/mtime (None leaves one untouched) of the object behind ``fd``."""
    times = (_Timespec * 2)()
    for slot, value in enumerate((atime_ns, mtime_ns)):
        if value is None:
            times[slot].tv_sec, times[slot].tv_nsec = 0, UTIME_OMIT
        else:
            times[slot].tv_sec, times[slot].tv_nsec = divmod(value, 1_000_000_000)
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def link_fd(fd: int, new_dir_fd: int, new_name: bytes) -> None:
    """Make a hard link named ``new_name`` to the object behind ``fd``."""
    _check(_libc.linkat(fd, b"", new_dir_fd, new_name, AT_EMPTY_PATH))


def rename2(old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes,
            flags: int) -> None:
    """renameat2(2) with RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT."""
    _check(_libc.renameat2(old_dir_fd, old_name, new_dir_fd, new_name, flags))


MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]


def handle_of(fd: int) -> bytes:
    """The filesystem's file handle of the object behind ``fd`` (name_to_handle_at).

    Raises OSError (EOPNOTSUPP) on filesystems that cannot export handles.
    """
    handle = _FileHandle()
    handle.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(fd, b"", ctypes.byref(handle), ctypes.byref(mount_id),
                                   AT_EMPTY_PATH))
    return (handle.handle_type.to_bytes(4, "little", signed=True)
            + bytes(handle.f_handle[:handle.handle_bytes]))


def open_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open the object a ``handle_of`` handle names, on the filesystem of ``mount_fd``."""
    raw = _FileHandle()
    raw.handle_type = int.from_bytes(handle[:4], "little", signed=True)
    raw.handle_bytes = len(handle) - 4
    ctypes.memmove(raw.f_handle, handle[4:], raw.handle_bytes)
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(raw), flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd
