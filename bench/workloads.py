"""The workloads of issue 5, each runnable on any of the three targets.

A workload sets up per target (not timed), runs once per round per target
(timed, returns {metric: value}), and tears down. All I/O through a mount is
made by child processes (fio, dbench, pgbench, postgres, worker.py) that exit
before the next step, so no long-lived process keeps lockfs's lease.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from targets import (
    WORKER,
    Target,
    drop_caches,
    fd_count,
    lockfs_status,
    log,
    rss_mb,
    run,
    wait_lease_free,
    worker,
)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DBENCH_LOADFILE = Path("/usr/share/dbench/client.txt")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Sizes:
    """Sizes and durations of one run mode (full or quick)."""

    seq_mib: int
    rand_mib: int
    rand_seconds: int
    meta_files: int
    oc_files: int
    oc_seconds: float
    pg_scale: int
    pg_clients: int
    pg_seconds: int
    handover_trials: int
    dbench_clients: int
    dbench_seconds: int
    mem_dirs: int
    mem_per_dir: int


FULL = Sizes(seq_mib=1024, rand_mib=512, rand_seconds=20, meta_files=20000, oc_files=1000,
             oc_seconds=10, pg_scale=20, pg_clients=4, pg_seconds=60, handover_trials=10,
             dbench_clients=4, dbench_seconds=30, mem_dirs=200, mem_per_dir=1000)
QUICK = Sizes(seq_mib=64, rand_mib=64, rand_seconds=2, meta_files=1000, oc_files=200,
              oc_seconds=1, pg_scale=1, pg_clients=4, pg_seconds=5, handover_trials=3,
              dbench_clients=4, dbench_seconds=3, mem_dirs=10, mem_per_dir=500)


class Workload:
    """Base: one named workload; subclasses fill in setup/run/teardown."""

    name = ""
    metrics: tuple[Metric, ...] = ()
    target_names: tuple[str, ...] = ("native", "lockfs", "bindfs")

    def __init__(self, sizes: Sizes, workdir: Path) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.extras: dict[str, object] = {}

    def setup(self, target: Target) -> None:
        """Prepare ``target`` (not timed)."""

    def run(self, target: Target) -> dict[str, float]:
        raise NotImplementedError

    def teardown(self, target: Target) -> None:
        """Undo setup; called even when setup or a run failed."""


def fio(args: list[str], timeout: float = 600) -> dict:
    """Run fio with JSON output and return its first (group-reported) job."""
    out = run(["fio", "--output-format=json", "--ioengine=psync", *args], timeout=timeout)
    report = json.loads(out[out.index("{"):])
    return report["jobs"][0]


def _rm(path: Path) -> None:
    """Remove through the target, in a child process (never from this process)."""
    run(["rm", "-rf", str(path)], timeout=1800)


def _mkdir(path: Path, owner: str | None = None) -> None:
    argv = ["install", "-d", "-m", "0755", str(path)]
    if owner:
        argv[1:1] = ["-o", owner, "-g", owner]
    run(argv)


class SeqWrite(Workload):
    name = "seqwrite"
    metrics = (Metric("seqwrite", "seq write 1 MiB blocks + fsync", "MiB/s"),)

    def setup(self, target: Target) -> None:
        _mkdir(target.path / "seqw")

    def run(self, target: Target) -> dict[str, float]:
        path = target.path / "seqw" / "seq.dat"
        os.sync()
        start = time.perf_counter()
        fio(["--name=seqwrite", f"--filename={path}", "--rw=write", "--bs=1M",
             f"--size={self.sizes.seq_mib}M", "--end_fsync=1"])
        elapsed = time.perf_counter() - start
        _rm(path)
        return {"seqwrite": self.sizes.seq_mib / elapsed}

    def teardown(self, target: Target) -> None:
        _rm(target.path / "seqw")


class SeqRead(Workload):
    name = "seqread"
    metrics = (Metric("seqread_cold", "seq read cold (drop_caches 3)", "MiB/s"),
               Metric("seqread_warm", "seq read warm", "MiB/s"))

    def _file(self, target: Target) -> Path:
        return target.path / "seqr" / "seq.dat"

    def setup(self, target: Target) -> None:
        _mkdir(target.path / "seqr")
        fio(["--name=layout", f"--filename={self._file(target)}", "--rw=write", "--bs=1M",
             f"--size={self.sizes.seq_mib}M", "--end_fsync=1"])

    def _read(self, target: Target) -> float:
        # --invalidate=0: fio would otherwise drop the file's cached pages first
        # (its default), which makes a "warm" read cold on native only.
        job = fio(["--name=seqread", f"--filename={self._file(target)}", "--rw=read",
                   "--bs=1M", f"--size={self.sizes.seq_mib}M", "--invalidate=0"])
        return job["read"]["bw_bytes"] / 2**20

    def run(self, target: Target) -> dict[str, float]:
        drop_caches(3)
        cold = self._read(target)
        warm = self._read(target)
        return {"seqread_cold": cold, "seqread_warm": warm}

    def teardown(self, target: Target) -> None:
        _rm(target.path / "seqr")


class _RandomIO(Workload):
    """Random I/O over one shared file, 1 and 4 jobs, time-based."""

    mode = ""
    block = ""

    def _file(self, target: Target) -> Path:
        return target.path / f"{self.name}" / "rand.dat"

    def setup(self, target: Target) -> None:
        _mkdir(target.path / self.name)
        fio(["--name=layout", f"--filename={self._file(target)}", "--rw=write", "--bs=1M",
             f"--size={self.sizes.rand_mib}M", "--end_fsync=1"])

    def _job(self, target: Target, jobs: int) -> float:
        os.sync()
        job = fio(["--name=" + self.name, f"--filename={self._file(target)}",
                   f"--rw={self.mode}", f"--bs={self.block}", f"--size={self.sizes.rand_mib}M",
                   "--time_based", f"--runtime={self.sizes.rand_seconds}",
                   f"--numjobs={jobs}", "--group_reporting", "--norandommap",
                   "--randrepeat=0", "--invalidate=0"], timeout=self.sizes.rand_seconds + 300)
        side = "read" if self.mode == "randread" else "write"
        return float(job[side]["iops"])

    def teardown(self, target: Target) -> None:
        _rm(target.path / self.name)


class RandRead(_RandomIO):
    name = "randread"
    mode = "randread"
    block = "4k"
    metrics = (Metric("randread_4k_1j", "rand read 4 KiB warm, 1 job", "IOPS"),
               Metric("randread_4k_4j", "rand read 4 KiB warm, 4 jobs", "IOPS"))

    def run(self, target: Target) -> dict[str, float]:
        # Warm: the whole file read once through the target right before.
        run(["dd", f"if={self._file(target)}", "of=/dev/null", "bs=1M"], timeout=600)
        one = self._job(target, 1)
        four = self._job(target, 4)
        return {"randread_4k_1j": one, "randread_4k_4j": four}


class RandWrite(_RandomIO):
    name = "randwrite"
    mode = "randwrite"
    block = "8k"
    metrics = (Metric("randwrite_8k_1j", "rand write 8 KiB, 1 job", "IOPS"),
               Metric("randwrite_8k_4j", "rand write 8 KiB, 4 jobs", "IOPS"))

    def run(self, target: Target) -> dict[str, float]:
        return {"randwrite_8k_1j": self._job(target, 1), "randwrite_8k_4j": self._job(target, 4)}


class Metadata(Workload):
    name = "metadata"
    metrics = tuple(Metric(f"meta_{phase}", f"metadata {phase} ({what})", "ops/s")
                    for phase, what in (("create", "create+write 100 B+close"),
                                        ("stat", "stat"), ("list", "listdir, entries"),
                                        ("rename", "rename"), ("unlink", "unlink")))

    def setup(self, target: Target) -> None:
        _mkdir(target.path / "meta")
        self.counter = 0

    def run(self, target: Target) -> dict[str, float]:
        self.counter += 1
        directory = target.path / "meta" / f"r{self.counter}"
        os.sync()
        rates = worker("metadata", directory, self.sizes.meta_files)
        return {f"meta_{phase}": rate for phase, rate in rates.items()}

    def teardown(self, target: Target) -> None:
        _rm(target.path / "meta")


class OpenClose(Workload):
    name = "openclose"
    metrics = (Metric("openclose_1", "open+close existing, 1 process", "ops/s"),
               Metric("openclose_4", "open+close existing, 4 processes", "ops/s"))

    def setup(self, target: Target) -> None:
        worker("mkfiles", target.path / "oc", self.sizes.oc_files, 100)

    def _rate(self, target: Target, processes: int) -> float:
        start_at = time.monotonic() + 1.0 + 0.2 * processes
        children = [subprocess.Popen(
            [sys.executable, str(WORKER), "openclose", str(target.path / "oc"),
             str(self.sizes.oc_files), f"{start_at:.6f}", str(self.sizes.oc_seconds)],
            stdout=subprocess.PIPE, text=True) for _ in range(processes)]
        total = 0.0
        for child in children:
            out, _ = child.communicate(timeout=self.sizes.oc_seconds + 120)
            if child.returncode != 0:
                raise RuntimeError(f"openclose worker exited {child.returncode}")
            result = json.loads(out.strip().splitlines()[-1])
            total += result["ops"] / result["seconds"]
        return total

    def run(self, target: Target) -> dict[str, float]:
        return {"openclose_1": self._rate(target, 1), "openclose_4": self._rate(target, 4)}

    def teardown(self, target: Target) -> None:
        _rm(target.path / "oc")


class Dbench(Workload):
    name = "dbench"
    metrics = (Metric("dbench", "dbench 4 clients (client.txt)", "MB/s"),)

    def setup(self, target: Target) -> None:
        _mkdir(target.path / "dbench")

    def run(self, target: Target) -> dict[str, float]:
        os.sync()
        out = run(["dbench", "-c", str(DBENCH_LOADFILE), "-D", str(target.path / "dbench"),
                   "-t", str(self.sizes.dbench_seconds), str(self.sizes.dbench_clients)],
                  timeout=self.sizes.dbench_seconds + 600)
        match = re.search(r"Throughput ([0-9.]+) MB/sec", out)
        if not match:
            raise RuntimeError(f"no throughput in dbench output: {out[-500:]}")
        return {"dbench": float(match.group(1))}

    def teardown(self, target: Target) -> None:
        _rm(target.path / "dbench")


PG_PORTS = {"native": 5491, "lockfs": 5492, "bindfs": 5493}
# Identical on every target; the rest are PostgreSQL 15's defaults (fsync on,
# synchronous_commit on, shared_buffers 128MB, max_wal_size 1GB).
PG_CONF = """
listen_addresses = ''
unix_socket_directories = '{socket}'
port = {port}
shared_buffers = 128MB
max_wal_size = 1GB
fsync = on
synchronous_commit = on
full_page_writes = on
logging_collector = off
"""


def _as_postgres(argv: list[str], **kwargs) -> str:
    return run(["runuser", "-u", "postgres", "--", *argv], **kwargs)


class Pgbench(Workload):
    """pgbench TPC-B-like on a PostgreSQL 15 per target, all started and stopped here."""

    name = "pgbench"
    metrics = (Metric("pgbench_tps", "pgbench TPS (scale, clients, seconds as configured)",
                      "TPS"),)

    def __init__(self, sizes: Sizes, workdir: Path) -> None:
        super().__init__(sizes, workdir)
        self.sockets: dict[str, str] = {}
        self.started: dict[str, Path] = {}

    def _data(self, target: Target) -> Path:
        return target.path / "pg" / "data"

    def setup(self, target: Target) -> None:
        _mkdir(target.path / "pg", owner="postgres")
        data = self._data(target)
        _as_postgres([str(PG_BIN / "initdb"), "-N", "-A", "trust", "-U", "postgres", "-D",
                      str(data)], timeout=600)
        socket_dir = tempfile.mkdtemp(prefix=f"pgsock-{target.name}-")
        shutil.chown(socket_dir, "postgres", "postgres")
        self.sockets[target.name] = socket_dir
        conf = PG_CONF.format(socket=socket_dir, port=PG_PORTS[target.name])
        # Appending runs as postgres in a child: the data directory is on the target.
        subprocess.run(
            ["runuser", "-u", "postgres", "--", "tee", "-a", str(data / "postgresql.conf")],
            input=conf, text=True, capture_output=True, check=True, timeout=60)
        logfile = self.workdir / f"postgres-{target.name}.log"
        logfile.touch()
        shutil.chown(logfile, "postgres", "postgres")
        self.started[target.name] = data
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-w",
                      "-t", "300", "start"], timeout=360)
        _as_postgres(["pgbench", "-i", "-q", "-s", str(self.sizes.pg_scale),
                      *self._conn(target), "postgres"], timeout=1800)

    def _conn(self, target: Target) -> list[str]:
        return ["-h", self.sockets[target.name], "-p", str(PG_PORTS[target.name])]

    def run(self, target: Target) -> dict[str, float]:
        _as_postgres(["psql", "-X", "-q", *self._conn(target), "-c", "CHECKPOINT", "postgres"],
                     timeout=600)
        out = _as_postgres(["pgbench", "-c", str(self.sizes.pg_clients), "-j",
                            str(self.sizes.pg_clients), "-T", str(self.sizes.pg_seconds),
                            *self._conn(target), "postgres"],
                           timeout=self.sizes.pg_seconds + 600)
        match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
        if not match:
            raise RuntimeError(f"no tps in pgbench output: {out[-500:]}")
        return {"pgbench_tps": float(match.group(1))}

    def teardown(self, target: Target) -> None:
        data = self.started.pop(target.name, None)
        if data is not None:
            stop_postgres(data, target)
        socket_dir = self.sockets.pop(target.name, None)
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        _rm(target.path / "pg")


def stop_postgres(data: Path, target: Target) -> None:
    """pg_ctl stop -m fast; if that fails, SIGINT the postmaster by its pid file."""
    result = subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D",
                             str(data), "-m", "fast", "-w", "-t", "120", "stop"],
                            capture_output=True, text=True, check=False, timeout=180)
    if result.returncode == 0:
        return
    pidfile = target.backing / data.relative_to(target.path) / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pidfile.read_text().splitlines()[0])
        os.kill(pid, 2)
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, 9)


class Handover(Workload):
    """Holder exits in one mount namespace; a waiter in another retries open on EBUSY."""

    name = "handover"
    metrics = (Metric("handover_ms", "handover: holder exit -> waiter's open ok", "ms",
                      higher_is_better=False),)
    target_names = ("lockfs",)

    def setup(self, target: Target) -> None:
        worker("mkfiles", target.path / "ho", 1, 10)
        wait_lease_free(target)
        self.trials: list[float] = []

    def _trial(self, target: Target) -> float:
        path = str(target.path / "ho" / "f000000")
        base = ["unshare", "-m", sys.executable, str(WORKER)]
        holder = subprocess.Popen([*base, "hold", path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        waiter = None
        try:
            assert holder.stdout is not None and holder.stdin is not None
            if holder.stdout.readline().strip() != "held":
                raise RuntimeError("handover holder did not get the file")
            waiter = subprocess.Popen([*base, "wait", path, "60"], stdout=subprocess.PIPE,
                                      text=True)
            assert waiter.stdout is not None
            if waiter.stdout.readline().strip() != "waiting":
                raise RuntimeError("handover waiter was not refused while the holder held")
            holder.stdin.write("go\n")
            holder.stdin.flush()
            exited = float(holder.stdout.readline())
            opened = float(waiter.stdout.readline())
            holder.wait(timeout=30)
            waiter.wait(timeout=30)
            if waiter.returncode != 0:
                raise RuntimeError(f"handover waiter exited {waiter.returncode}")
        finally:
            for child in (holder, waiter):
                if child is not None and child.poll() is None:
                    child.kill()
                    child.wait()
        wait_lease_free(target)
        return (opened - exited) * 1000

    def run(self, target: Target) -> dict[str, float]:
        trials = [self._trial(target) for _ in range(self.sizes.handover_trials)]
        self.trials.extend(trials)
        self.extras["handover_trials_ms"] = [round(t, 3) for t in self.trials]
        return {"handover_ms": statistics.median(trials)}

    def teardown(self, target: Target) -> None:
        _rm(target.path / "ho")


class Memory(Workload):
    """Daemon RSS on a fresh mount: at start, after N lookups, after the kernel forgets."""

    name = "memory"
    metrics = (Metric("rss_start_mb", "daemon RSS, fresh mount", "MiB", False),
               Metric("rss_looked_up_mb", "daemon RSS after N files looked up", "MiB", False),
               Metric("rss_forgotten_mb", "daemon RSS after drop_caches 2 + forgets", "MiB",
                      False))
    target_names = ("lockfs", "bindfs")

    def __init__(self, sizes: Sizes, workdir: Path) -> None:
        super().__init__(sizes, workdir)
        self.tree = workdir / "memtree"
        self.mounts: list[Target] = []

    def _build_tree(self) -> None:
        """Lay out the files natively in a backing directory of their own, once."""
        if (self.tree / "done").exists():
            return
        log(f"memory: creating {self.sizes.mem_dirs * self.sizes.mem_per_dir} files")
        for d in range(self.sizes.mem_dirs):
            base = self.tree / f"d{d:04d}"
            base.mkdir(parents=True, exist_ok=True)
            for index in range(self.sizes.mem_per_dir):
                (base / f"f{index:06d}").touch()
        (self.tree / "done").touch()

    def setup(self, target: Target) -> None:
        self._build_tree()

    def run(self, target: Target) -> dict[str, float]:
        mount = Target(target.name, self.workdir / f"mem-{target.name}", self.tree,
                       lockfs_env=target.lockfs_env)
        self.mounts.append(mount)
        try:
            mount.mount()
            pid = mount.daemon_pid
            assert pid is not None
            time.sleep(0.5)
            start = rss_mb(pid)
            worker("statwalk", mount.path, self.sizes.mem_dirs, self.sizes.mem_per_dir)
            looked_up = rss_mb(pid)
            fds_before = fd_count(pid)
            drop_caches(2)
            forgotten, fds_after = _wait_stable(pid)
            if mount.name == "lockfs":
                self.extras.setdefault("lockfs_fds", []).append(  # type: ignore[union-attr]
                    {"looked_up": fds_before, "forgotten": fds_after})
        finally:
            mount.unmount()
            self.mounts.remove(mount)
        return {"rss_start_mb": start, "rss_looked_up_mb": looked_up,
                "rss_forgotten_mb": forgotten}

    def teardown(self, target: Target) -> None:
        for mount in list(self.mounts):
            mount.unmount()


def _wait_stable(pid: int, quiet: float = 2.0, timeout: float = 60.0) -> tuple[float, int]:
    """Poll RSS and fd count until neither has changed for ``quiet`` seconds."""
    last = (rss_mb(pid), fd_count(pid))
    changed = time.monotonic()
    deadline = changed + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = (rss_mb(pid), fd_count(pid))
        if now != last:
            last, changed = now, time.monotonic()
        elif time.monotonic() - changed >= quiet:
            break
    return last


WORKLOADS: dict[str, type[Workload]] = {w.name: w for w in (
    SeqWrite, SeqRead, RandRead, RandWrite, Metadata, OpenClose, Dbench, Pgbench, Handover,
    Memory)}

__all__ = ["FULL", "QUICK", "WORKLOADS", "Metric", "Sizes", "Workload", "lockfs_status"]
