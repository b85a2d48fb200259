"""The passthrough's promises beyond single operations, on real mounts.

No request reaches outside SRC; the lockfile stays invisible; caches never hide
a change made through the mount; forgotten inodes give their descriptors back;
failing requests, a mount point inside SRC and a removed SRC leave the daemon
serving.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
import trio
from conftest import LOCKFS, Agent, Mount, require, wait_for
from nsclient import client, daemon_fds, start_snippet, wait_free

from lockfs.inodes import FOREIGN_BASE, InodeTable
from lockfs.ops import Operations

# ------------------------------------------------------------------ escape attempt

SWAPPER = r"""
import ctypes, os, sys
src, outside, stop = sys.argv[1:4]
libc = ctypes.CDLL(None, use_errno=True)
d, real, link = (os.path.join(src, name).encode() for name in ("d", "d.real", "d.link"))
rounds = 0
while not os.path.exists(stop):
    target = outside if rounds % 2 else os.path.relpath(outside, src)
    # 1: move the directory away and put a symlink to OUTSIDE under its name.
    os.rename(d, real)
    os.symlink(target, d)
    os.unlink(d)
    os.rename(real, d)
    # 2: atomic swaps, so that the name always exists, once as each kind.
    os.symlink(target, link)
    libc.renameat2(-100, d, -100, link, 2)
    libc.renameat2(-100, d, -100, link, 2)
    os.unlink(link)
    rounds += 1
print(rounds)
"""

ATTACKER = """
import subprocess
# Hide the real OUTSIDE from this client: a symlink the *kernel* follows on the
# client's side lands on this empty tmpfs; only a daemon that resolved a path
# itself could reach the real directory.
subprocess.run(["mount", "-t", "tmpfs", "none", sys.argv[3]], check=True)
# The kernel may follow a cached symlink entry for up to the entry timeout, so
# keep going until the daemon has also served creates in the real directory.
import itertools, time
deadline = time.monotonic() + 60

def served_in_real_directory():
    # Never follow the name: for moments it is a symlink into the tmpfs.
    try:
        fd = os.open(REAL_D, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # moved away, or a symlink right now
        return False
    try:
        return any(n.startswith("new-") for n in os.listdir(fd))
    finally:
        os.close(fd)

created = 0
for i in itertools.count():
    if i >= 1500 and (time.monotonic() > deadline or served_in_real_directory()):
        break
    for action in (lambda: write(f"d/new-{i}", "x"),
                   lambda: write("d/victim", "pwned", os.O_WRONLY | os.O_TRUNC),
                   lambda: os.mkdir(f"d/dir-{i}"),
                   lambda: os.chmod("d/victim", 0o777),
                   lambda: os.truncate("d/victim", 0),
                   lambda: os.setxattr("d/victim", "user.pwned", b"1"),
                   lambda: os.rename("d/victim", f"d/moved-{i}"),
                   lambda: os.unlink("d/victim"),
                   lambda: os.symlink("x", f"d/sym-{i}")):
        created += err(action) == "ok"
result = created
"""


def test_concurrent_symlink_swaps_never_lead_outside_src(public_dir: Path,
                                                          mount_factory: Callable[..., Mount]
                                                          ) -> None:
    """A name swapped between a directory and a symlink to OUTSIDE in the backing
    store, while a client creates and changes files through that name, never
    makes the daemon touch OUTSIDE."""
    src, dst, outside = public_dir / "src", public_dir / "dst", public_dir / "outside"
    for path in (src, dst, outside, src / "d"):
        path.mkdir()
    (outside / "victim").write_text("untouched")
    (outside / "victim").chmod(0o644)
    before = sorted(os.listdir(outside))
    mount = mount_factory(src, dst=dst)
    stop = public_dir / "stop"
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(src), str(outside),
                                str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        code = (ATTACKER.replace("sys.argv[3]", repr(str(outside)))
                .replace("REAL_D", repr(str(src / "d"))))
        created = client(mount, code)
    finally:
        stop.touch()
        rounds = int(swapper.communicate(timeout=30)[0])
    assert swapper.returncode == 0
    assert rounds > 0 and created > 0
    assert sorted(os.listdir(outside)) == before
    assert (outside / "victim").read_text() == "untouched"
    assert oct((outside / "victim").stat().st_mode & 0o7777) == oct(0o644)
    assert os.listxattr(outside / "victim") == []
    assert any(name.startswith("new-") for name in os.listdir(src / "d"))


# ------------------------------------------------------------------ the lockfile


def test_lockfile_is_invisible_and_untouchable(mounted: Mount) -> None:
    """The lease's lockfile cannot be seen, opened, made, replaced or linked through DST."""
    lockfile = mounted.src / ".lockfs-lease"
    assert lockfile.is_file()
    inode = lockfile.stat().st_ino
    listing = subprocess.run(["ls", "-a", str(mounted.dst)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert listing == [".", ".."]
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.dst / ".lockfs-lease")
    result = client(mounted, """
write("other", "x")
os.mkdir("sub")
result = {
    "open": err(os.open, ".lockfs-lease", os.O_RDONLY),
    "create": err(write, ".lockfs-lease", "x"),
    "create excl": err(os.open, ".lockfs-lease", os.O_CREAT | os.O_EXCL | os.O_WRONLY),
    "mkdir": err(os.mkdir, ".lockfs-lease"),
    "symlink": err(os.symlink, "other", ".lockfs-lease"),
    "mkfifo": err(os.mkfifo, ".lockfs-lease"),
    "rename onto": err(os.rename, "other", ".lockfs-lease"),
    "exchange onto": err(renameat2, "other", ".lockfs-lease", RENAME_EXCHANGE),
    "rename away": err(os.rename, ".lockfs-lease", "stolen"),
    "link onto": err(os.link, "other", ".lockfs-lease"),
    "unlink": err(os.unlink, ".lockfs-lease"),
    "xattr": err(os.setxattr, ".lockfs-lease", "user.x", b"1"),
    "same name deeper": err(write, "sub/.lockfs-lease", "allowed"),
}
""")
    refused = {key: value for key, value in result.items() if key != "same name deeper"}
    assert all(value != "ok" for value in refused.values()), refused
    assert result["open"] == result["unlink"] == result["rename away"] == "ENOENT"
    assert result["create"] == result["rename onto"] == result["link onto"] == "EPERM"
    assert result["same name deeper"] == "ok"
    assert lockfile.is_file() and lockfile.stat().st_ino == inode
    assert sorted(os.listdir(mounted.dst)) == ["other", "sub"]


def test_directories_above_a_lockfile_in_a_subdirectory_stay_put(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """With --lockfile below SRC's root, the directories on its path cannot be moved:
    the lease would otherwise lock a file at a path that no longer exists."""
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    lockfile = src / "sub" / "deeper" / ".lease"
    mount = mount_factory(src, "--lockfile", str(lockfile))
    inode = lockfile.stat().st_ino
    result = client(mount, """
os.mkdir("other")
result = [err(os.rename, "sub", "moved"), err(os.rename, "sub/deeper", "other/deeper"),
          err(renameat2, "other", "sub", RENAME_EXCHANGE), err(os.rmdir, "sub/deeper"),
          err(os.rename, "other", "sub/other"), err(write, "sub/deeper/file", "x")]
""")
    assert result == ["EBUSY", "EBUSY", "EBUSY", "ENOTEMPTY", "ok", "ok"]
    assert lockfile.stat().st_ino == inode
    assert client(mount, 'write("after", "x"); result = read("after")') == "x"


# ------------------------------------------------------------------ caching


def test_change_through_the_mount_is_seen_at_once(mounted: Mount) -> None:
    """Within the attribute/entry timeouts, changes made through DST show immediately."""
    result = client(mounted, """
seen = []
write("f", "one")
seen.append([read("f"), os.stat("f").st_size])
write("f", "three", os.O_WRONLY)
seen.append([read("f"), os.stat("f").st_size])
fd = os.open("f", os.O_WRONLY | os.O_APPEND)
os.write(fd, b"+more")
os.close(fd)
seen.append([read("f"), os.stat("f").st_size])
os.truncate("f", 2)
seen.append([read("f"), os.stat("f").st_size])
os.chmod("f", 0o600)
seen.append(oct(os.stat("f").st_mode & 0o777))
os.rename("f", "g")
seen.append([err(os.stat, "f"), sorted(os.listdir("."))])
os.link("g", "h")
seen.append(os.stat("g").st_nlink)
os.unlink("g")
seen.append([os.stat("h").st_nlink, err(os.stat, "g")])
write("g", "new file under an old name")
seen.append(read("g"))
result = seen
""")
    assert result == [["one", 3], ["three", 5], ["three+more", 10], ["th", 2], "0o600",
                      ["ENOENT", ["g"]], 2, [1, "ENOENT"], "new file under an old name"]
    # Another process (this one) sees the same at once, through the shared kernel cache.
    assert os.stat(mounted.dst / "h").st_size == 2
    assert os.stat(mounted.dst / "g").st_size == len("new file under an old name")


def test_change_made_in_src_shows_within_the_timeout(mounted: Mount) -> None:
    """Changes behind the mount's back are not supported, but new names and modes
    show within the one-second entry/attribute timeouts."""
    (mounted.src / "f").write_text("old")
    assert os.stat(mounted.dst / "f").st_mode & 0o777 == 0o644
    (mounted.src / "f").chmod(0o600)
    (mounted.src / "new").touch()
    wait_for(lambda: os.stat(mounted.dst / "f").st_mode & 0o777 == 0o600, timeout=10,
             what="the new mode through DST")
    wait_for(lambda: "new" in os.listdir(mounted.dst), timeout=10, what="the new name")
    assert client(mounted, 'result = read("new")') == ""


LISTING_CLIENT = """
for name in os.listdir("."):
    os.stat(name)  # every object is known to the kernel and the daemon
listing = os.scandir(".")
first = next(listing)  # the daemon took its snapshot and sent the first batch
print("listing", flush=True)
sys.stdin.readline()
names = [first.name] + [entry.name for entry in listing]
target = sys.argv[3]
result = {"names": sorted(names), "content": read(target), "ino": os.stat(target).st_ino}
"""


def test_listing_replies_with_the_object_a_name_leads_to_now(mounted: Mount) -> None:
    """A name replaced in SRC while a big listing is under way is answered with the
    object it names when its entry is sent, not the one of the snapshot (readdir
    replies with entries the kernel links at once, like lookups)."""
    directory = mounted.src / "d"
    directory.mkdir()
    for index in range(3000):
        (directory / f"f{index:04d}").write_text("old")
    names = os.listdir(directory)  # the backing store's order: the snapshot's order
    target = names[-1]  # sent in the listing's last batch
    code = LISTING_CLIENT.replace("sys.argv[3]", repr(target))
    lister = start_snippet(mounted.dst / "d", code)
    assert lister.stdin is not None and lister.stdout is not None
    try:
        assert lister.stdout.readline() == "listing\n"
        (directory / "replacement").write_text("new")
        os.rename(directory / "replacement", directory / target)
        lister.stdin.write("go\n")
        lister.stdin.flush()
        out, _ = lister.communicate(timeout=60)
    finally:
        if lister.poll() is None:
            lister.kill()
    assert lister.returncode == 0
    result = json.loads(out.splitlines()[-1])
    assert result["names"] == sorted(names)
    assert result["content"] == "new"
    assert result["ino"] == (directory / target).stat().st_ino
    wait_free(mounted)


# ------------------------------------------------------------------ forget


def test_forgotten_inodes_give_their_descriptors_back(mounted: Mount) -> None:
    """After drop_caches the kernel forgets inodes and the daemon closes their descriptors."""
    many = mounted.src / "many"
    many.mkdir()
    for index in range(3000):
        (many / f"f{index}").touch()
    baseline = daemon_fds(mounted)
    for name in os.listdir(mounted.dst / "many"):
        os.stat(mounted.dst / "many" / name)
    assert daemon_fds(mounted) >= baseline + 3000

    def dropped() -> bool:
        """Ask the kernel to drop unused dentries and inodes, then count again."""
        Path("/proc/sys/vm/drop_caches").write_text("2")
        return daemon_fds(mounted) < baseline + 50

    wait_for(dropped, timeout=30, what="the daemon to close forgotten descriptors")
    assert len(os.listdir(mounted.dst / "many")) == 3000


# ------------------------------------------------------------------ failures


def test_failing_requests_leave_the_mount_serving(mounted: Mount) -> None:
    """Refused and impossible requests answer an errno; the daemon keeps serving."""
    result = client(mounted, """
os.mkdir("d"); write("d/f", "x"); write("f", "x")
result = [err(os.rmdir, "d"), err(os.mkdir, "d"), err(os.open, "nope", os.O_RDONLY),
          err(os.link, "d", "d2"), err(renameat2, "f", "d", RENAME_WHITEOUT | 64),
          err(os.setxattr, "f", "nonsense.x", b"1"), err(os.truncate, "f", 1 << 62),
          err(os.open, "d", os.O_WRONLY), err(os.mkdir, "x" * 300),
          err(os.readlink, "f"), err(os.getxattr, "f", "user.none"),
          err(os.rename, "d", "d/d")]
write("after", "still serving")
result.append(read("after"))
""")
    assert result == ["ENOTEMPTY", "EEXIST", "ENOENT", "EPERM", "EINVAL", "ENOTSUP",
                      result[6], "EISDIR", "ENAMETOOLONG", "EINVAL", "ENODATA", "EINVAL",
                      "still serving"]
    assert result[6] in ("EFBIG", "EINVAL")
    assert mounted.status()["daemon_pid"] == mounted.daemon_pid
    assert "Traceback" not in mounted.log_text()


class _OpenGate:
    """The smallest gate: admits everyone, hides nothing (the lease is not under test)."""

    cache_epoch = 0

    def admit(self, ctx: object, what: str) -> object:
        return None

    def handle_opened(self, token: object, handle: int) -> None: ...

    def dir_handle_opened(self, ctx: object, handle: int) -> None: ...

    def handle_closed(self, handle: int) -> None: ...

    def is_hidden(self, parent_key: tuple[int, int], name: bytes) -> bool:
        return False

    def status(self) -> bytes:
        return b"{}"


async def test_an_internal_error_becomes_eio_with_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bug inside a handler must answer EIO, never end the daemon (NOTES.md).

    No request the kernel sends reaches such a bug on purpose, so the handler is
    called directly: readdir of a handle that was never opened.
    """
    root_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    operations = Operations(InodeTable(root_fd), _OpenGate(), entry_timeout=1,
                            attr_timeout=1, keep_cache=False, writeback=False)
    with caplog.at_level(logging.ERROR, logger="lockfs.ops"), \
            pytest.raises(pyfuse3.FUSEError) as raised:
        await operations.readdir(12345, 0, None)  # type: ignore[arg-type]
    assert raised.value.errno == errno.EIO
    assert "internal error in readdir" in caplog.text
    assert "Traceback" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await operations.fsync(987654, False)
    assert raised.value.errno == errno.EBADF
    operations.table.close_all()
    await trio.lowlevel.checkpoint()


def test_removed_src_fails_requests_and_keeps_the_daemon(mounted: Mount) -> None:
    """rm -rf SRC under a live mount: requests fail cleanly, status and unmount work."""
    (mounted.src / "d").mkdir()
    (mounted.src / "f").write_text("x")
    os.stat(mounted.dst / "d")
    shutil.rmtree(mounted.src)
    result = client(mounted, """
result = [err(write, "new", "x"), err(os.mkdir, "newdir"), err(os.stat, "f"),
          err(os.open, "d/x", os.O_CREAT | os.O_WRONLY), err(os.statvfs, ".")]
""")
    assert result[:3] == ["ENOENT", "ENOENT", "ENOENT"]
    assert result[3] in ("ENOENT", "ESTALE")
    assert result[4] == "ok"
    assert mounted.status()["daemon_pid"] == mounted.daemon_pid
    assert os.listdir(mounted.dst) == []
    assert not mounted.src.exists()


def test_removed_src_under_a_holder(mounted: Mount, agents: Callable[..., Agent]) -> None:
    """A client that already holds the lease sees its requests fail, not the daemon die."""
    (mounted.src / "d").mkdir()
    holder = agents()
    fd = holder.call("open", str(mounted.dst / "d" / "f"), "w")
    shutil.rmtree(mounted.src)
    assert holder.errno_of("open", str(mounted.dst / "d" / "g"), "w") == errno.ENOENT
    assert holder.errno_of("mkdir", str(mounted.dst / "new")) == errno.ENOENT
    assert holder.errno_of("rename", str(mounted.dst / "d" / "f"),
                           str(mounted.dst / "d" / "h")) == errno.ENOENT
    assert holder.call("write", fd, "still written to the open file") > 0
    holder.call("close", fd)
    assert mounted.status()["daemon_pid"] == mounted.daemon_pid


# ------------------------------------------------------------------ a mount point inside SRC


def test_mount_point_inside_src_is_served_with_unique_inode_numbers(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """A tmpfs mounted inside SRC is served; its inode numbers come from a private range."""
    src = tmp_path / "src"
    inner = src / "inner"
    inner.mkdir(parents=True)
    (src / "plain").write_text("on SRC's filesystem")
    subprocess.run(["mount", "-t", "tmpfs", "lockfs-test", str(inner)], check=True)
    try:
        (inner / "a").write_text("on tmpfs")
        (inner / "sub").mkdir()
        os.link(inner / "a", inner / "a-link")
        mount = mount_factory(src)
        numbers = {name: os.lstat(mount.dst / "inner" / name).st_ino
                   for name in ("a", "sub", "a-link")}
        inner_ino = os.stat(mount.dst / "inner").st_ino
        assert all(number >= FOREIGN_BASE for number in [*numbers.values(), inner_ino])
        assert numbers["a"] == numbers["a-link"]
        assert len({numbers["a"], numbers["sub"], inner_ino}) == 3
        assert os.stat(mount.dst / "plain").st_ino == os.stat(src / "plain").st_ino
        assert os.stat(mount.dst / "inner" / "..").st_ino == os.stat(mount.dst).st_ino
        result = client(mount, """
write("inner/sub/new", "written through DST")
os.rename("inner/a", "inner/sub/a")
result = [read("inner/sub/new"), read("inner/sub/a"), err(os.rename, "plain", "inner/plain"),
          err(os.link, "plain", "inner/hard")]
""")
        assert result == ["written through DST", "on tmpfs", "EXDEV", "EXDEV"]
        assert (inner / "sub" / "new").read_text() == "written through DST"
        assert os.lstat(mount.dst / "inner" / "sub" / "a").st_ino == numbers["a"]
        # Numbers stay the same after the kernel forgot the inodes (ls -i, tar, du).
        known = daemon_fds(mount)

        def forgotten() -> bool:
            """Drop the kernel's unused inodes; some of the tmpfs ones must go."""
            Path("/proc/sys/vm/drop_caches").write_text("2")
            return daemon_fds(mount) < known

        wait_for(forgotten, timeout=30, what="the kernel to forget the tmpfs inodes")
        assert os.lstat(mount.dst / "inner" / "sub" / "a").st_ino == numbers["a"]
        assert os.stat(mount.dst / "inner").st_ino == inner_ino
    finally:
        subprocess.run(["umount", "-l", str(inner)], check=False)


def test_client_helper_leaves_the_lease_free(mounted: Mount) -> None:
    """The helper every test here relies on really hands the lease back."""
    client(mounted, 'write("f", "x")')
    wait_free(mounted)
    assert mounted.status()["holder"] is None


def test_descriptor_exhaustion_fails_loudly_and_passes(mounted: Mount) -> None:
    """With the daemon out of descriptors, `ls` gets EMFILE, never a silently short list;
    once descriptors are free again everything works."""
    prlimit = require("prlimit")
    many = mounted.src / "many"
    many.mkdir()
    for index in range(300):
        (many / f"f{index:03d}").touch()
    pid = str(mounted.daemon_pid)
    soft, hard = (int(value) for value in subprocess.run(
        [prlimit, "--pid", pid, "--nofile", "--raw", "--noheadings", "--output=SOFT,HARD"],
        capture_output=True, text=True, check=True).stdout.split())
    subprocess.run([prlimit, "--pid", pid, f"--nofile={daemon_fds(mounted) + 60}:{hard}"],
                   check=True)
    try:
        try:
            listed = os.listdir(mounted.dst / "many")
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        else:
            assert len(listed) == 300
    finally:
        subprocess.run([prlimit, "--pid", pid, f"--nofile={soft}:{hard}"], check=True)
    assert sorted(os.listdir(mounted.dst / "many")) == sorted(os.listdir(many))
    assert client(mounted, 'write("after", "fine"); result = read("after")') == "fine"
    assert "out of file descriptors" in mounted.log_text()


SLOW_FSYNC_CLIENT = """
write("f", "data")
fd = os.open("f", os.O_WRONLY)
print("ready", flush=True)
sys.stdin.readline()
os.fsync(fd)
os.close(fd)
result = "synced"
"""


def test_a_hanging_fsync_does_not_stall_the_daemon(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """fsync runs in a worker thread: while it hangs, the daemon keeps answering.

    SRC is itself a lockfs mount whose daemon is stopped with SIGSTOP, so the
    outer daemon's fsync of a file in it hangs until SIGCONT, no timing involved.
    """
    inner = mount_factory()
    outer = mount_factory(inner.dst, "--lockfile", str(tmp_path / "outer.lease"))
    fsyncing = start_snippet(outer.dst, SLOW_FSYNC_CLIENT)
    assert fsyncing.stdin is not None and fsyncing.stdout is not None
    try:
        assert fsyncing.stdout.readline() == "ready\n"
        os.kill(inner.daemon_pid, signal.SIGSTOP)
        fsyncing.stdin.write("go\n")
        fsyncing.stdin.flush()
        wait_for(lambda: _in_syscall(outer.daemon_pid, {74, 75}),
                 what="the outer daemon to be inside fsync")
        status = subprocess.run([*LOCKFS, "status", "--json", str(outer.dst)],
                                capture_output=True, text=True, timeout=30, check=False)
        assert status.returncode == 0, status.stderr
        assert _in_syscall(outer.daemon_pid, {74, 75})  # still hanging: status did not wait
    finally:
        os.kill(inner.daemon_pid, signal.SIGCONT)
    out, _ = fsyncing.communicate(timeout=60)
    assert fsyncing.returncode == 0
    assert out.splitlines()[-1] == '"synced"'
    wait_free(outer)


def _in_syscall(pid: int, numbers: set[int]) -> bool:
    """Whether a thread of ``pid`` is blocked in one of the system calls ``numbers``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as syscall:
                first = syscall.read().split()[0]
        except (OSError, IndexError):
            continue
        if first.isdigit() and int(first) in numbers:
            return True
    return False
