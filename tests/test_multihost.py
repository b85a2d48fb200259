"""The lease across two hosts, for real: two lockfs daemons on one GlusterFS volume.

Each "host" is a network namespace with its own glusterd (own working
directory, run directory, CLI socket, pid and log files, never the system
one), its own brick and its own GlusterFS client. The two hosts talk over a
veth pair in 198.18.0.0/15. The volume is ``replica 2`` with
``client.strict-locks on`` (OFD locks then conflict across the two clients)
and ``cluster.quorum-type auto`` (with two bricks, the first one breaks ties:
the side that loses it loses the volume).

Each host's GlusterFS client and lockfs daemon run in its network namespace
(``nsenter --net``; ``ip netns exec`` would also give them a mount namespace
of their own, hiding the mounts from this one), so the mounts are visible here
and lockfs mounts on top of them. Clients are Agents started in the host's
network namespace, each in a mount namespace of its own.

The GlusterFS client's caches are off (kernel attribute and entry timeouts 0,
performance translators off): with them on, the next holder on the other host
read a file at its pre-handover size. What each partition test shows, and what
was seen but is not reliable enough to assert, is in its docstring and in
docs/limitations.md ("Proven on GlusterFS").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import LOCKFS, Agent, Mount, require, wait_for

from lockfs.cli import process_alive

EBUSY = errno.EBUSY
VOLUME = "lockfsmh"
SUBNET = "198.18.0"  # 198.18.0.0/15 only: reserved for benchmarking, never routed

# Caching translators off: another host's writes must be visible at once to the
# next holder. network.ping-timeout and the TCP keepalives decide how soon a
# partition is noticed (GlusterFS defaults: 42 s). Self-heal daemons are not
# needed here (with them on, the partition tests saw the same).
VOLUME_OPTIONS = (
    ("client.strict-locks", "on"),
    ("cluster.quorum-type", "auto"),
    ("cluster.self-heal-daemon", "off"),
    ("performance.write-behind", "off"),
    ("performance.stat-prefetch", "off"),
    ("performance.quick-read", "off"),
    ("performance.io-cache", "off"),
    ("performance.read-ahead", "off"),
    ("performance.open-behind", "off"),
    ("network.ping-timeout", "5"),
    ("client.tcp-user-timeout", "3"),
    ("client.keepalive-time", "1"),
    ("client.keepalive-interval", "1"),
    ("client.keepalive-count", "2"),
    ("server.tcp-user-timeout", "3"),
    ("server.keepalive-time", "1"),
    ("server.keepalive-interval", "1"),
    ("server.keepalive-count", "2"),
)

# No attribute or entry caching in the kernel for the GlusterFS mounts (default 1 s).
CLIENT_OPTIONS = ("--attribute-timeout=0", "--entry-timeout=0", "--negative-timeout=0")

GLUSTERD_VOL = """\
volume management
    type mgmt/glusterd
    option working-directory {work}
    option run-directory {run}
    option glusterd-sockfile {cli_sock}
    option transport-type socket
    option transport.socket.keepalive-time 10
    option transport.socket.keepalive-interval 2
    option transport.socket.read-fail-log off
    option transport.socket.listen-port 24007
    option ping-timeout 0
    option event-threads 1
end-volume
"""


def run(*command: str, timeout: float = 60) -> str:
    """Run a command to completion; fail the test with its output if it fails."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}): "
                    f"{result.stdout.strip()} {result.stderr.strip()}")
    return result.stdout


@dataclass
class Host:
    """One "host": a network namespace with a glusterd, a brick and a client mount."""

    index: int
    base: Path
    tag: str
    netns: str = field(init=False)
    veth: str = field(init=False)
    address: str = field(init=False)

    def __post_init__(self) -> None:
        self.netns = f"lfs{self.tag}h{self.index}"
        self.veth = f"lfs{self.tag}v{self.index}"  # at most 15 characters
        self.address = f"{SUBNET}.{self.index}"
        self.dir = self.base / f"host{self.index}"
        for name in ("work", "run", "log", "brick", "mnt"):
            (self.dir / name).mkdir(parents=True)

    @property
    def enter(self) -> tuple[str, ...]:
        """Command prefix that runs a process on this host (its network namespace only)."""
        return ("nsenter", f"--net=/run/netns/{self.netns}")

    @property
    def mnt(self) -> Path:
        return self.dir / "mnt"

    @property
    def brick(self) -> Path:
        return self.dir / "brick"

    @property
    def cli_sock(self) -> Path:
        return self.dir / "cli.sock"

    def gluster(self, *args: str) -> str:
        """The gluster CLI, talking to this host's glusterd over its own socket."""
        return run("gluster", "--mode=script", f"--glusterd-sock={self.cli_sock}",
                   f"--log-file={self.dir / 'log' / 'cli.log'}", *args)

    def start_glusterd(self) -> None:
        vol = self.dir / "glusterd.vol"
        vol.write_text(GLUSTERD_VOL.format(work=self.dir / "work", run=self.dir / "run",
                                           cli_sock=self.cli_sock))
        run(*self.enter, "glusterd", "-f", str(vol), "-p", str(self.dir / "glusterd.pid"),
            "-l", str(self.dir / "log" / "glusterd.log"), "-S", str(self.dir / "glusterd.sock"))
        wait_for(lambda: subprocess.run(
            ["gluster", "--mode=script", f"--glusterd-sock={self.cli_sock}",
             f"--log-file={self.dir / 'log' / 'cli.log'}", "peer", "status"],
            capture_output=True, check=False, timeout=30).returncode == 0,
            timeout=30, what=f"glusterd of host {self.index}")

    def mount_volume(self) -> None:
        run(*self.enter, "glusterfs", f"--volfile-server={self.address}",
            f"--volfile-id={VOLUME}", "--process-name", "fuse", *CLIENT_OPTIONS,
            "-l", str(self.dir / "log" / "client.log"), "-p", str(self.dir / "client.pid"),
            str(self.mnt))

    def link(self, up: bool) -> None:
        run("ip", "-n", self.netns, "link", "set", self.veth, "up" if up else "down")

    def lockfs_mount(self, src: Path, name: str) -> Mount:
        """Run a lockfs daemon on this host over ``src``."""
        dst = self.dir / f"dst-{name}"
        dst.mkdir()
        log = self.dir / f"lockfs-{name}.log"
        result = subprocess.run([*self.enter, *LOCKFS, "mount", str(src), str(dst),
                                 "--log-file", str(log)],
                                capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            pytest.fail(f"lockfs mount on host {self.index} failed ({result.returncode}): "
                        f"{result.stderr.strip()}")
        return Mount(src, dst, log)


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def _netns_pids(netns: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                            check=False)
    return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []


def _gluster_sockets(pid: int) -> list[str]:
    """The unix sockets a brick process was told to create (-S), to remove after it."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
    return [argv[i + 1].decode() for i, arg in enumerate(argv[:-1])
            if arg == b"-S" and argv[i + 1].startswith(b"/var/run/gluster/")]


def _readable(path: Path) -> bool:
    """Whether ``path`` can be read: after a partition, the side that lost quorum
    answers ENOTCONN until its client has reconnected to both bricks."""
    try:
        path.read_bytes()
    except OSError:
        return False
    return True


def _teardown_host(host: Host) -> None:
    """Unmount the volume, end every process of the host's namespace, delete the namespace."""
    for _attempt in range(2):
        if _mounted(host.mnt):
            subprocess.run(["umount", str(host.mnt)], capture_output=True, check=False)
    if _mounted(host.mnt):
        subprocess.run(["umount", "-l", str(host.mnt)], capture_output=True, check=False)
    if Path(f"/run/netns/{host.netns}").exists():
        # Everything in the namespace was started by this module: glusterd, bricks,
        # the GlusterFS client, lockfs daemons and agents of this host.
        pids = _netns_pids(host.netns)
        sockets = [sock for pid in pids for sock in _gluster_sockets(pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _netns_pids(host.netns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while _netns_pids(host.netns) and time.monotonic() < deadline:
                time.sleep(0.05)
        for sock in sockets:
            with contextlib.suppress(OSError):
                os.unlink(sock)
        subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, check=False)
    # Bricks log under /var/log/glusterfs/bricks whatever glusterd is told: keep
    # their logs with the rest of the test's files.
    brick_log = Path("/var/log/glusterfs/bricks") / (str(host.brick).strip("/")
                                                       .replace("/", "-") + ".log")
    with contextlib.suppress(OSError):
        os.replace(brick_log, host.dir / "log" / "brick.log")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host]]:
    """Two hosts with a replica 2 GlusterFS volume mounted on each; always torn down."""
    for tool in ("ip", "nsenter", "glusterd", "gluster", "glusterfs", "umount"):
        require(tool)
    base = tmp_path_factory.mktemp("multihost")
    tag = str(os.getpid() % 100000)
    hosts = (Host(1, base, tag), Host(2, base, tag))
    try:
        for host in hosts:
            run("ip", "netns", "add", host.netns)
        run("ip", "link", "add", hosts[0].veth, "type", "veth", "peer", "name", hosts[1].veth)
        for host in hosts:
            run("ip", "link", "set", host.veth, "netns", host.netns)
            run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.veth)
            run("ip", "-n", host.netns, "link", "set", "lo", "up")
            run("ip", "-n", host.netns, "link", "set", host.veth, "up")
        for host in hosts:
            host.start_glusterd()
        one, two = hosts
        one.gluster("peer", "probe", two.address)
        wait_for(lambda: "Peer in Cluster (Connected)" in one.gluster("peer", "status"),
                 timeout=30, what="the two glusterds joined")
        one.gluster("volume", "create", VOLUME, "replica", "2",
                    f"{one.address}:{one.brick}", f"{two.address}:{two.brick}", "force")
        for option, value in VOLUME_OPTIONS:
            one.gluster("volume", "set", VOLUME, option, value)
        one.gluster("volume", "start", VOLUME)
        for host in hosts:
            host.mount_volume()
        _wait_for_locks_across(one, two)
        yield hosts
    finally:
        for host in hosts:
            _teardown_host(host)
        # A veth pair not yet moved into the namespaces (setup failed early).
        subprocess.run(["ip", "link", "del", hosts[0].veth], capture_output=True, check=False)


def _ofd_lock(fd: int, kind: int = fcntl.F_WRLCK) -> bool:
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_OFD_SETLK", 37),
                    struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _wait_for_locks_across(one: Host, two: Host) -> None:
    """Both clients are connected to both bricks: an OFD lock taken through one
    gluster mount conflicts with one tried through the other, both ways (no
    lockfs involved yet)."""
    probe = "lock-probe"
    (one.mnt / probe).touch()
    wait_for(lambda: (two.mnt / probe).exists(), timeout=30,
             what="the volume shared by both mounts")
    for first, second in ((one, two), (two, one)):
        held = os.open(first.mnt / probe, os.O_RDWR)
        try:
            # A lock dropped by close() goes away asynchronously (FUSE release).
            wait_for(lambda fd=held: _ofd_lock(fd), timeout=30,
                     what=f"host {first.index} takes the OFD lock")
            wait_for(lambda other=second: not _try_lock_once(other.mnt / probe), timeout=30,
                     what=f"host {second.index} to see host {first.index}'s OFD lock")
            _ofd_lock(held, fcntl.F_UNLCK)
        finally:
            os.close(held)
    (one.mnt / probe).unlink()


def _try_lock_once(path: Path) -> bool:
    """Whether a new open file description of ``path`` gets the OFD lock (then drops it)."""
    fd = os.open(path, os.O_RDWR)
    try:
        if not _ofd_lock(fd):
            return False
        _ofd_lock(fd, fcntl.F_UNLCK)
        return True
    finally:
        os.close(fd)


@dataclass
class Pair:
    """A lockfs daemon on each host over the same directory of the volume."""

    hosts: tuple[Host, Host]
    mounts: tuple[Mount, Mount]
    name: str

    def agent(self, agents, host: int) -> Agent:
        """A new client of host ``host``'s daemon (in that host's network namespace)."""
        return agents(*self.hosts[host - 1].enter)

    def path(self, host: int, name: str = "data") -> str:
        return str(self.mounts[host - 1].dst / name)


@pytest.fixture
def pair(cluster: tuple[Host, Host], request: pytest.FixtureRequest) -> Iterator[Pair]:
    one, two = cluster
    name = request.node.name.removeprefix("test_")[:40]
    (one.mnt / name).mkdir()
    (one.mnt / name / "data").write_text("seed")
    wait_for(lambda: _readable(two.mnt / name / "data"), timeout=30,
             what="the directory on host 2")
    mounts: list[Mount] = []
    try:
        mounts.append(one.lockfs_mount(one.mnt / name, name))
        mounts.append(two.lockfs_mount(two.mnt / name, name))
        yield Pair(cluster, (mounts[0], mounts[1]), name)
    finally:
        for mount in reversed(mounts):
            mount.teardown()


def test_lease_excludes_across_hosts_both_ways(pair: Pair, agents) -> None:
    one, two = pair.mounts
    a = pair.agent(agents, 1)
    b = pair.agent(agents, 2)
    a.call("open", pair.path(1), "r")

    assert b.errno_of("open", pair.path(2), "r") == EBUSY
    assert b.errno_of("open", pair.path(2, "new-file"), "w") == EBUSY
    assert b.errno_of("mkdir", pair.path(2, "new-dir")) == EBUSY
    assert b.call("stat", pair.path(2)) == 4  # lookups need no lease
    assert one.status()["state"] == "held here"
    status = two.status()
    assert status["state"] == "held by another mount"
    assert status["other_mount"]["daemon_pid"] == one.daemon_pid
    assert status["other_mount"]["mountpoint"] == str(one.dst)
    # The refusal is logged; the line names the other daemon only when host 2's
    # GlusterFS client already reads the record that daemon wrote (its caches can
    # serve the old content for a moment), so only the sentence is checked.
    assert "is held by another lockfs mount" in two.log_text()

    a.exit()  # host 1's client is gone: its daemon drops the OFD lock
    wait_for(lambda: b.errno_of("open", pair.path(2), "r") == 0, timeout=20,
             what="host 2's client gets the lease once host 1's exited")
    assert two.status()["state"] == "held here"
    status = one.status()
    assert status["state"] == "held by another mount"
    assert status["other_mount"]["daemon_pid"] == two.daemon_pid
    assert status["other_mount"]["mountpoint"] == str(two.dst)
    c = pair.agent(agents, 1)
    assert c.errno_of("open", pair.path(1), "r") == EBUSY
    assert c.errno_of("mkdir", pair.path(1, "new-dir")) == EBUSY
    assert sorted(os.listdir(pair.mounts[0].src)) == [".lockfs-lease", "data"]


def test_fsynced_data_is_read_intact_on_the_other_host(pair: Pair, agents) -> None:
    two = pair.mounts[1]
    first = "".join(f"{i:08x}" for i in range(40_000))  # 320 KB
    second = "".join(f"{i:07x}-" for i in range(50_000, 80_000))  # 240 KB, shorter
    # Host 2's kernel learns the old size first (a stat needs no lease).
    assert os.stat(two.dst / "data").st_size == 4

    a = pair.agent(agents, 1)
    fd = a.call("open", pair.path(1), "rw")
    assert a.call("write", fd, first) == len(first)
    a.call("fsync", fd)
    a.call("close", fd)
    a.exit()

    b = pair.agent(agents, 2)
    wait_for(lambda: b.errno_of("open", pair.path(2), "r") == 0, timeout=20,
             what="host 2's client gets the lease")
    fd = b.call("open", pair.path(2), "rw")
    assert b.call("read", fd) == first
    b.call("truncate", pair.path(2), 0)
    assert b.call("write", fd, second) == len(second)
    b.call("fsync", fd)
    b.exit()

    c = pair.agent(agents, 1)
    wait_for(lambda: c.errno_of("open", pair.path(1), "r") == 0, timeout=20,
             what="host 1's client gets the lease back")
    fd = c.call("open", pair.path(1), "r")
    assert c.call("read", fd) == second
    assert (pair.hosts[1].mnt / pair.name / "data").read_text() == second


def test_partition_stops_the_holder_that_lost_quorum(pair: Pair, agents) -> None:
    """Host 2 holds the lease; the link between the hosts goes down. Host 2 has lost
    the first brick, so the volume answers it ENOTCONN within a few seconds: its
    daemon's lock check fails and its client's I/O fails. Host 1 kept the first
    brick, whose server dropped host 2's connection and locks: it takes the lease.

    Host 2's daemon fences its client (the lock check runs in a worker thread,
    so a lock query that blocks for seconds does not stall the daemon), and
    its mount stays up: the fenced client gets errors, not a dead mount. (An
    earlier note here described host 2's session ending about 3 s after the
    fence: that was this test's own teardown unmounting it.)
    """
    one, two = pair.mounts
    host_one, host_two = pair.hosts
    b = pair.agent(agents, 2)
    fd = b.call("open", pair.path(2), "rw")
    b.call("write", fd, "before")
    b.call("fsync", fd)
    a = pair.agent(agents, 1)
    assert a.errno_of("open", pair.path(1), "r") == EBUSY

    host_two.link(up=False)
    try:
        wait_for(lambda: "fenced" in two.log_text(),
                 timeout=30, what="host 2's daemon fences its client")
        assert "lockfs daemon failed" not in two.log_text()
        write_error = b.errno_of("write", fd, "after")
        sync_error = b.errno_of("fsync", fd)
        assert (write_error or sync_error) in (errno.EBADF, errno.EIO, errno.ENOTCONN)
        wait_for(lambda: a.errno_of("open", pair.path(1), "r") == 0, timeout=30,
                 what="host 1's client gets the lease during the partition")
        assert one.status()["state"] == "held here"
        fd = a.call("open", pair.path(1), "rw")
        assert a.call("read", fd) == "before"
        a.call("write", fd, "host 1")
        a.call("fsync", fd)
        assert two.is_mounted() and process_alive(two.daemon_pid)
        assert "lockfs daemon failed" not in two.log_text()
    finally:
        host_two.link(up=True)
        wait_for(lambda: _readable(host_two.mnt / pair.name / "data"), timeout=30,
                 what="host 2's client back on both bricks")
    # Host 1 reads what it wrote during the partition. Not checked, because not
    # reliable (seen here): whether host 1 still holds the lease now (its lock was
    # taken on the first brick only; in about half of the runs its daemon's lock
    # check, answered by the returning brick, finds no lock and fences it), and
    # what host 2's GlusterFS client reads (the old content, "before", for at least
    # 40 s after the link came back, with or without the self-heal daemon, while
    # host 1 kept the file open).
    assert (host_one.mnt / pair.name / "data").read_text() == "host 1"


def test_partition_without_quorum_gives_two_holders(pair: Pair, agents) -> None:
    """The same partition with ``cluster.quorum-type none`` (the default of a replica 2
    volume): each side goes on with its own brick. Host 2's lock still stands on
    its brick, so its daemon sees nothing wrong; host 1's brick dropped host 2's
    lock, so host 1 takes the lease too. Two holders: lockfs cannot prevent this,
    the volume must be configured with quorum (see docs/limitations.md)."""
    one, two = pair.mounts
    host_one, host_two = pair.hosts
    host_one.gluster("volume", "set", VOLUME, "cluster.quorum-type", "none")
    try:
        b = pair.agent(agents, 2)
        b.call("open", pair.path(2), "rw")
        a = pair.agent(agents, 1)
        assert a.errno_of("open", pair.path(1), "r") == EBUSY
        host_two.link(up=False)
        try:
            wait_for(lambda: a.errno_of("open", pair.path(1), "r") == 0, timeout=30,
                     what="host 1's client gets the lease during the partition")
            # Host 2's client still has its file open through a daemon that
            # holds the lease too: two holders. (Whether host 2's writes then
            # reach its brick varies from run to run: sometimes EBADFD.)
            assert one.status()["state"] == "held here"
            assert two.status()["state"] == "held here"
            assert "fenced" not in two.log_text()
            fd_a = a.call("open", pair.path(1), "rw")
            a.call("write", fd_a, "written on host 1")
            a.call("fsync", fd_a)
        finally:
            host_two.link(up=True)
    finally:
        host_one.gluster("volume", "set", VOLUME, "cluster.quorum-type", "auto")
