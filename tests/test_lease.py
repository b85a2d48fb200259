"""The single-writer lease with real mounts, real mount namespaces and real kills.

Each client is an Agent: a process in its own mount namespace (``unshare -m``)
that the test drives one system call at a time. The pytest process itself only
stats, lists and reads the status attribute, none of which take the lease.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LOCKFS, Agent, Mount, lockfs, run_in_ns, wait_for

EBUSY = errno.EBUSY


def status_of(dst: Path) -> dict:
    """The status record, read in-process (getxattr never takes the lease)."""
    return json.loads(os.getxattr(dst, "user.lockfs.status"))


def refused_everything(agent: Agent, dst: Path) -> dict[str, int]:
    """The errno of each lease-needing operation tried by ``agent``."""
    return {
        "open": agent.errno_of("open", str(dst / "data"), "r"),
        "create": agent.errno_of("open", str(dst / "new-file"), "w"),
        "mkdir": agent.errno_of("mkdir", str(dst / "new-dir")),
        "unlink": agent.errno_of("unlink", str(dst / "data")),
        "rename": agent.errno_of("rename", str(dst / "data"), str(dst / "renamed")),
        "chmod": agent.errno_of("chmod", str(dst / "data"), 0o600),
        "truncate": agent.errno_of("truncate", str(dst / "data"), 0),
    }


def seed(mount: Mount, name: str = "data", content: str = "seed") -> None:
    """Create a file in SRC directly (no lease involved)."""
    (mount.src / name).write_text(content)


def test_second_namespace_refused_while_first_has_file_open(mount_factory, agents) -> None:
    mount = mount_factory(None, "--hold=open")
    seed(mount)
    a, b = agents(), agents()
    fd = a.call("open", str(mount.dst / "data"), "r")

    assert refused_everything(b, mount.dst) == dict.fromkeys(
        ("open", "create", "mkdir", "unlink", "rename", "chmod", "truncate"), EBUSY)
    # Lookups and listings never need the lease.
    assert b.call("stat", str(mount.dst / "data")) == 4
    assert b.call("listdir", str(mount.dst)) == ["data"]
    assert sorted(os.listdir(mount.src)) == [".lockfs-lease", "data"]  # nothing was created

    status = status_of(mount.dst)
    assert status["state"] == "held here"
    assert status["open_handles"] == 1
    assert status["refusals"] == 7
    assert status["last_refusal"]["what"] == "setattr"

    a.call("close", fd)
    wait_for(lambda: status_of(mount.dst)["state"] == "free", what="lease freed on close")
    assert b.call("open", str(mount.dst / "data"), "r") > 0
    assert status_of(mount.dst)["holder"] != status["holder"]


def test_refusal_is_logged_naming_caller_and_holder(mount_factory, agents) -> None:
    mount = mount_factory()
    seed(mount)
    a, b = agents(), agents()
    a.call("open", str(mount.dst / "data"), "r")
    assert b.errno_of("open", str(mount.dst / "data"), "r") == EBUSY
    holder = status_of(mount.dst)["holder"]
    line = next(line for line in mount.log_text().splitlines() if "refused open" in line)
    assert f"pid {b.pid} (python" in line
    assert f"held by {holder}" in line
    assert f"pids {a.pid}" in line


def test_default_hold_keeps_lease_while_holder_process_lives(mounted, agents) -> None:
    seed(mounted)
    a, b = agents(), agents()
    a.call("close", a.call("open", str(mounted.dst / "data"), "r"))
    wait_for(lambda: status_of(mounted.dst)["open_handles"] == 0, what="handle released")

    # A has nothing open but is alive: the idle-postgres case.
    assert b.errno_of("open", str(mounted.dst / "data"), "r") == EBUSY
    status = status_of(mounted.dst)
    assert status["state"] == "held here"
    assert list(status["processes"]) == [str(a.pid)]
    assert status["processes"][str(a.pid)].startswith("python")

    a.exit()
    wait_for(lambda: b.errno_of("open", str(mounted.dst / "data"), "r") == 0,
             what="B gets the lease once A exited")


def test_hold_open_releases_when_idle_holder_lives(mount_factory, agents) -> None:
    mount = mount_factory(None, "-o", "hold=open")
    seed(mount)
    a, b = agents(), agents()
    a.call("close", a.call("open", str(mount.dst / "data"), "r"))
    assert status_of(mount.dst)["hold"] == "open"
    wait_for(lambda: b.errno_of("open", str(mount.dst / "data"), "r") == 0,
             what="B gets the lease once A closed its only file")


def test_hold_open_metadata_request_leaves_lease_free(mount_factory, agents) -> None:
    mount = mount_factory(None, "--hold=open")
    a, b = agents(), agents()
    a.call("mkdir", str(mount.dst / "made-by-a"))
    wait_for(lambda: status_of(mount.dst)["state"] == "free", what="lease free after mkdir")
    b.call("mkdir", str(mount.dst / "made-by-b"))
    assert sorted(os.listdir(mount.src)) == [".lockfs-lease", "made-by-a", "made-by-b"]


def test_processes_of_one_namespace_share_the_lease(mounted, agents) -> None:
    seed(mounted)
    a, b = agents(), agents()
    a.call("open", str(mounted.dst / "data"), "r")
    children = [a.call("fork_open", str(mounted.dst / "data")) for _ in range(3)]

    def children_tracked() -> bool:
        return {str(pid) for pid in children} <= set(status_of(mounted.dst)["processes"])

    wait_for(children_tracked, what="forked children recorded as holder processes")
    a.kill()  # the parent dies; its children (sleep) live on and keep the lease
    assert b.errno_of("open", str(mounted.dst / "data"), "r") == EBUSY
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: b.errno_of("open", str(mounted.dst / "data"), "r") == 0,
             what="lease freed after the last child died")


def test_sigkill_of_holder_releases_lease(mounted, agents) -> None:
    seed(mounted)
    a, b = agents(), agents()
    a.call("open", str(mounted.dst / "data"), "rw")
    assert b.errno_of("open", str(mounted.dst / "data"), "r") == EBUSY
    a.kill(signal.SIGKILL)
    wait_for(lambda: b.errno_of("open", str(mounted.dst / "data"), "r") == 0,
             what="lease freed after SIGKILL of the holder")


def test_sigkill_of_daemon_drops_lock_and_keeps_fsynced_data(mount_factory, agents) -> None:
    first = mount_factory()
    a = agents()
    fd = a.call("open", str(first.dst / "journal"), "rw")
    a.call("write", fd, "committed record\n")
    a.call("fsync", fd)
    os.kill(first.daemon_pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{first.daemon_pid}").exists(), what="daemon gone")

    # The old client cannot write any more: the dead mount answers ENOTCONN.
    assert a.errno_of("write", fd, "late") == errno.ENOTCONN
    assert (first.src / "journal").read_text() == "committed record\n"

    # The OFD lock died with the daemon: a second mount of the same SRC takes the lease.
    second = mount_factory(first.src)
    b = agents()
    assert b.call("read", b.call("open", str(second.dst / "journal"), "r")) == \
        "committed record\n"
    assert status_of(second.dst)["state"] == "held here"


def test_two_mounts_of_one_source_exclude_each_other(mount_factory, agents) -> None:
    one = mount_factory()
    two = mount_factory(one.src)
    seed(one)
    a, b = agents(), agents()

    a.call("open", str(one.dst / "data"), "r")
    assert b.errno_of("open", str(two.dst / "data"), "r") == EBUSY
    status = status_of(two.dst)
    assert status["state"] == "held by another mount"
    assert status["other_mount"]["daemon_pid"] == one.daemon_pid
    assert f"held by another lockfs mount (daemon pid {one.daemon_pid}" in two.log_text()

    a.exit()
    wait_for(lambda: b.errno_of("open", str(two.dst / "data"), "r") == 0,
             what="mount two's client gets the lease once mount one's is free")
    c = agents()
    assert c.errno_of("open", str(one.dst / "data"), "r") == EBUSY
    assert status_of(one.dst)["state"] == "held by another mount"


def test_simultaneous_opens_from_eight_namespaces_have_one_winner(mount_factory,
                                                                  agents) -> None:
    mount = mount_factory(None, "--hold=open")
    seed(mount)
    clients = [agents() for _ in range(8)]
    path = str(mount.dst / "data")
    request = json.dumps(["open", path, "r"]) + "\n"
    for _round in range(200):
        for client in clients:  # all requests go out before any answer is read
            client.process.stdin.write(request)
            client.process.stdin.flush()
        replies = [json.loads(client.process.stdout.readline()) for client in clients]
        winners = [i for i, reply in enumerate(replies) if "ok" in reply]
        errnos = sorted(reply.get("errno", 0) for reply in replies)
        assert len(winners) == 1, replies
        assert errnos == [0] + [EBUSY] * 7, replies
        clients[winners[0]].call("close", replies[winners[0]]["ok"])
        wait_for(lambda: status_of(mount.dst)["state"] == "free", what="lease freed")
    assert status_of(mount.dst)["refusals"] == 7 * 200


def test_caller_invisible_to_daemon_is_refused(tmp_path: Path) -> None:
    """Fail closed: a daemon in its own PID namespace sees pid 0 for outside callers."""
    src, dst, log = tmp_path / "src", tmp_path / "dst", tmp_path / "daemon.log"
    src.mkdir()
    dst.mkdir()
    (src / "data").write_text("x")
    daemon = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", *LOCKFS, "mount",
                               "-f", str(src), str(dst), "--log-file", str(log)])
    try:
        wait_for(lambda: "mount ready" in (log.read_text() if log.exists() else ""),
                 what="namespaced daemon ready")
        result = run_in_ns(f"cat {dst}/data")
        assert result.returncode != 0
        assert "Device or resource busy" in result.stderr
        assert "pid 0: the caller is in a PID namespace the daemon cannot see" in log.read_text()
        assert status_of(dst)["state"] == "free"
    finally:
        subprocess.run(["umount", "-l", str(dst)], check=False)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)


def test_lockfile_is_invisible_and_untouchable(mounted, agents) -> None:
    lease_name = ".lockfs-lease"
    assert (mounted.src / lease_name).exists()
    assert os.listdir(mounted.dst) == []
    assert not (mounted.dst / lease_name).exists()
    script = f"""
cd {mounted.dst}
ls -A | wc -l
cat {lease_name} 2>/dev/null && echo READ
echo x > {lease_name} 2>/dev/null && echo CREATED
touch other && mv other {lease_name} 2>/dev/null && echo RENAMED-ONTO
ln other {lease_name} 2>/dev/null && echo LINKED-ONTO
mkdir {lease_name} 2>/dev/null && echo MKDIR
ln -s x {lease_name} 2>/dev/null && echo SYMLINK
rm -f {lease_name} 2>/dev/null; rm other
find . -mindepth 1 | wc -l
"""
    result = run_in_ns(script)
    assert result.stdout.split() == ["0", "0"], result
    # Nothing reached the real lockfile, and the lease it backs still works.
    assert (mounted.src / lease_name).is_file()
    assert json.loads((mounted.src / lease_name).read_text())["daemon_pid"] == mounted.daemon_pid


def test_status_works_from_another_namespace_while_busy(mounted, agents) -> None:
    seed(mounted)
    a = agents()
    a.call("open", str(mounted.dst / "data"), "r")
    result = run_in_ns(f"{sys.executable} -m lockfs status {mounted.dst}")
    assert result.returncode == 0, result.stderr
    assert "state:        held here" in result.stdout
    assert f"{a.pid} (python" in result.stdout
    as_json = json.loads(lockfs("status", "--json", str(mounted.dst)).stdout)
    assert as_json["open_handles"] == 1
    assert as_json["processes"] == {str(a.pid): as_json["processes"][str(a.pid)]}
    assert as_json["since"] <= time.time()


@pytest.mark.parametrize("option", ["--lockfile", "-o"])
def test_lockfile_elsewhere(tmp_path: Path, mount_factory, agents, option: str) -> None:
    lock = tmp_path / "elsewhere.lock"
    args = (option, str(lock)) if option == "--lockfile" else (option, f"lockfile={lock}")
    one = mount_factory(None, *args)
    two = mount_factory(one.src, *args)
    seed(one)
    a, b = agents(), agents()
    a.call("open", str(one.dst / "data"), "r")
    assert b.errno_of("open", str(two.dst / "data"), "r") == EBUSY
    assert not (one.src / ".lockfs-lease").exists()
    assert status_of(one.dst)["lockfile"] == str(lock)


@pytest.mark.parametrize("where", ["read-only", "directory", "missing-dir"])
def test_unusable_lockfile_refuses_to_mount(tmp_path: Path, where: str) -> None:
    """A lockfile that cannot be locked is a clear one-line mount failure."""
    src, dst, readonly = tmp_path / "src", tmp_path / "dst", tmp_path / "ro"
    for directory in (src, dst, readonly):
        directory.mkdir()
    lock = {"read-only": readonly / "lock", "directory": readonly,
            "missing-dir": tmp_path / "nowhere" / "lock"}[where]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(readonly)], check=True)
    try:
        result = lockfs("mount", str(src), str(dst), "--lockfile", str(lock))
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    assert result.returncode == 5, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("lockfs: lockfile ")
    assert "Traceback" not in result.stderr
    assert os.listdir(dst) == []
    assert os.listdir(src) == []


def test_lost_lock_fences_the_holder(mounted, agents) -> None:
    """A lockfile removed behind the daemon's back means the lock no longer protects
    anything: the holder is fenced (its handles fail) and the next client locks the
    file the path names now."""
    a, b = agents(), agents()
    fd = a.call("open", str(mounted.dst / "data"), "rw")
    a.call("write", fd, "before")
    a.call("fsync", fd)
    (mounted.src / ".lockfs-lease").unlink()
    wait_for(lambda: "fenced" in mounted.log_text(), what="the holder fenced")
    # The write may land in the kernel's writeback cache; it never reaches SRC.
    write_error = a.errno_of("write", fd, "after")
    sync_error = a.errno_of("fsync", fd)
    assert write_error in (0, errno.EBADF)
    assert (write_error or sync_error) in (errno.EBADF, errno.EIO)
    assert (mounted.src / "data").read_text() == "before"
    assert status_of(mounted.dst)["state"] == "free"
    b.call("open", str(mounted.dst / "data"), "r")
    record = json.loads((mounted.src / ".lockfs-lease").read_text())
    assert record["daemon_pid"] == mounted.daemon_pid
    assert status_of(mounted.dst)["state"] == "held here"


@pytest.mark.parametrize("options", [(), ("-o", "writeback_cache")])
def test_handover_between_mounts_shows_the_other_mounts_writes(mount_factory, agents,
                                                               options) -> None:
    """Mount one's kernel cached a file; mount two changed it; mount one must see the change.

    With the writeback cache the kernel even trusts its own file sizes, so the
    daemon must make its kernel forget what it cached once another mount held SRC.
    """
    one = mount_factory(None, *options)
    two = mount_factory(one.src, *options)
    (one.src / "sub").mkdir()
    a = agents()
    fd = a.call("open", str(one.dst / "sub" / "wal"), "w")
    a.call("write", fd, "first")
    a.call("close", fd)
    assert a.call("read", a.call("open", str(one.dst / "sub" / "wal"), "r")) == "first"
    assert a.call("stat", str(one.dst / "sub" / "wal")) == 5
    a.exit()

    b = agents()
    wait_for(lambda: b.errno_of("stat", str(two.dst / "sub" / "wal")) == 0, what="visible")
    wait_for(lambda: b.errno_of("open", str(two.dst / "sub" / "wal"), "a") == 0,
             what="mount two gets the lease")
    fd = b.call("open", str(two.dst / "sub" / "wal"), "a")
    b.call("write", fd, "+second")
    b.call("close", fd)
    b.exit()
    assert (one.src / "sub" / "wal").read_text() == "first+second"

    c = agents()
    wait_for(lambda: c.errno_of("open", str(one.dst / "sub" / "wal"), "r") == 0,
             what="mount one gets the lease back")
    assert c.call("read", c.call("open", str(one.dst / "sub" / "wal"), "r")) == "first+second"
    assert c.call("stat", str(one.dst / "sub" / "wal")) == len("first+second")


def test_more_inodes_than_descriptors(tmp_path: Path, agents) -> None:
    """A daemon that may open only 600 descriptors serves a tree of 3,000 files:
    cold inodes give their descriptor back and are reopened from their file handle."""
    src, dst, log = tmp_path / "src", tmp_path / "dst", tmp_path / "daemon.log"
    src.mkdir()
    dst.mkdir()
    for index in range(3000):
        (src / f"f{index}").write_text(f"content {index}")
    # Without CAP_SYS_RESOURCE the daemon cannot raise its limit above 600.
    daemon = subprocess.Popen(["prlimit", "--nofile=600:600", "setpriv",
                               "--bounding-set=-sys_resource", *LOCKFS, "mount", "-f",
                               str(src), str(dst), "--log-file", str(log)])
    try:
        wait_for(lambda: "mount ready" in (log.read_text() if log.exists() else ""),
                 what="daemon ready")
        sizes = {os.stat(dst / f"f{index}").st_size for index in range(3000)}
        assert sizes == {len(f"content {index}") for index in range(3000)}
        assert len(os.listdir(f"/proc/{daemon.pid}/fd")) < 600
        reader = agents()
        for index in (0, 1, 2, 1500, 2999):  # the first ones were closed long ago
            fd = reader.call("open", str(dst / f"f{index}"), "r")
            assert reader.call("read", fd) == f"content {index}"
        assert sorted(os.listdir(dst)) == sorted(f"f{index}" for index in range(3000))
        assert "Too many open files" not in log.read_text()
    finally:
        subprocess.run(["umount", "-l", str(dst)], check=False)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)
