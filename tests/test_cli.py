"""The command line: every bad input fails cleanly, and mounting/unmounting works.

A bad input must give a non-zero exit, exactly one line on stderr, no
traceback and no change on disk (no file, no lockfile, no mount), whatever
went wrong: that is what a user (or systemd) reading the one line relies on.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from conftest import LOCKFS, Mount, _mounted, lockfs, wait_for
from nsclient import CLIENT_PYTHON, NOBODY, client

import lockfs as lockfs_package
from lockfs.cli import process_alive


def disk_state(root: Path) -> tuple[dict[str, tuple], list[str]]:
    """Everything under ``root`` a failed command must leave alone, and the mount table."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            entries[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_size,
                                                    st.st_mtime_ns)
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = sorted(line.split()[4] for line in mountinfo
                        if line.split()[4].startswith(str(root)))
    return entries, mounts


def refused(root: Path, *args: str, prefix: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> str:
    """Run ``lockfs args``, expecting a clean refusal; return its one line."""
    before = disk_state(root)
    result = subprocess.run([*prefix, *LOCKFS, *args], capture_output=True, text=True,
                            timeout=60, env=env, check=False)
    assert result.returncode not in (0, None), result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lockfs: ")
    assert result.stdout == ""
    assert disk_state(root) == before
    return lines[0]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """tmp_path with an empty SRC and DST, the usual starting point."""
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    return tmp_path


# ------------------------------------------------------------------ bad input


def test_src_missing(base: Path) -> None:
    """A typo in SRC must not create anything anywhere."""
    line = refused(base, "mount", str(base / "nosuch"), str(base / "dst"))
    assert "nosuch" in line and "does not exist" in line


def test_src_not_a_directory(base: Path) -> None:
    """Only a directory can be served."""
    (base / "file").write_text("x")
    line = refused(base, "mount", str(base / "file"), str(base / "dst"))
    assert "not a directory" in line


def test_dst_missing(base: Path) -> None:
    """lockfs never creates DST: a typo would mount somewhere unexpected."""
    line = refused(base, "mount", str(base / "src"), str(base / "nosuch"))
    assert "nosuch" in line and "does not exist" in line


def test_dst_not_a_directory(base: Path) -> None:
    """A file at DST is refused, not replaced."""
    (base / "file").write_text("x")
    line = refused(base, "mount", str(base / "src"), str(base / "file"))
    assert "not a directory" in line


def test_dst_not_empty(base: Path) -> None:
    """Mounting over data would hide it from everyone."""
    (base / "dst" / "data").write_text("keep me")
    line = refused(base, "mount", str(base / "src"), str(base / "dst"))
    assert "not empty" in line


def test_dst_inside_src(base: Path) -> None:
    """The mount would show itself inside itself (and the daemon call into itself)."""
    (base / "src" / "inner").mkdir()
    line = refused(base, "mount", str(base / "src"), str(base / "src" / "inner"))
    assert "inside SRC" in line


def test_src_inside_dst(base: Path) -> None:
    """SRC would disappear under its own mount."""
    (base / "dst" / "inner").mkdir()
    line = refused(base, "mount", str(base / "dst" / "inner"), str(base / "dst"))
    assert "inside DST" in line


def test_src_and_dst_the_same(base: Path) -> None:
    """Mounting SRC over itself hides the data the daemon serves."""
    line = refused(base, "mount", str(base / "src"), str(base / "src"))
    assert "same" in line


@pytest.mark.parametrize("kind", ["tmpfs", "bind"])
def test_dst_already_a_mount_point(base: Path, kind: str) -> None:
    """Neither a foreign filesystem nor a bind mount of the same one is mounted over."""
    dst = base / "dst"
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "lockfs-test", str(dst)], check=True)
    else:
        (base / "elsewhere").mkdir()
        subprocess.run(["mount", "--bind", str(base / "elsewhere"), str(dst)], check=True)
    try:
        line = refused(base, "mount", str(base / "src"), str(dst))
        assert "already a mount point" in line
    finally:
        subprocess.run(["umount", str(dst)], check=True)


def test_dst_already_a_lockfs_mount(mounted: Mount, tmp_path: Path) -> None:
    """A second mount on a live one is refused; the first keeps serving."""
    other = tmp_path / "other-src"
    other.mkdir()
    line = refused(tmp_path, "mount", str(other), str(mounted.dst))
    assert "already a mount point" in line
    assert mounted.status()["daemon_pid"] == mounted.daemon_pid


@pytest.mark.parametrize("option", ["frobnicate", "hold=forever", "lockfile", "max_read=4096",
                                    "blksize=4096"])
def test_unknown_or_bad_option(base: Path, option: str) -> None:
    """Every -o option is known by name, or refused by name."""
    line = refused(base, "mount", str(base / "src"), str(base / "dst"), "-o", option)
    assert option.split("=")[0] in line or option.split("=")[1] in line


def test_unknown_option_in_the_mount8_form(base: Path) -> None:
    """An fstab typo fails the mount(8) form with the same one line."""
    line = refused(base, str(base / "src"), str(base / "dst"), "-o", "rw,frobnicate")
    assert "frobnicate" in line


def test_dev_fuse_not_the_fuse_device(base: Path) -> None:
    """/dev/null bind-mounted over /dev/fuse (a container without the device)."""
    shutil_unshare = ["unshare", "-m", "sh", "-c",
                      'mount --bind /dev/null /dev/fuse && exec "$@"', "sh"]
    line = refused(base, "mount", str(base / "src"), str(base / "dst"),
                   prefix=tuple(shutil_unshare))
    assert "/dev/fuse" in line


def test_dev_fuse_missing(base: Path) -> None:
    """An empty /dev (a container that was given no devices)."""
    empty_dev = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none /dev && exec "$@"', "sh"]
    line = refused(base, "mount", str(base / "src"), str(base / "dst"),
                   prefix=tuple(empty_dev))
    assert "/dev/fuse" in line and "No such file" in line


def test_not_root() -> None:
    """An unprivileged user is told it needs root, before anything is touched."""
    base = Path(tempfile.mkdtemp(prefix="lockfs-cli-", dir="/tmp"))
    try:
        base.chmod(0o755)
        for name in ("src", "dst"):
            (base / name).mkdir()
            os.chown(base / name, NOBODY, NOBODY)
        site = str(Path(pyfuse3.__file__).parent.parent)
        package = str(Path(lockfs_package.__file__).parent.parent)
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{package}:{site}"}
        prefix = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                  CLIENT_PYTHON, "-m", "lockfs")
        before = disk_state(base)
        result = subprocess.run([*prefix, "mount", str(base / "src"), str(base / "dst")],
                                capture_output=True, text=True, env=env, timeout=60,
                                check=False)
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "root" in result.stderr
        assert disk_state(base) == before
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_root_without_mount_privilege(base: Path) -> None:
    """Root without CAP_SYS_ADMIN: the kernel refuses; libfuse's words end up in one line
    and the lockfile the probe created is gone again."""
    no_admin = ("setpriv", "--bounding-set=-sys_admin")
    for mode in ((), ("--foreground",)):
        line = refused(base, "mount", str(base / "src"), str(base / "dst"), *mode,
                       prefix=no_admin)
        assert "mounting failed" in line and "not permitted" in line
    assert os.listdir(base / "src") == []


def test_lockfile_in_a_missing_directory(base: Path) -> None:
    """--lockfile in a directory that does not exist is refused, not created."""
    line = refused(base, "mount", str(base / "src"), str(base / "dst"),
                   "--lockfile", str(base / "nosuch" / "lease"))
    assert "lockfile" in line


@pytest.mark.parametrize("where", ["/proc/lockfs-lease", "a-directory"])
def test_lockfile_that_cannot_be_made_or_locked(base: Path, where: str) -> None:
    """A lockfile path in procfs (no files can be made there) or naming a directory."""
    (base / "a-directory").mkdir()
    path = where if where.startswith("/") else str(base / where)
    line = refused(base, "mount", str(base / "src"), str(base / "dst"), "--lockfile", path)
    assert "lockfile" in line and path in line


def test_unmount_of_something_not_mounted(base: Path) -> None:
    """`lockfs unmount` of a plain directory says so in one line."""
    line = refused(base, "unmount", str(base / "dst"))
    assert "not mounted" in line


# ------------------------------------------------------------------ mounting and unmounting


def test_mount_options_in_proc_mounts(mounted: Mount) -> None:
    """The container-volume defaults are what the kernel really got."""
    with open("/proc/mounts") as mounts:
        line = next(row for row in mounts if row.split()[1] == str(mounted.dst))
    fsname, _where, fstype, options = line.split()[:4]
    assert fsname == f"lockfs:{mounted.src}"
    assert fstype == "fuse.lockfs"
    flags = options.split(",")
    for flag in ("allow_other", "default_permissions", "nosuid", "nodev"):
        assert flag in flags


def test_unmount_command(mounted: Mount) -> None:
    """`lockfs unmount` returns once the mount is gone and its daemon has exited."""
    result = lockfs("unmount", str(mounted.dst))
    assert result.returncode == 0, result.stderr
    assert not mounted.is_mounted()
    assert not process_alive(mounted.daemon_pid)
    assert os.listdir(mounted.dst) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(mounted: Mount, signum: int) -> None:
    """SIGTERM (systemd stop, docker stop) or SIGINT ends the daemon and removes the mount."""
    client(mounted, 'write("kept", "data")')
    os.kill(mounted.daemon_pid, signum)
    wait_for(lambda: not mounted.is_mounted() and not process_alive(mounted.daemon_pid),
             what="the daemon to unmount and exit")
    assert os.listdir(mounted.dst) == []
    assert (mounted.src / "kept").read_text() == "data"
    assert "unmounted" in mounted.log_text()


def test_stale_mount_is_cleaned_up_and_remounted(mounted: Mount) -> None:
    """After the daemon was killed, mounting again on the same DST just works."""
    os.kill(mounted.daemon_pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(mounted.daemon_pid), what="the daemon to die")
    with pytest.raises(OSError) as dead:
        os.statvfs(mounted.dst)  # stat may still be answered from cached attributes
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    result = lockfs("mount", str(mounted.src), str(mounted.dst), "--log-file",
                    str(mounted.log))
    assert result.returncode == 0, result.stderr
    remounted = Mount(mounted.src, mounted.dst, mounted.log)
    try:
        assert remounted.daemon_pid != mounted.daemon_pid
        assert client(remounted, 'write("f", "again"); result = read("f")') == "again"
        with open("/proc/self/mountinfo") as mountinfo:
            here = [row for row in mountinfo if row.split()[4] == str(mounted.dst)]
        assert len(here) == 1
    finally:
        remounted.teardown()


def test_mount8_form(tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    """`lockfs SRC DST -o opts`, as mount(8)/mount.fuse3 call it for fuse.lockfs."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    log = tmp_path / "mount8.log"
    result = lockfs(str(src), str(dst), "-o", f"rw,hold=open,dev,suid,log_file={log}")
    assert result.returncode == 0, result.stderr
    mount = Mount(src, dst, log)
    try:
        assert mount.status()["hold"] == "open"
        with open("/proc/mounts") as mounts:
            options = next(row for row in mounts if row.split()[1] == str(dst)).split()[3]
        # mount.fuse3 spells out dev,suid for every fstab line that does not say
        # otherwise; a lockfs mount from fstab stays nosuid,nodev.
        assert "nosuid" in options.split(",") and "nodev" in options.split(",")
        assert client(mount, 'write("f", "x"); result = read("f")') == "x"
    finally:
        mount.teardown()
    assert not _mounted(dst)



def test_explicit_dev_and_suid_lift_the_defaults(mount_factory: Callable[..., Mount]) -> None:
    """`lockfs mount -o dev,suid` really mounts without nodev,nosuid (libfuse adds them
    unless it is told the opposite)."""
    mount = mount_factory(None, "-o", "dev,suid")
    with open("/proc/mounts") as mounts:
        options = next(row for row in mounts if row.split()[1] == str(mount.dst)).split()[3]
    assert "nosuid" not in options.split(",") and "nodev" not in options.split(",")
