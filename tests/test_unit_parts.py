"""Unit tests of the parts around the lease, on real /proc, real locks, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from lockfs.errors import UsageError
from lockfs.identity import Identities, UnknownCaller
from lockfs.inodes import InodeTable
from lockfs.lease import HoldMode
from lockfs.lockfile import LockFile
from lockfs.options import build_options, parse_option_list
from lockfs.watch import ProcessWatcher


def test_option_list_parsing_and_defaults() -> None:
    assert parse_option_list(["a,b=c", "d"]) == {"a": None, "b": "c", "d": None}
    options = build_options("/s", "/d", ["defaults,noauto,x-systemd.requires=foo,hold=open",
                                         "lockfile=/l,ro,_netdev"])
    assert options.hold is HoldMode.OPEN
    assert options.lockfile == "/l"
    fuse = options.libfuse_options()
    assert {"allow_other", "default_permissions", "nosuid", "nodev", "ro",
            "fsname=lockfs:/s", "subtype=lockfs"} <= fuse
    assert "noauto" not in fuse and "defaults" not in fuse


def test_flags_win_over_o_options_and_opposites_override_defaults() -> None:
    options = build_options("/s", "/d", ["hold=open,suid"], hold="process")
    assert options.hold is HoldMode.PROCESS
    assert "nosuid" not in options.libfuse_options()


@pytest.mark.parametrize(("given", "message"), [
    (["bogus"], "unknown mount option 'bogus'"),
    (["hold=forever"], "hold mode 'forever' is not one of"),
    (["lockfile"], "option 'lockfile' needs a value"),
])
def test_bad_options_are_refused_by_name(given: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_options("/s", "/d", given)


def test_identity_of_self_is_own_mount_namespace() -> None:
    caller = Identities().resolve(os.getpid())
    ns = os.stat("/proc/self/ns/mnt")
    assert (caller.client.ns_dev, caller.client.ns_ino) == (ns.st_dev, ns.st_ino)
    assert caller.tgid == os.getpid()
    with open("/proc/self/comm") as comm:
        assert caller.command == comm.read().strip()


def test_identity_fails_closed() -> None:
    identities = Identities()
    with pytest.raises(UnknownCaller, match="pid 0"):
        identities.resolve(0)
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(UnknownCaller, match="vanished"):
        identities.resolve(child.pid)


def test_identity_cache_drops_exited_process() -> None:
    identities = Identities()
    child = subprocess.Popen(["unshare", "-m", "sleep", "60"])
    try:
        comm = Path(f"/proc/{child.pid}/comm")
        while comm.read_text().strip() != "sleep":
            time.sleep(0.005)  # until unshare has moved into its namespace and exec'd
        first = identities.resolve(child.pid)
        assert identities.resolve(child.pid) is first  # cached
        assert first.client != identities.resolve(os.getpid()).client
    finally:
        child.kill()
        child.wait()
    with pytest.raises(UnknownCaller):
        identities.resolve(child.pid)


def test_ofd_lock_excludes_a_second_description(tmp_path) -> None:
    path = str(tmp_path / "lock")
    one, two = LockFile(path), LockFile(path)
    one.open()
    two.open()
    try:
        assert one.try_lock()
        one.write_record({"daemon_pid": 1})
        assert not two.try_lock()
        assert two.held_elsewhere()
        assert two.read_record() == {"daemon_pid": 1}
        one.unlock()
        assert not two.held_elsewhere()
        assert two.try_lock()
    finally:
        one.close()
        two.close()


def test_ofd_lock_dies_with_its_description(tmp_path) -> None:
    path = str(tmp_path / "lock")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from lockfs.lockfile import LockFile; l = LockFile(sys.argv[1]); "
        "l.open(); assert l.try_lock(); print('locked', flush=True); sys.stdin.read()"), path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    mine = LockFile(path)
    mine.open()
    try:
        assert not mine.try_lock()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert mine.try_lock()
    finally:
        mine.close()


async def test_watcher_reports_exit_once() -> None:
    exited: list[int] = []
    child = subprocess.Popen(["sleep", "60"])
    async with trio.open_nursery() as nursery:
        watcher = ProcessWatcher(nursery, exited.append)
        assert watcher.watch(child.pid)
        assert watcher.watch(child.pid)  # watching twice is one watch
        await trio.sleep(0)
        assert exited == []
        child.kill()
        child.wait()
        with trio.fail_after(10):
            while not exited:
                await trio.sleep(0.005)
    assert exited == [child.pid]
    assert len(watcher) == 0


def test_watcher_refuses_vanished_process() -> None:
    child = subprocess.Popen(["true"])
    child.wait()

    async def main() -> bool:
        async with trio.open_nursery() as nursery:
            return ProcessWatcher(nursery, lambda pid: None).watch(child.pid)

    assert trio.run(main) is False


def test_writeback_cache_is_opt_in() -> None:
    assert build_options("/s", "/d", []).writeback_cache is False
    assert build_options("/s", "/d", ["writeback_cache"]).writeback_cache is True


def test_mount8_dev_suid_do_not_lift_nosuid_nodev() -> None:
    fuse = build_options("/s", "/d", ["rw,dev,suid"], mount8=True).libfuse_options()
    assert {"nosuid", "nodev"} <= fuse
    explicit = build_options("/s", "/d", ["suid,dev"]).libfuse_options()
    assert "nosuid" not in explicit and "nodev" not in explicit


def test_atime_flavours_from_fstab_are_accepted_and_remount_is_refused() -> None:
    fuse = build_options("/s", "/d", ["defaults,relatime,nodiratime,strictatime"],
                         mount8=True).libfuse_options()
    assert not {"relatime", "nodiratime", "strictatime"} & fuse
    with pytest.raises(UsageError, match="remount is not supported"):
        build_options("/s", "/d", ["remount,rw"], mount8=True)


def test_inode_reopened_from_the_object_that_has_its_number_now(tmp_path: Path) -> None:
    """An entry whose descriptor was closed to save descriptors, whose file was then
    deleted behind the mount and its inode number reused by a new file, is reopened
    as the new file (not answered ESTALE forever)."""
    root = tmp_path / "src"
    root.mkdir()
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    table = InodeTable(root_fd, fd_budget=64)

    def look_up(name: str):
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        return table.remember(fd, os.fstat(fd))

    def crowd_out(prefix: str) -> None:
        for index in range(100):
            (root / f"{prefix}{index}").touch()
            look_up(f"{prefix}{index}")

    (root / "old").write_text("old")
    entry = look_up("old")
    crowd_out("a")
    assert entry.fd < 0  # closed to stay within the budget, reopenable by its handle
    number = os.stat(root / "old").st_ino
    (root / "old").unlink()
    (root / "new").write_text("new")
    if os.stat(root / "new").st_ino != number:
        pytest.fail(f"{tmp_path} did not reuse inode {number}: this test needs ext4")
    assert look_up("new") is entry  # same (st_dev, st_ino): the table's entry
    crowd_out("b")
    assert entry.fd < 0
    reopened = table.get(entry.ino)  # reopens from the handle
    with open(f"/proc/self/fd/{reopened.fd}") as content:
        assert content.read() == "new"
