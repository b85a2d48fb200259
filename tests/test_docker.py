"""lockfs as a container volume source: real Docker, and containers built with unshare.

Docker: a private dockerd per module (dockerutil.py), two PostgreSQL containers
with ``-v DST/pgdata:/var/lib/postgresql/data`` on one lockfs mount: the first
serves, the second dies with "Device or resource busy", and a successor starts
once the first is removed. On a plain directory both start: that is the bug.

unshare: what a runtime does (new mount, PID, IPC and network namespaces, a
directory of DST bind-mounted inside), for what Docker cannot show quickly,
and the DaemonSet mistake of running lockfs without the host's PID namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import LOCKFS, Mount, _mounted, child_of, lockfs, require, run_in_ns, wait_for
from dockerutil import Docker, PgContainer, initdb_in_container
from pgutil import EBUSY_TEXT, READY, PgEnv, owned_dir

pytestmark = pytest.mark.slow

RUNTIME = ["unshare", "--mount", "--pid", "--ipc", "--net", "--fork", "--kill-child",
           "--mount-proc"]


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    """A private dockerd with the test image; stopped by pid and its directory removed."""
    daemon = Docker()
    try:
        daemon.wait_ready()
        daemon.build_image()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def pg(mount_factory: Callable[..., Mount]) -> Iterator[PgEnv]:
    """Directories postgres can reach, lockfs mounts in them; all gone at the end."""
    env = PgEnv(mount_factory)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def containers(docker: Docker) -> Iterator[list[PgContainer]]:
    """PostgreSQL containers of one test; all removed at its end (before any unmount)."""
    started: list[PgContainer] = []
    yield started
    names = [container.name for container in started]
    if names:
        docker.cli("rm", "-f", *names, check=False)


def start(docker: Docker, pg: PgEnv, containers: list[PgContainer], name: str,
          data: Path) -> PgContainer:
    container = PgContainer(docker, f"{name}-{os.getpid()}-{len(containers)}", data,
                            pg.sockdir(name))
    containers.append(container)
    return container


def test_second_container_on_lockfs_volume_is_refused(docker: Docker, pg: PgEnv,
                                                      containers: list[PgContainer]) -> None:
    """First container serves; second fails with EBUSY; after the first is removed, a new one
    starts on the same data."""
    mount = pg.mount()
    owned_dir(mount.src / "pgdata")  # made in SRC, so dockerd never creates it through DST
    data = mount.dst / "pgdata"
    init = initdb_in_container(docker, data)
    assert init.returncode == 0, init.stderr.decode()
    assert (mount.src / "pgdata" / "PG_VERSION").is_file()

    first = start(docker, pg, containers, "first", data)
    first.wait_ready()
    first.psql("create table orders as select generate_series(1, 1000) as id")

    second = start(docker, pg, containers, "second", data)
    assert second.wait_exit() != 0
    assert EBUSY_TEXT in second.logs(), second.logs()
    assert READY not in second.logs()

    assert first.state()[0], "the first container must keep running"
    assert first.psql("select count(*) from orders") == "1000"
    first.psql("insert into orders values (1001)")
    status = mount.status()
    assert status["state"] == "held here"
    assert status["refusals"] >= 1

    first.stop_and_remove()
    containers.remove(first)
    wait_for(lambda: mount.status()["state"] == "free", 15, "the lease to be released")
    successor = start(docker, pg, containers, "successor", data)
    successor.wait_ready()
    assert successor.psql("select count(*) from orders") == "1001"


def test_two_containers_on_plain_directory_both_start(docker: Docker, pg: PgEnv,
                                                      containers: list[PgContainer]) -> None:
    """The hazard lockfs exists for: without it, both postmasters run on one data directory."""
    data = owned_dir(pg.base / "plain" / "pgdata")
    init = initdb_in_container(docker, data)
    assert init.returncode == 0, init.stderr.decode()

    first = start(docker, pg, containers, "plain-first", data)
    first.wait_ready()
    second = start(docker, pg, containers, "plain-second", data)
    second.wait_ready()
    assert first.state()[0] and second.state()[0]
    assert first.psql("select 1") == second.psql("select 1") == "1"


# ------------------------------------------------------------- containers made with unshare


def runtime_container(volume: Path, inside: Path, script: str) -> list[str]:
    """A command that runs ``script`` the way a runtime would: new namespaces, volume bound."""
    return [*RUNTIME, "sh", "-c", f"mount --bind {volume} {inside} && {script}"]


def test_unshare_containers_with_bind_mounted_volume(mount_factory: Callable[..., Mount],
                                                     tmp_path: Path) -> None:
    """First container holds the volume; second is refused; after the first dies it starts."""
    for tool in ("unshare", "mount"):
        require(tool)
    mount = mount_factory()
    (mount.src / "app").mkdir()
    volume = mount.dst / "app"
    inside_a, inside_b = tmp_path / "rootfs-a-data", tmp_path / "rootfs-b-data"
    inside_a.mkdir()
    inside_b.mkdir()

    first = subprocess.Popen(
        runtime_container(volume, inside_a, f"echo a > {inside_a}/owner && exec sleep 600"),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (mount.src / "app" / "owner").exists()
                 and (mount.src / "app" / "owner").read_text() == "a\n", 15,
                 "the first container to write")
        holder = child_of(first.pid)
        assert str(holder) in mount.status()["processes"]

        second = runtime_container(volume, inside_b, f"echo b > {inside_b}/owner-b")
        refused = subprocess.run(second, capture_output=True, text=True, timeout=60,
                                 check=False)
        assert refused.returncode != 0
        assert EBUSY_TEXT in refused.stderr, refused.stderr
        assert not (mount.src / "app" / "owner-b").exists()

        first.kill()  # the runtime kills the container: --kill-child takes its PID namespace
        first.wait(timeout=30)
        wait_for(lambda: mount.status()["state"] == "free", 15, "the lease to be released")
        accepted = subprocess.run(second, capture_output=True, text=True, timeout=60,
                                  check=False)
        assert accepted.returncode == 0, accepted.stderr
        assert (mount.src / "app" / "owner-b").read_text() == "b\n"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)


def test_lockfs_without_host_pid_namespace_refuses_every_caller(tmp_path: Path) -> None:
    """A lockfs pod without hostPID: callers' pids read as 0, so fail-closed refuses them all."""
    require("unshare")
    src, dst, log = tmp_path / "src", tmp_path / "dst", tmp_path / "lockfs.log"
    src.mkdir()
    dst.mkdir()
    (src / "seed").write_text("seed\n")
    daemon = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", *LOCKFS, "mount", "-f", str(src),
         str(dst), "--log-file", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _mounted(dst) and lockfs("status", str(dst)).returncode == 0, 30,
                 "lockfs in its own PID namespace to answer")
        write = run_in_ns(f"echo x > {dst}/new")
        assert write.returncode != 0
        assert EBUSY_TEXT in write.stderr, write.stderr
        read = run_in_ns(f"cat {dst}/seed")
        assert read.returncode != 0
        assert EBUSY_TEXT in read.stderr
        listing = run_in_ns(f"ls {dst}")  # lookup and readdir never need the lease
        assert listing.returncode == 0
        assert "seed" in listing.stdout
        status = json.loads(lockfs("status", "--json", str(dst)).stdout)
        assert status["state"] == "free"
        assert status["refusals"] >= 2  # the write and the read
        assert status["last_refusal"]["who"] == "pid 0"
        assert "refused create by pid 0" in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError, OSError):
            os.kill(child_of(daemon.pid), signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)
        if _mounted(dst):
            subprocess.run(["umount", "-l", str(dst)], capture_output=True, check=False)
    assert not _mounted(dst)


def test_lockfs_in_own_mount_namespace_with_shared_propagation(tmp_path: Path) -> None:
    """The DaemonSet shape: lockfs runs in a mount namespace of its own (the pod) on a
    shared mount (Bidirectional propagation), with the host's PID namespace (hostPID).
    The mount appears on the host, serves clients there, and goes away with the daemon."""
    for tool in ("unshare", "mount"):
        require(tool)
    host_dir, backing = tmp_path / "host-mnt", tmp_path / "backing"
    backing.mkdir()
    host_dir.mkdir()
    dst = host_dir / "pgdata"
    subprocess.run(["mount", "--bind", str(host_dir), str(host_dir)], check=True)
    daemon: subprocess.Popen | None = None
    try:
        subprocess.run(["mount", "--make-rshared", str(host_dir)], check=True)
        dst.mkdir()
        daemon = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "unchanged", *LOCKFS, "mount", "-f",
             str(backing), str(dst), "--log-file", str(tmp_path / "lockfs.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        wait_for(lambda: _mounted(dst) and lockfs("status", str(dst)).returncode == 0, 30,
                 "the pod's mount to appear on the host")
        holder = subprocess.Popen([*RUNTIME, "sh", "-c", f"echo a > {dst}/owner && exec sleep 600"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: (backing / "owner").exists(), 15, "the first client to write")
            other = run_in_ns(f"echo b > {dst}/other")
            assert other.returncode != 0
            assert EBUSY_TEXT in other.stderr
        finally:
            holder.kill()
            holder.wait(timeout=30)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert not _mounted(dst), "the unmount must propagate back to the host"
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        if _mounted(dst):
            subprocess.run(["umount", "-l", str(dst)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(host_dir)], capture_output=True, check=False)
