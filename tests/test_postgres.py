"""The reason lockfs exists, shown with the real PostgreSQL server.

Two postmasters in separate PID/IPC/network/mount namespaces both start on one
plain data directory (scripts/hazard.sh shows it). Through lockfs the second
one must be refused with EBUSY while the first keeps serving, also while the
first is idle with no file open, and also when the second comes through
another lockfs daemon on the same backing directory.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import Mount, require, wait_for
from pgutil import (
    EBUSY_TEXT,
    READY,
    PgEnv,
    Postmaster,
    in_new_namespace_as_postgres,
    initdb,
    pg_bin,
)

pytestmark = pytest.mark.slow

IDLE_SETTINGS = ("autovacuum=off", "max_logical_replication_workers=0")
CONSISTENT = ("select (select sum(abalance) from pgbench_accounts) = "
              "(select sum(delta) from pgbench_history), "
              "(select count(*) from pgbench_history)")


@pytest.fixture
def pg(mount_factory: Callable[..., Mount]) -> Iterator[PgEnv]:
    """Postgres-reachable directories and mounts; every postmaster stopped at the end."""
    for tool in ("unshare", "setpriv"):
        require(tool)
    env = PgEnv(mount_factory)
    try:
        yield env
    finally:
        env.close()


def initialized(pg: PgEnv, *options: str) -> Mount:
    """A lockfs mount whose root holds a fresh cluster made by initdb through the mount."""
    mount = pg.mount(*options)
    result = initdb(mount.dst)
    assert result.returncode == 0, f"initdb through the mount failed:\n{result.stderr}"
    assert (mount.src / "PG_VERSION").is_file()
    return mount


def assert_refused(server: Postmaster) -> None:
    """The postmaster gave up, and its log says why in the words the user sees."""
    assert server.wait_exit() != 0
    log = server.log_text()
    assert EBUSY_TEXT in log, log
    assert READY not in log


def holds_quietly(predicate: Callable[[], bool], timeout: float) -> bool:
    """Whether ``predicate`` becomes true within ``timeout`` (no failure if it does not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def namespace_processes(server: Postmaster) -> list[str]:
    """Command lines of the postmaster's children (its background workers)."""
    inner = server.inner_pid()
    with open(f"/proc/{inner}/task/{inner}/children") as children:
        pids = children.read().split()
    names = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                names.append(cmdline.read().replace(b"\0", b" ").decode().strip())
        except OSError:
            continue
    return names


def test_second_postmaster_refused_first_serves_and_data_stay_consistent(pg: PgEnv) -> None:
    """The whole story: initdb, A serves pgbench, B and pg_ctl refused, A stops, C recovers."""
    mount = initialized(pg)
    a = pg.postmaster(mount.dst, "A")
    a.wait_ready()
    a.pgbench("-i", "-s", "1", "-q")
    run = a.pgbench("-T", "3", "-c", "2")
    assert "number of failed transactions: 0" in run.stdout

    b = pg.postmaster(mount.dst, "B")
    assert_refused(b)
    stop = in_new_namespace_as_postgres(pg_bin("pg_ctl"), "stop", "-D", str(mount.dst),
                                        "-m", "fast")
    assert stop.returncode != 0
    assert EBUSY_TEXT in stop.stderr, stop.stderr

    # A is untouched: still running, still answering, still writing.
    assert a.process.poll() is None
    assert a.psql("select count(*) from pgbench_accounts") == "100000"
    a.pgbench("-n", "-T", "2", "-c", "2")  # -n: no vacuum, no truncation of the history
    status = mount.status()
    assert status["state"] == "held here"
    assert str(a.inner_pid()) in status["processes"]
    assert status["refusals"] >= 2

    assert a.stop() == 0
    assert "database system is shut down" in a.log_text()
    wait_for(lambda: mount.status()["state"] == "free", 10, "the lease to be released")

    c = pg.postmaster(mount.dst, "C")
    c.wait_ready()
    equal, transactions = c.psql(CONSISTENT).split("|")
    assert equal == "t"
    assert int(transactions) > 0
    check = pg_amcheck(c)
    assert check.returncode == 0, check.stdout + check.stderr


def pg_amcheck(server: Postmaster) -> subprocess.CompletedProcess:
    """Check every heap and index of the database (pg_amcheck is part of PostgreSQL 14+)."""
    return subprocess.run(
        [pg_bin("pg_amcheck"), "-h", str(server.sockdir), "-U", "postgres", "--install-missing",
         "--heapallindexed", "--rootdescend", "postgres"],
        capture_output=True, text=True, timeout=120, check=False)


def test_idle_postmaster_with_nothing_open_still_holds(pg: PgEnv) -> None:
    """With autovacuum and the replication launcher off, A can sit with no file open.

    Default hold mode keeps the lease for A's live processes, so B is refused in
    that window, when handle counting alone would have let it in.
    """
    mount = initialized(pg)
    a = pg.postmaster(mount.dst, "A", *IDLE_SETTINGS)
    a.wait_ready()
    workers = " ".join(namespace_processes(a))
    assert "autovacuum launcher" not in workers
    assert "logical replication launcher" not in workers

    idle = holds_quietly(lambda: mount.status()["open_handles"] == 0, 15)
    status = mount.status()
    assert status["state"] == "held here"
    assert str(a.inner_pid()) in status["processes"]

    b = pg.postmaster(mount.dst, "B", *IDLE_SETTINGS)
    assert_refused(b)
    if idle:
        # B came and went while A had nothing open: only A's live processes kept the lease
        assert mount.status()["open_handles"] == 0
    assert a.process.poll() is None
    assert a.psql("select 1") == "1"
    assert a.stop() == 0


def test_second_lockfs_daemon_on_same_source_is_refused(pg: PgEnv) -> None:
    """Two pods on one node, each with its own lockfs: the OFD lock on SRC decides."""
    first = initialized(pg)
    second = pg.mount(src=first.src)
    a = pg.postmaster(first.dst, "A")
    a.wait_ready()

    b = pg.postmaster(second.dst, "B")
    assert_refused(b)
    other = second.status()
    assert other["state"] == "held by another mount"
    assert other["other_mount"]["daemon_pid"] == first.daemon_pid
    assert other["refusals"] >= 1

    a.psql("create table t as select 1 as x")
    assert a.psql("select count(*) from t") == "1"
    assert a.stop() == 0
    wait_for(lambda: second.status()["state"] == "free", 10, "mount 1 to let go of SRC")
    c = pg.postmaster(second.dst, "C")
    c.wait_ready()
    assert c.psql("select count(*) from t") == "1"


def test_hold_open_lets_a_second_postmaster_in_while_the_first_idles(pg: PgEnv) -> None:
    """Why the default is hold=process: with hold=open an idle A has nothing open, loses
    the lease, and B starts on A's live data directory (documented in docs/deploy.md).
    A finds out at its next file open: EBUSY."""
    mount = initialized(pg, "--hold=open")
    a = pg.postmaster(mount.dst, "A", *IDLE_SETTINGS)
    a.wait_ready()
    wait_for(lambda: mount.status()["state"] == "free", 15,
             "idle A to lose the lease (nothing open, hold=open)")
    assert a.process.poll() is None

    b = pg.postmaster(mount.dst, "B", *IDLE_SETTINGS)
    b.wait_ready()  # the hazard: two servers on one data directory
    assert a.process.poll() is None
    result = subprocess.run(
        [pg_bin("psql"), "-X", "-h", str(a.sockdir), "-U", "postgres", "-Atc", "select 1"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert EBUSY_TEXT in result.stderr, result.stderr
