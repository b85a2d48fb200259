"""Checks made before mounting, each failing with one line that names the path.

Nothing here changes the disk, except cleaning up a stale (dead) lockfs mount
at DST, which is what a user re-running ``lockfs mount`` wants.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess

from lockfs.errors import AlreadyMountedError, BadPathError, FuseUnavailableError

FUSE_MAJOR, FUSE_MINOR = 10, 229  # /dev/fuse (devices.txt: misc 229)
# What a FUSE mount whose daemon is gone answers (ECONNABORTED seen on 6.18 too).
DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def check_source(source: str) -> str:
    """SRC must be an existing directory; returns its real path."""
    if not os.path.exists(source):
        raise BadPathError(f"SRC {source}: does not exist")
    if not os.path.isdir(source):
        raise BadPathError(f"SRC {source}: is not a directory")
    return os.path.realpath(source)


def check_mountpoint(mountpoint: str) -> str:
    """DST must be an empty directory that is not mounted; a dead lockfs mount is cleaned."""
    try:
        os.stat(mountpoint)
        # A dead FUSE mount may still answer stat from cached attributes;
        # statfs always asks the daemon, so it tells a stale mount at once.
        os.statvfs(mountpoint)
    except OSError as exc:
        if exc.errno in DEAD_MOUNT_ERRNOS:
            clean_stale_mount(mountpoint)
        elif exc.errno == errno.ENOENT:
            raise BadPathError(f"DST {mountpoint}: does not exist") from None
        else:
            raise BadPathError(f"DST {mountpoint}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise BadPathError(f"DST {mountpoint}: is not a directory")
    real = os.path.realpath(mountpoint)
    # ismount misses a bind mount from the same filesystem; mountinfo does not.
    kind = mount_type(real)
    if kind is not None or os.path.ismount(real):
        raise AlreadyMountedError(f"DST {mountpoint}: is already a mount point ({kind})")
    if os.listdir(real):
        raise BadPathError(f"DST {mountpoint}: is not empty")
    return real


def check_not_nested(source: str, mountpoint: str) -> None:
    if source == mountpoint:
        raise BadPathError(f"SRC and DST are the same directory: {source}")
    if _inside(mountpoint, source):
        raise BadPathError(f"DST {mountpoint} is inside SRC {source}")
    if _inside(source, mountpoint):
        raise BadPathError(f"SRC {source} is inside DST {mountpoint}")


def check_fuse_device() -> None:
    if os.geteuid() != 0:
        raise FuseUnavailableError(
            "lockfs mount must run as root: it mounts with allow_other and reads other "
            "processes' mount namespaces")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        raise FuseUnavailableError(f"/dev/fuse: {exc.strerror} (is the fuse module loaded, "
                                   "and the device passed to this container?)") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    # Something else at that path (a bind-mounted /dev/null) would only fail
    # later, in libfuse, after the lockfile was created: refuse it now.
    if not stat.S_ISCHR(st.st_mode) or os.major(st.st_rdev) != FUSE_MAJOR \
            or os.minor(st.st_rdev) != FUSE_MINOR:
        raise FuseUnavailableError("/dev/fuse: is not the FUSE device (character device "
                                   f"{FUSE_MAJOR}:{FUSE_MINOR})")


def clean_stale_mount(mountpoint: str) -> None:
    """Lazily unmount a FUSE mount whose daemon is gone (stat answers ENOTCONN)."""
    kind = mount_type(os.path.abspath(mountpoint))
    if kind is not None and not kind.startswith("fuse"):
        raise AlreadyMountedError(f"DST {mountpoint}: is a dead {kind} mount; not touching it")
    result = subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise AlreadyMountedError(f"DST {mountpoint}: stale mount could not be cleaned up: "
                                  f"{result.stderr.strip()}")


def mount_type(path: str) -> str | None:
    """The filesystem type mounted at ``path`` per /proc/self/mountinfo, if any."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            lines = mountinfo.readlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == path and " - " in line:
            found = line.split(" - ", 1)[1].split()[0]
    return found


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _inside(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")
