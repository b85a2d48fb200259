"""The passthrough on real mounts: each operation checked through DST and directly in SRC.

Where the backing filesystem decides the answer (errno, mode, ownership), the
same snippet also runs in a plain reference directory next to SRC, and the
two answers and the two resulting trees must be equal: that is what
"faithful passthrough" means to a user.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount, require, wait_for
from nsclient import NOBODY, client, run_snippet, same_everywhere

# ------------------------------------------------------------------ metadata


def test_statvfs_reports_the_backing_filesystem(mounted: Mount) -> None:
    """df on DST must show SRC's filesystem, not made-up numbers."""
    through, backing = os.statvfs(mounted.dst), os.statvfs(mounted.src)
    for field in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
        assert getattr(through, field) == getattr(backing, field), field


def test_readdir_lists_names_types_and_inodes(mounted: Mount) -> None:
    """ls -ai through DST shows SRC's entries with the numbers stat reports."""
    (mounted.src / "file").write_text("x")
    (mounted.src / "dir").mkdir()
    (mounted.src / "link").symlink_to("file")
    os.mkfifo(mounted.src / "fifo")
    entries = {entry.name: entry for entry in os.scandir(mounted.dst)}
    assert sorted(entries) == ["dir", "fifo", "file", "link"]
    assert entries["dir"].is_dir(follow_symlinks=False)
    assert entries["link"].is_symlink()
    assert entries["file"].is_file(follow_symlinks=False)
    for name, entry in entries.items():
        assert entry.inode() == os.lstat(mounted.dst / name).st_ino
        assert entry.inode() == os.lstat(mounted.src / name).st_ino
    assert os.stat(mounted.dst / "dir" / "..").st_ino == os.stat(mounted.dst).st_ino
    # '..' of the root is the root: nothing above SRC is reachable.
    assert os.stat(mounted.dst / ".." / mounted.dst.name).st_ino == os.stat(mounted.dst).st_ino


def test_big_readdir_lists_each_entry_once_while_files_are_created(mounted: Mount) -> None:
    """A 10,000-entry listing stays exact although the directory grows under it."""
    big = mounted.src / "big"
    big.mkdir()
    for index in range(10_000):
        (big / f"entry-{index:05d}").touch()
    listed = client(mounted, """
seen = []
with os.scandir("big") as entries:
    for count, entry in enumerate(entries):
        seen.append(entry.name)
        if count % 50 == 0:
            os.close(os.open(f"big/new-{count}", os.O_CREAT | os.O_WRONLY, 0o644))
result = seen
""")
    old = [name for name in listed if name.startswith("entry-")]
    assert len(old) == len(set(old)) == 10_000
    assert len(listed) == len(set(listed))
    assert len(os.listdir(mounted.dst / "big")) == 10_000 + 200


# ------------------------------------------------------------------ file data


def test_open_read_write_create_append_seek(pair: tuple[Mount, Path]) -> None:
    """Data written through DST is in SRC byte for byte, at the offsets asked for."""
    mount, _ref = pair
    result = same_everywhere(pair, """
write("f", "hello")
fd = os.open("f", os.O_WRONLY | os.O_APPEND)
os.write(fd, b" world")
os.lseek(fd, 0, os.SEEK_SET)
os.write(fd, b"!")                      # O_APPEND: still at the end
os.close(fd)
fd = os.open("f", os.O_RDWR)
os.lseek(fd, 6, os.SEEK_SET)
middle = os.read(fd, 5).decode()
os.pwrite(fd, b"J", 0)
end = os.lseek(fd, 0, os.SEEK_END)
os.lseek(fd, 20, os.SEEK_SET)
os.write(fd, b"tail")                   # a hole from 12 to 20
os.close(fd)
result = [middle, end, read("f"), err(os.open, "missing", os.O_RDONLY)]
""")
    assert result == ["world", 12, "Jello world!" + "\0" * 8 + "tail", "ENOENT"]
    assert (mount.src / "f").read_bytes() == b"Jello world!" + b"\0" * 8 + b"tail"
    assert os.stat(mount.dst / "f").st_size == 24


def test_truncate_by_path_and_by_handle(pair: tuple[Mount, Path]) -> None:
    """truncate(2) and ftruncate(2) both reach the backing file."""
    mount, _ref = pair
    result = same_everywhere(pair, """
write("f", "0123456789")
os.truncate("f", 4)
by_path = read("f")
fd = os.open("f", os.O_RDWR)
os.ftruncate(fd, 2)
by_handle = os.pread(fd, 100, 0).decode()
os.ftruncate(fd, 6)
os.close(fd)
result = [by_path, by_handle, read("f")]
""")
    assert result == ["0123", "01", "01\0\0\0\0"]
    assert (mount.src / "f").read_bytes() == b"01\0\0\0\0"
    assert os.stat(mount.dst / "f").st_size == 6


def test_open_then_unlink_keeps_the_data_reachable(mounted: Mount) -> None:
    """An unlinked file stays usable through the descriptor that was open on it."""
    result = client(mounted, """
fd = os.open("f", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"before")
os.unlink("f")
gone = err(os.stat, "f")
os.pwrite(fd, b"after!", 0)
result = [gone, os.pread(fd, 100, 0).decode(), os.fstat(fd).st_nlink, os.listdir(".")]
os.close(fd)
""")
    assert result == ["ENOENT", "after!", 0, []]
    assert os.listdir(mounted.src) == [".lockfs-lease"]


def test_open_flag_combinations_match_the_backing_store(pair: tuple[Mount, Path]) -> None:
    """O_CREAT, O_EXCL, O_TRUNC, O_APPEND against every access mode, as root."""
    same_everywhere(pair, OPEN_COMBINATIONS)


def test_open_flag_combinations_as_unprivileged_user(pair: tuple[Mount, Path]) -> None:
    """The same matrix as a user who owns the files but may not write a 0444 one."""
    mount, ref = pair
    for root in (mount.src, ref):
        os.chown(root, NOBODY, NOBODY)
    same_everywhere(pair, OPEN_COMBINATIONS, user=NOBODY)


OPEN_COMBINATIONS = """
outcome = {}
modes = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}
extras = {"": 0, "creat": os.O_CREAT, "creat_excl": os.O_CREAT | os.O_EXCL,
          "trunc": os.O_TRUNC, "creat_trunc": os.O_CREAT | os.O_TRUNC,
          "creat_excl_trunc": os.O_CREAT | os.O_EXCL | os.O_TRUNC,
          "append": os.O_APPEND, "creat_append": os.O_CREAT | os.O_APPEND,
          "directory": os.O_DIRECTORY}
os.mkdir("dir")
for target in ("have", "readonly", "none", "dir"):
    for mode_name, mode in modes.items():
        for extra_name, extra in extras.items():
            name = f"{target}-{mode_name}-{extra_name}"
            path = name if target != "dir" else "dir"
            if target in ("have", "readonly"):
                write(name, "data", mode=0o644)
                if target == "readonly":
                    os.chmod(name, 0o444)
            try:
                fd = os.open(path, mode | extra, 0o640)
            except OSError as exc:
                outcome[name] = errno.errorcode[exc.errno]
                continue
            size = os.fstat(fd).st_size
            wrote = err(os.write, fd, b"X")
            os.close(fd)
            outcome[name] = [size, wrote]
result = outcome
"""


def test_parallel_writers_in_one_client(mounted: Mount) -> None:
    """Four processes write their own files and one shared file at once; SRC has it all."""
    result = client(mounted, """
import random
CHUNK = 1 << 20
fd = os.open("shared", os.O_CREAT | os.O_WRONLY, 0o644)
os.close(fd)
children = []
for worker in range(4):
    pid = os.fork()
    if pid == 0:
        data = random.Random(worker).randbytes(4 * CHUNK)
        own = os.open(f"own-{worker}", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        shared = os.open("shared", os.O_WRONLY)
        for offset in range(0, 4 * CHUNK, 65536):
            os.write(own, data[offset:offset + 65536])
            if offset < CHUNK:
                os.pwrite(shared, data[offset:offset + 65536], worker * CHUNK + offset)
        os.fsync(own)
        os.close(own)
        os.close(shared)
        os._exit(0)
    children.append(pid)
assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
expected = {f"own-{w}": hashlib.sha256(random.Random(w).randbytes(4 * CHUNK)).hexdigest()
            for w in range(4)}
expected["shared"] = hashlib.sha256(b"".join(
    random.Random(w).randbytes(4 * CHUNK)[:CHUNK] for w in range(4))).hexdigest()
seen = {name: hashlib.sha256(open(name, "rb").read()).hexdigest() for name in expected}
result = [expected, seen]
""")
    expected, seen = result
    assert seen == expected
    for name, digest in expected.items():
        assert hashlib.sha256((mounted.src / name).read_bytes()).hexdigest() == digest, name


# ------------------------------------------------------------------ namespace operations


def test_mkdir_rmdir_unlink(pair: tuple[Mount, Path]) -> None:
    """Directories come and go in SRC; the usual refusals keep their errno."""
    mount, _ref = pair
    result = same_everywhere(pair, """
os.mkdir("d", 0o750)
write("d/f", "x")
steps = [err(os.rmdir, "d"), err(os.unlink, "d"), err(os.mkdir, "d"), err(os.rmdir, "d/f")]
os.unlink("d/f")
steps += [err(os.unlink, "d/f"), err(os.rmdir, "d"), err(os.rmdir, "d")]
os.mkdir("kept")
result = steps
""")
    assert result == ["ENOTEMPTY", "EISDIR", "EEXIST", "ENOTDIR", "ENOENT", "ok", "ENOENT"]
    assert sorted(os.listdir(mount.src)) == [".lockfs-lease", "kept"]
    assert os.listdir(mount.dst) == ["kept"]


def test_symlink_and_readlink(pair: tuple[Mount, Path]) -> None:
    """A symlink is stored as given and never followed by the daemon."""
    mount, _ref = pair
    same_everywhere(pair, """
write("target", "t")
os.symlink("target", "rel")
os.symlink("/etc/hostname", "abs")
os.symlink("dangling", "dangle")
result = [os.readlink("rel"), read("rel"), err(os.stat, "dangle"), err(os.symlink, "x", "rel")]
""")
    assert os.readlink(mount.dst / "abs") == "/etc/hostname"
    assert os.readlink(mount.src / "rel") == "target"
    assert stat.S_ISLNK(os.lstat(mount.dst / "dangle").st_mode)


def test_hard_link_counts(pair: tuple[Mount, Path]) -> None:
    """link(2) shows in st_nlink and in shared inode numbers, through DST and in SRC."""
    mount, _ref = pair
    result = same_everywhere(pair, """
write("a", "shared")
os.link("a", "b")
os.mkdir("d")
os.link("a", "d/c")
counts = [os.stat("a").st_nlink, os.stat("b").st_ino == os.stat("a").st_ino]
os.unlink("a")
counts += [os.stat("b").st_nlink, read("d/c"), err(os.link, "d", "d2"), err(os.link, "b", "d/c")]
result = counts
""")
    assert result == [3, True, 2, "shared", "EPERM", "EEXIST"]
    assert os.stat(mount.dst / "b").st_nlink == os.stat(mount.src / "b").st_nlink == 2
    assert os.stat(mount.dst / "b").st_ino == os.stat(mount.dst / "d" / "c").st_ino


def test_rename_in_every_flavour(pair: tuple[Mount, Path]) -> None:
    """Plain rename, RENAME_NOREPLACE and RENAME_EXCHANGE, files and directories."""
    mount, _ref = pair
    result = same_everywhere(pair, """
write("a", "A"); write("b", "B"); os.mkdir("d"); os.mkdir("e"); write("e/x", "X")
steps = []
os.rename("a", "b")                                          # replaces b
steps.append([read("b"), err(os.stat, "a")])
steps.append(err(renameat2, "b", "e/x", RENAME_NOREPLACE))   # EEXIST
renameat2("b", "d/b", RENAME_NOREPLACE)
renameat2("d/b", "e/x", RENAME_EXCHANGE)                     # swap file contents
steps.append([read("d/b"), read("e/x")])
renameat2("d", "e", RENAME_EXCHANGE)                         # swap directories
steps.append([sorted(os.listdir("d")), sorted(os.listdir("e"))])
steps.append(err(renameat2, "d", "missing", RENAME_EXCHANGE))
steps.append(err(renameat2, "d", "z", RENAME_NOREPLACE | RENAME_EXCHANGE))
steps.append(err(renameat2, "d", "z", RENAME_WHITEOUT | 64))
steps.append(err(os.rename, "d", "d/inside"))
os.rename("e", "d/e2")                                       # directory into another
result = steps
""")
    assert result == [["A", "ENOENT"], "EEXIST", ["X", "A"], [["x"], ["b"]], "ENOENT",
                      "EINVAL", "EINVAL", "EINVAL"]
    assert sorted(os.listdir(mount.src / "d")) == ["e2", "x"]
    assert os.listdir(mount.dst / "d" / "e2") == ["b"]


def test_fifo_socket_and_device_nodes(pair: tuple[Mount, Path]) -> None:
    """mknod makes fifos, sockets and (as root) devices; a fifo carries data."""
    mount, _ref = pair
    same_everywhere(pair, """
os.mkfifo("fifo", 0o640)
os.mknod("sock", stat.S_IFSOCK | 0o600)
os.mknod("null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
reader = os.open("fifo", os.O_RDONLY | os.O_NONBLOCK)
writer = os.open("fifo", os.O_WRONLY)
os.write(writer, b"through the fifo")
got = os.read(reader, 100).decode()
os.close(writer); os.close(reader)
server = socket.socket(socket.AF_UNIX)
server.bind("bound")
result = [got, err(os.open, "null", os.O_RDONLY)]   # nodev: EACCES through DST
server.close()
result[1] = result[1] in ("ok", "EACCES")
""")
    kinds = {name: os.lstat(mount.src / name).st_mode for name in ("fifo", "sock", "null",
                                                                   "bound")}
    assert stat.S_ISFIFO(kinds["fifo"]) and stat.S_IMODE(kinds["fifo"]) == 0o640
    assert stat.S_ISSOCK(kinds["sock"]) and stat.S_ISSOCK(kinds["bound"])
    assert stat.S_ISCHR(kinds["null"])
    assert os.lstat(mount.dst / "null").st_rdev == os.makedev(1, 3)


# ------------------------------------------------------------------ attributes


def test_chmod_and_chown_as_root(pair: tuple[Mount, Path]) -> None:
    """Mode bits (setuid included) and ownership land in SRC; chown leaves symlinks' targets."""
    mount, _ref = pair
    same_everywhere(pair, """
write("f", "x")
os.chmod("f", 0o4751)
write("g", "y")
os.chown("g", 1234, 5678)
os.symlink("f", "link")
os.chown("link", 4321, 8765, follow_symlinks=False)
os.mkdir("d")
os.chmod("d", 0o1777)
fd = os.open("h", os.O_CREAT | os.O_WRONLY, 0o600)
os.fchmod(fd, 0o604)
os.fchown(fd, 42, 43)
os.close(fd)
result = [info(name) for name in ("f", "g", "link", "d", "h")]
""")
    assert stat.S_IMODE(os.stat(mount.src / "f").st_mode) == 0o4751
    assert (os.stat(mount.src / "g").st_uid, os.stat(mount.src / "g").st_gid) == (1234, 5678)
    assert os.lstat(mount.dst / "link").st_uid == 4321
    assert os.stat(mount.src / "f").st_uid == 0
    assert (os.stat(mount.dst / "h").st_uid, stat.S_IMODE(os.stat(mount.dst / "h").st_mode)) \
        == (42, 0o604)


def test_utimens_nanoseconds_now_and_omit(mounted: Mount) -> None:
    """Timestamps keep nanoseconds; UTIME_NOW and UTIME_OMIT act per field."""
    result = client(mounted, """
write("f", "x")
os.utime("f", ns=(1_000_000_123, 2_000_000_456))
exact = [os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns]
utimensat("f", UTIME_OMIT, (3, 789))
omit_atime = [os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns]
utimensat("f", UTIME_NOW, UTIME_OMIT)
now_atime = [os.stat("f").st_atime_ns > 10**18, os.stat("f").st_mtime_ns]
os.symlink("f", "link")
utimensat("link", (5, 5), (6, 6), follow=False)
link_times = [os.lstat("link").st_mtime_ns, os.stat("f").st_mtime_ns]
os.utime("f")                                    # both to now
result = [exact, omit_atime, now_atime, link_times, os.stat("f").st_mtime_ns > 10**18]
""")
    assert result == [[1_000_000_123, 2_000_000_456], [1_000_000_123, 3_000_000_789],
                      [True, 3_000_000_789], [6_000_000_006, 3_000_000_789], True]
    assert os.lstat(mounted.src / "link").st_mtime_ns == 6_000_000_006
    assert os.stat(mounted.src / "f").st_mtime_ns == os.stat(mounted.dst / "f").st_mtime_ns


def test_xattrs_and_their_flags(pair: tuple[Mount, Path]) -> None:
    """set/get/list/remove, XATTR_CREATE and XATTR_REPLACE fail as on the backing store."""
    mount, _ref = pair
    result = same_everywhere(pair, """
write("f", "x")
os.setxattr("f", "user.colour", b"blue")
steps = [err(os.setxattr, "f", "user.colour", b"red", os.XATTR_CREATE),
         err(os.setxattr, "f", "user.size", b"1", os.XATTR_REPLACE),
         err(os.setxattr, "f", "user.colour", b"green", os.XATTR_REPLACE),
         os.getxattr("f", "user.colour").decode(),
         err(os.getxattr, "f", "user.missing"),
         err(os.removexattr, "f", "user.missing"),
         err(os.setxattr, "f", "bogus.name", b"1"),
         sorted(os.listxattr("f"))]
os.setxattr("f", "user.big", b"v" * 4000)
os.setxattr("f", "user.gone", b"")
os.removexattr("f", "user.gone")
os.symlink("f", "link")
os.setxattr("link", "trusted.onlink", b"1", follow_symlinks=False)
steps.append(sorted(os.listxattr("link", follow_symlinks=False)))
steps.append(sorted(os.listxattr("f")))
result = steps
""")
    assert result == ["EEXIST", "ENODATA", "ok", "green", "ENODATA", "ENODATA", "ENOTSUP",
                      ["user.colour"], ["trusted.onlink"], ["user.big", "user.colour"]]
    assert os.getxattr(mount.src / "f", "user.big") == b"v" * 4000
    assert os.getxattr(mount.dst / "f", "user.colour") == b"green"
    assert os.listxattr(mount.src / "link", follow_symlinks=False) == ["trusted.onlink"]


# ------------------------------------------------------------------ users and permissions


def test_eacces_cases_as_unprivileged_user(pair: tuple[Mount, Path]) -> None:
    """A user without rights is refused exactly as on the backing filesystem."""
    mount, ref = pair
    for root in (mount.src, ref):
        for name, mode in (("closed", 0o755), ("open", 0o777), ("sticky", 0o1777),
                           ("private", 0o700)):
            (root / name).mkdir()
            (root / name).chmod(mode)
        for name, mode in (("secret", 0o600), ("readonly", 0o644), ("shared", 0o666),
                           ("closed/inside", 0o644), ("sticky/roots", 0o666)):
            (root / name).write_text("root's")
            (root / name).chmod(mode)
        (root / "mine").mkdir()
        os.chown(root / "mine", NOBODY, NOBODY)
    result = same_everywhere(pair, """
result = {
    "create in closed": err(write, "closed/new", "x"),
    "mkdir in closed": err(os.mkdir, "closed/d"),
    "symlink in closed": err(os.symlink, "x", "closed/l"),
    "mkfifo in closed": err(os.mkfifo, "closed/p"),
    "unlink in closed": err(os.unlink, "closed/inside"),
    "rename out of closed": err(os.rename, "closed/inside", "open/stolen"),
    "read secret": err(read, "secret"),
    "write readonly": err(write, "readonly", "y", os.O_WRONLY),
    "truncate readonly": err(os.truncate, "readonly", 0),
    "truncate shared": err(os.truncate, "shared", 1),
    "chmod readonly": err(os.chmod, "readonly", 0o777),
    "chown mine": err(os.chown, "mine", 0, 0),
    "utime set on shared": err(os.utime, "shared", (1, 1)),
    "utime now on shared": err(os.utime, "shared"),
    "utime now on readonly": err(os.utime, "readonly"),
    "unlink sticky": err(os.unlink, "sticky/roots"),
    "rename sticky": err(os.rename, "sticky/roots", "sticky/mine"),
    "list private": err(os.listdir, "private"),
    "enter private": err(os.stat, "private/x"),
    "link secret": err(os.link, "secret", "open/hard"),
    "xattr readonly": err(os.setxattr, "readonly", "user.x", b"1"),
    "create in open": err(write, "open/new", "x"),
    "mkdir in mine": err(os.mkdir, "mine/sub"),
    "access": [os.access(name, mode) for name in ("secret", "readonly", "shared", "closed")
               for mode in (os.R_OK, os.W_OK, os.X_OK, os.F_OK)],
}
""", user=NOBODY)
    assert result["create in closed"] == "EACCES"
    assert result["read secret"] == "EACCES"
    assert result["unlink sticky"] == "EPERM"
    assert result["chown mine"] == "EPERM"
    assert result["create in open"] == "ok"
    assert (mount.src / "readonly").read_text() == "root's"


def test_ownership_and_umask_as_unprivileged_user(pair: tuple[Mount, Path]) -> None:
    """New objects belong to the caller, with its umask applied exactly once."""
    mount, ref = pair
    for root in (mount.src, ref):
        root.chmod(0o777)
        (root / "setgid").mkdir()
        os.chown(root / "setgid", 0, 4242)
        (root / "setgid").chmod(0o2777)
    result = same_everywhere(pair, """
write("file", "x", mode=0o666)
os.mkdir("dir", 0o777)
os.symlink("file", "link")
os.mkfifo("fifo", 0o666)
os.mknod("sock", stat.S_IFSOCK | 0o666)
write("setgid/file", "x", mode=0o666)
os.mkdir("setgid/dir", 0o777)
os.mkdir("setgid/dir/deeper", 0o777)
result = {name: info(name) for name in ("file", "dir", "link", "fifo", "sock", "setgid/file",
                                        "setgid/dir", "setgid/dir/deeper")}
""", user=NOBODY, umask=0o027)
    assert result["file"]["mode"] == oct(stat.S_IFREG | 0o640)
    assert result["dir"]["mode"] == oct(stat.S_IFDIR | 0o750)
    assert result["fifo"]["mode"] == oct(stat.S_IFIFO | 0o640)
    for name in ("file", "dir", "link", "fifo", "sock"):
        assert (result[name]["uid"], result[name]["gid"]) == (NOBODY, NOBODY), name
        assert os.lstat(mount.src / name).st_uid == NOBODY
    for name in ("setgid/file", "setgid/dir", "setgid/dir/deeper"):
        assert result[name]["gid"] == 4242, name
    assert os.stat(mount.src / "setgid" / "dir").st_mode & stat.S_ISGID


SET_ID_FILES = {"suid": 0o4755, "sgid": 0o2755, "sgid-noexec": 0o2745, "both": 0o6755}
TRUNCATING_OPENS = """
# Open and close only: a write() would clear the bits on its own way.
for name in sorted(NAMES):
    os.close(os.open(name, os.O_WRONLY | os.O_TRUNC))
# create() of an existing name, with O_TRUNC
os.close(os.open("created-over", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
result = {name: oct(os.stat(name).st_mode) for name in sorted(NAMES) + ["created-over"]}
"""


@pytest.mark.parametrize("user", [NOBODY, 0], ids=["unprivileged", "root"])
def test_truncating_open_clears_set_id_bits_as_the_backing_store(
        pair: tuple[Mount, Path], user: int) -> None:
    """open(O_TRUNC) by a caller without CAP_FSETID clears set-user-ID, and
    set-group-ID where group execute is set; root's keeps them. (Found by
    test_differential.py: through FUSE the daemon has to do it.)"""
    mount, ref = pair
    names = {**SET_ID_FILES, "created-over": 0o4755}
    for root in (mount.src, ref):
        root.chmod(0o777)
        for name, mode in names.items():
            (root / name).write_text("old")
            os.chown(root / name, NOBODY, NOBODY)
            (root / name).chmod(mode)
    code = TRUNCATING_OPENS.replace("NAMES", repr(list(SET_ID_FILES)))
    result = same_everywhere(pair, code, user=user)
    if user == NOBODY:
        assert result["both"] == oct(stat.S_IFREG | 0o755)
        assert result["sgid-noexec"] == oct(stat.S_IFREG | 0o2745)
    else:
        assert result["both"] == oct(stat.S_IFREG | 0o6755)


def test_fsync_fdatasync_and_fsyncdir_reach_the_backing_store(mounted: Mount) -> None:
    """Each sync call of a client makes the daemon sync the backing file before answering."""
    strace = require("strace")
    pid = mounted.daemon_pid
    trace = mounted.log.with_name("fsync.trace")
    tracer = subprocess.Popen([strace, "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o",
                               str(trace), "-p", str(pid)],
                              stderr=subprocess.PIPE, text=True)
    try:
        threads = len(os.listdir(f"/proc/{pid}/task"))
        wait_for(lambda: _traced_threads(pid) >= threads, what="strace to attach")
        client(mounted, """
fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, b"durable")
os.fsync(fd)
os.write(fd, b"!")
os.fdatasync(fd)
os.close(fd)
os.mkdir("d")
dfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY)
os.fsync(dfd)
os.close(dfd)
""")
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    calls = trace.read_text()
    assert calls.count("fsync(") >= 2, calls  # the file and the directory
    assert "fdatasync(" in calls, calls
    assert " = -1" not in calls, calls
    assert (mounted.src / "f").read_bytes() == b"durable!"


def _traced_threads(pid: int) -> int:
    """How many of ``pid``'s threads have a tracer attached."""
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as status:
            tracer = next(line for line in status if line.startswith("TracerPid:"))
        count += int(tracer.split()[1]) != 0
    return count


FILL_UP = """
fd = os.open("big", os.O_CREAT | os.O_WRONLY, 0o644)
written, error = 0, None
try:
    for _ in range(64):
        written += os.write(fd, b"x" * 65536)
except OSError as exc:
    error = errno.errorcode[exc.errno]
sync = err(os.fsync, fd)
os.close(fd)
result = [error, written, sync, os.stat("big").st_size]
"""


def test_a_full_disk_fails_the_write_as_on_the_backing_store(
        public_dir: Path, mount_factory: Callable[..., Mount]) -> None:
    """ENOSPC must come from write(), where applications (PostgreSQL extending a
    relation) handle it, not only later from fsync (where PostgreSQL panics);
    and the size seen through DST must be SRC's."""
    src, dst, ref = public_dir / "src", public_dir / "dst", public_dir / "ref"
    for path in (src, dst, ref):
        path.mkdir()
    for path in (src, ref):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "lockfs-full", str(path)],
                       check=True)
    try:
        mount = mount_factory(src, dst=dst)
        through_mount = client(mount, FILL_UP)
        plain = run_snippet(ref, FILL_UP)
        assert plain[0] == "ENOSPC"
        assert through_mount[0] == "ENOSPC"
        assert through_mount[3] == os.stat(src / "big").st_size
        mount.teardown()
    finally:
        for path in (src, ref):
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_odd_names_pass_through_unchanged(mounted: Mount) -> None:
    """Names are bytes: not UTF-8, 255 bytes long, with newlines or spaces."""
    names = [b"\xff\xfe-not-utf8", b"n" * 255, b"line\nbreak", b" spaced out ", b"-dash",
             "ünïcödé".encode()]
    (mounted.src / os.fsdecode(b"made-in-src-\xff")).write_text("x")
    result = client(mounted, f"""
names = {names!r}
for name in names:
    write(os.fsdecode(name), "data")
os.rename(os.fsdecode(names[0]), os.fsdecode(b"renamed-\\xfe"))
long_target = "t" * 4000
os.symlink(long_target, "long-link")
result = [err(write, "m" * 256, "x"), os.readlink("long-link") == long_target,
          sorted(os.fsencode(n).hex() for n in os.listdir("."))]
""")
    expected = sorted([*names[1:], b"renamed-\xfe", b"made-in-src-\xff", b"long-link"])
    assert result[:2] == ["ENAMETOOLONG", True]
    assert result[2] == sorted(name.hex() for name in expected)
    assert sorted(os.listdir(os.fsencode(mounted.dst))) == expected
    assert sorted(name for name in os.listdir(os.fsencode(mounted.src))
                  if name != b".lockfs-lease") == expected
