"""Regression tests for conformance failures found with pjdfstest and stress tools.

Each test runs the same small program in a child process on a plain directory
and on a lockfs mount of another plain directory, and checks that both give
the same result (the backing filesystem's own behaviour). The pytest process
itself never opens anything through the mount.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import Mount, require


def run_child(script: str, directory: Path, timeout: float = 120) -> object:
    """Run ``script`` with ``directory`` as argv[1]; return the JSON it prints."""
    result = subprocess.run([sys.executable, "-c", script, str(directory)],
                            capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"child failed: {result.stderr.strip()}"
    return json.loads(result.stdout)


def native_and_mounted(script: str, tmp_path: Path, mount: Mount) -> tuple[object, object]:
    """The result of ``script`` on a plain directory and through ``mount``."""
    native = tmp_path / "native"
    native.mkdir()
    return run_child(script, native), run_child(script, mount.dst)


CHOWN_KEEPS_IDS_BUT_SETS_CTIME = r"""
import json, os, sys, time
d = sys.argv[1]
os.mkdir(f"{d}/dir")
os.mkfifo(f"{d}/fifo")
with open(f"{d}/file", "w") as f:
    f.write("x")
os.symlink("file", f"{d}/link")
result = {}
for name in ("dir", "fifo", "file", "link"):
    path = f"{d}/{name}"
    before = os.lstat(path)
    time.sleep(0.05)  # past the coarse clock tick that stamps ctime
    os.chown(path, -1, -1, follow_symlinks=False)
    after = os.lstat(path)
    result[name] = [after.st_ctime_ns > before.st_ctime_ns,
                    (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)]
print(json.dumps(result))
"""


def test_chown_minus_one_sets_ctime_like_backing_store(
        mounted: Mount, tmp_path: Path) -> None:
    """pjdfstest chown/00.t: chown(f, -1, -1) changes ctime on ext4 for every type."""
    native, through = native_and_mounted(CHOWN_KEEPS_IDS_BUT_SETS_CTIME, tmp_path, mounted)
    assert native == {name: [True, True] for name in ("dir", "fifo", "file", "link")}
    assert through == native


RENAME_WHITEOUT = r"""
import ctypes, json, os, stat, sys
d = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
with open(f"{d}/a", "w") as f:
    f.write("payload")
rc = libc.renameat2(-100, f"{d}/a".encode(), -100, f"{d}/b".encode(), 4)
err = ctypes.get_errno() if rc else 0
st = os.lstat(f"{d}/a")
with open(f"{d}/b") as f:
    moved = f.read()
print(json.dumps([rc, err, stat.S_ISCHR(st.st_mode), st.st_rdev, moved]))
"""


def test_rename_whiteout_passes_through(mounted: Mount, tmp_path: Path) -> None:
    """fsstress rwhiteout: RENAME_WHITEOUT moves the file and leaves a 0:0 char device."""
    native, through = native_and_mounted(RENAME_WHITEOUT, tmp_path, mounted)
    assert native == [0, 0, True, 0, "payload"]
    assert through == native
    assert (mounted.src / "b").read_text() == "payload"


APPEND_ONLY = r"""
import json, os, sys
p = f"{sys.argv[1]}/log"
result = []
for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_APPEND,
              os.O_WRONLY | os.O_APPEND | os.O_CREAT, os.O_WRONLY, os.O_RDWR | os.O_TRUNC):
    try:
        fd = os.open(p, flags, 0o644)
    except OSError as exc:
        result.append(exc.errno)
        continue
    os.write(fd, b"b\n")
    if flags & os.O_RDWR:
        os.pwrite(fd, b"c\n", 0)  # O_APPEND: lands at the end all the same
    os.close(fd)
    result.append("ok")
with open(p) as f:
    result.append(f.read())
print(json.dumps(result))
"""


def test_append_only_file_takes_appends(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """A chattr +a file accepts O_APPEND writes (and only those), as on ext4, also with
    the writeback cache, which wants read-write, non-append backing descriptors."""
    chattr = require("chattr")
    mounted = mount_factory(None, "-o", "writeback_cache")
    native = tmp_path / "native"
    native.mkdir()
    logs = [native / "log", mounted.src / "log"]
    for log in logs:
        log.write_text("a\n")
        subprocess.run([chattr, "+a", str(log)], check=True)
    try:
        expected = run_child(APPEND_ONLY, native)
        through = run_child(APPEND_ONLY, mounted.dst)
    finally:
        for log in logs:
            subprocess.run([chattr, "-a", str(log)], check=True)
    assert expected == ["ok", "ok", "ok", 1, 1, "a\nb\nb\nc\nb\n"]
    assert through == expected
    assert (mounted.src / "log").read_text() == expected[-1]


NOBODY = 65534
ACL_READS = r"""
import json
result = {}
for name in ("denied", "granted"):
    try:
        with open(name) as f:
            result[name] = f.read()
    except OSError as exc:
        result[name] = exc.errno
print(json.dumps(result))
"""


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """The system.posix_acl_access value for (tag, perm, id) entries, in order."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def test_posix_acls_are_enforced(mounted: Mount, tmp_path: Path) -> None:
    """An ACL entry that denies or grants a user is obeyed through the mount as on ext4."""
    undefined = 0xFFFFFFFF
    user_obj, user, group_obj, mask, other = 0x01, 0x02, 0x04, 0x10, 0x20
    deny = posix_acl((user_obj, 6, undefined), (user, 0, NOBODY), (group_obj, 4, undefined),
                     (mask, 4, undefined), (other, 4, undefined))
    grant = posix_acl((user_obj, 6, undefined), (user, 4, NOBODY), (group_obj, 0, undefined),
                      (mask, 4, undefined), (other, 0, undefined))
    native = tmp_path / "native"
    results = []
    for directory in (native, mounted.src):
        directory.mkdir(exist_ok=True)
        directory.chmod(0o755)
        for name, acl in (("denied", deny), ("granted", grant)):
            path = directory / name
            path.write_text(name)
            os.setxattr(path, "system.posix_acl_access", acl)
    for directory in (native, mounted.dst):
        done = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             sys.executable, "-c", ACL_READS],
            cwd=directory, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout))
    assert results[0] == {"denied": errno.EACCES, "granted": "granted"}
    assert results[1] == results[0]


SET_ACL = r"""
import json, os, stat, sys
os.setxattr("file", "system.posix_acl_access", bytes.fromhex(sys.argv[1]))
print(json.dumps(oct(stat.S_IMODE(os.stat("file").st_mode))))
"""


def test_acl_set_by_non_member_drops_setgid(mounted: Mount, tmp_path: Path) -> None:
    """xfstests generic/375: an owner outside the file's group who sets an ACL loses S_ISGID."""
    undefined = 0xFFFFFFFF
    acl = posix_acl((0x01, 7, undefined), (0x04, 7, undefined), (0x20, 7, undefined))
    native = tmp_path / "native"
    native.mkdir()
    results = []
    for directory, view in ((native, native), (mounted.src, mounted.dst)):
        directory.chmod(0o755)
        path = directory / "file"
        path.write_text("x")
        os.chown(path, NOBODY, 0)
        path.chmod(0o2755)
        done = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             sys.executable, "-c", SET_ACL, acl.hex()],
            cwd=view, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout))
    assert results == ["0o777", "0o777"]
    assert stat.S_IMODE((mounted.src / "file").stat().st_mode) == 0o777


INODE_NUMBERS = r"""
import json, os, sys, time
os.chdir(sys.argv[1])
with open("a", "w") as f:
    f.write("x")
os.link("a", "hard")
first = os.stat("a").st_ino
os.rename("a", "b")
after_rename = os.stat("b").st_ino
numbers = [first, after_rename]
for _ in range(5):
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")  # the kernel forgets the inodes; lookups hand numbers out again
    time.sleep(0.1)  # let the daemon take the FORGETs before the next LOOKUP
    numbers += [os.stat("b").st_ino, os.stat("hard").st_ino]
print(json.dumps(numbers))
"""


def test_inode_numbers_stay_after_a_handover(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """pjdfstest rename/09.t: a file keeps its st_ino across rename and forget, also on a
    mount that took over SRC from an earlier mount (which retires the cached inodes)."""
    earlier = mount_factory()
    run_child("import sys; open(sys.argv[1] + '/touched', 'w').close(); print('null')",
              earlier.dst)
    earlier.teardown()
    mount = mount_factory(earlier.src)
    native = tmp_path / "native"
    native.mkdir()
    for directory in (native, mount.dst):
        numbers = run_child(INODE_NUMBERS, directory)
        assert len(set(numbers)) == 1, numbers


WRITE_AND_CACHE = r"""
import os, sys
path = os.path.join(sys.argv[1], "data")
with open(path, "w") as f:
    f.write("old-data" * 512)
with open(path) as f:
    f.read()  # now in the kernel's page cache
print("null")
"""
DIRECT_THEN_BUFFERED = r"""
import json, os, sys
path = os.path.join(sys.argv[1], "data")
os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
with open(path) as f:
    print(json.dumps(f.read(8)))
"""


def test_buffered_open_after_o_direct_drops_cached_pages(mounted: Mount) -> None:
    """xfstests generic/451: after an O_DIRECT writer, a buffered open reads what the file
    holds, not pages cached before. The asynchronous direct write is stood in for by a
    change made in SRC under the same size and mtime (the kernel cannot see it either)."""
    run_child(WRITE_AND_CACHE, mounted.dst)
    backing = mounted.src / "data"
    before = backing.stat()
    backing.write_text("new-data" * 512)
    os.utime(backing, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert run_child(DIRECT_THEN_BUFFERED, mounted.dst) == "new-data"
