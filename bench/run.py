"""lockfs benchmark: every workload of issue 5 on native, lockfs and bindfs, side by side.

Usage (as root):
    .venv/bin/python bench/run.py [--quick] [--only NAME,...] [--rounds N]
                                  [--json PATH] [--workdir DIR] [--lockfs-pythonpath DIR]

Why it is built this way: timings on this machine are noisy, so the three
targets run in the same process, one workload at a time, alternating within
each round (the order rotates every round), and only medians and ratios of
medians measured side by side are reported. This process never touches a
mount itself (see worker.py): lockfs's lease would stay with it.

Prints a table and writes JSON (default bench/results/<time>.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from targets import Target, log, run
from workloads import FULL, QUICK, WORKLOADS, Sizes, Workload

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TARGETS = ("native", "lockfs", "bindfs")
TARGET_DESCRIPTIONS = {
    "native": "the backing directory itself",
    "lockfs": "lockfs mount SRC DST --log-file F (default options)",
    "bindfs": "bindfs -f -o default_permissions,nosuid,nodev SRC DST (allow_other is "
              "bindfs's default as root; single-threaded by default)",
}

# Issue 5's targets: (ratio, minimum); "LN" lockfs/native, "LB" lockfs/bindfs;
# ("max", x) bounds the lockfs value itself. Every throughput line also needs LB >= 1.
GOALS: dict[str, list[tuple[str, float]]] = {
    "seqwrite": [("LN", 0.8)],
    "seqread_cold": [("LN", 0.8)],
    "seqread_warm": [("LN", 0.95)],
    "randread_4k_1j": [("LN", 0.9)],
    "randread_4k_4j": [("LN", 0.9)],
    "randwrite_8k_1j": [("LN", 0.3), ("LB", 2.0)],
    "randwrite_8k_4j": [("LN", 0.3), ("LB", 2.0)],
    **{f"meta_{p}": [("LN", 0.3), ("LB", 1.5)]
       for p in ("create", "stat", "list", "rename", "unlink")},
    "openclose_1": [("LB", 1.5)],
    "openclose_4": [("LB", 1.5)],
    "pgbench_tps": [("LN", 0.9)],
    "dbench": [("LN", 0.5), ("LB", 2.0)],
    "handover_ms": [("max", 20.0)],
    "rss_looked_up_mb": [("max", 150.0)],
    "rss_forgotten_mb": [("max", 60.0)],
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and durations (smoke run, a few minutes)")
    parser.add_argument("--only", default="",
                        help=f"comma-separated workloads ({','.join(WORKLOADS)})")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per workload (default 3, --quick 1)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/lockfs-bench"),
                        help="backing directories and mount points (removed at the end)")
    parser.add_argument("--set", default="", metavar="KEY=VALUE,...",
                        help="override sizes/durations, e.g. pg_seconds=20,rand_seconds=10 "
                             "(keys: the fields of workloads.Sizes)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of native,lockfs,bindfs (ratios need two)")
    parser.add_argument("--lockfs-pythonpath", default=None,
                        help="run lockfs from this source tree (to measure a private change)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    args.names = names
    args.target_names = [t for t in TARGETS if t in args.targets.split(",")]
    if not args.target_names:
        parser.error(f"--targets: choose from {TARGETS}")
    args.overrides = {}
    for item in filter(None, args.set.split(",")):
        key, _, value = item.partition("=")
        if key not in Sizes.__dataclass_fields__:
            parser.error(f"--set: unknown key {key!r}")
        args.overrides[key] = float(value) if "." in value else int(value)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


def machine_info(workdir: Path) -> dict[str, object]:
    """What the numbers were measured on."""
    mem_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    fs = run(["findmnt", "-no", "FSTYPE,SOURCE,OPTIONS", "-T", str(workdir)], check=False)
    cpu = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    commit = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False).strip()
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(), "workdir": str(workdir), "workdir_fs": fs.strip(),
        "python": platform.python_version(), "fio": version(["fio", "--version"]),
        "bindfs": version(["bindfs", "--version"]),
        "postgres": version(["/usr/lib/postgresql/15/bin/postgres", "--version"]),
        "lockfs_commit": commit,
        # lockfs holds one descriptor per known inode: this caps what it can look up.
        "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


def _source_commit(pythonpath: str | None) -> str | None:
    """The commit a private lockfs tree was exported from (a COMMIT file beside it), if any."""
    if not pythonpath:
        return None
    for candidate in (Path(pythonpath) / "COMMIT", Path(pythonpath).parent / "COMMIT"):
        if candidate.exists():
            return candidate.read_text().strip()
    out = run(["git", "-C", pythonpath, "rev-parse", "--short", "HEAD"], check=False).strip()
    return out or None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize(results: dict[str, dict]) -> None:
    """Add medians, ratios and goal checks to every metric, in place."""
    for key, entry in results.items():
        med = {t: statistics.median(v) for t, v in entry["samples"].items() if v}
        entry["median"] = med
        ln = ratio(med.get("lockfs"), med.get("native"))
        bn = ratio(med.get("bindfs"), med.get("native"))
        lb = ratio(med.get("lockfs"), med.get("bindfs"))
        entry["ratios"] = {"lockfs/native": ln, "bindfs/native": bn, "lockfs/bindfs": lb}
        goals = list(GOALS.get(key, []))
        if entry["higher_is_better"] and lb is not None and not any(g == "LB" for g, _ in goals):
            goals.append(("LB", 1.0))
        checks = []
        for kind, bound in goals:
            if kind == "LN":
                ok = ln is not None and ln >= bound
                checks.append((f"L/N>={bound:g}", ok if ln is not None else None))
            elif kind == "LB":
                checks.append((f"L/B>={bound:g}", None if lb is None else lb >= bound))
            else:
                value = med.get("lockfs")
                checks.append((f"<={bound:g}", None if value is None else value <= bound))
        entry["goals"] = [{"goal": g, "met": ok} for g, ok in checks]


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100 or (digits == 0 and abs(value) >= 10):
        return f"{value:,.0f}"
    return f"{value:.{max(digits, 2)}f}" if abs(value) < 10 else f"{value:.1f}"


def table(results: dict[str, dict]) -> str:
    """A fixed-width table of medians, ratios and goals."""
    header = ["metric", "unit", "native", "lockfs", "bindfs", "L/N", "B/N", "L/B", "goal"]
    rows = [header]
    for key, entry in results.items():
        med, rat = entry["median"], entry["ratios"]
        goal = " ".join(f"{g['goal']}:{'ok' if g['met'] else 'MISS' if g['met'] is False else '?'}"
                        for g in entry["goals"])
        rows.append([key, entry["unit"] + ("" if entry["higher_is_better"] else " (lower=better)"),
                     _fmt(med.get("native")), _fmt(med.get("lockfs")), _fmt(med.get("bindfs")),
                     _fmt(rat["lockfs/native"], 2), _fmt(rat["bindfs/native"], 2),
                     _fmt(rat["lockfs/bindfs"], 2), goal])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) if i in (0, 1, 8) else cell.rjust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_workload(workload: Workload, targets: dict[str, Target], rounds: int,
                 results: dict[str, dict]) -> None:
    """Set up on every target, then rounds with the target order rotating, then tear down."""
    names = [t for t in TARGETS if t in workload.target_names and t in targets]
    for metric in workload.metrics:
        results[metric.key] = {"label": metric.label, "unit": metric.unit,
                               "higher_is_better": metric.higher_is_better,
                               "workload": workload.name,
                               "samples": {t: [] for t in names}}
    ready: list[str] = []
    try:
        for name in names:
            log(f"{workload.name}: set-up on {name}")
            ready.append(name)
            workload.setup(targets[name])
        for round_no in range(rounds):
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                log(f"{workload.name}: round {round_no + 1}/{rounds} on {name}")
                values = workload.run(targets[name])
                for key, value in values.items():
                    results[key]["samples"][name].append(value)
                log(f"{workload.name}: {name}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    finally:
        for name in ready:
            try:
                workload.teardown(targets[name])
            except Exception as exc:  # keep tearing the others down
                log(f"{workload.name}: teardown on {name} failed: {exc}")
    if workload.extras:
        for metric in workload.metrics:
            results[metric.key].setdefault("extras", {}).update(workload.extras)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root (mounts, drop_caches, runuser)", file=sys.stderr)
        return 2
    for tool in ("fio", "bindfs", "dbench", "pgbench", "unshare", "runuser"):
        if shutil.which(tool) is None:
            print(f"bench/run.py needs '{tool}'", file=sys.stderr)
            return 2
    sizes = dataclasses.replace(QUICK if args.quick else FULL, **args.overrides)
    workdir = args.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    os.chmod(workdir, 0o755)
    env = None
    if args.lockfs_pythonpath:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(args.lockfs_pythonpath))
    every = {
        "native": Target("native", workdir / "native", workdir / "native"),
        "lockfs": Target("lockfs", workdir / "lockfs", workdir / "lockfs-src", lockfs_env=env),
        "bindfs": Target("bindfs", workdir / "bindfs", workdir / "bindfs-src"),
    }
    targets = {name: every[name] for name in args.target_names}
    command = "bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, object] = {
        "command": command.strip(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full", "rounds": args.rounds,
        "sizes": sizes.__dict__, "machine": machine_info(workdir),
        "targets": {name: TARGET_DESCRIPTIONS[name] for name in targets},
        "lockfs_pythonpath": args.lockfs_pythonpath,
        "lockfs_source_commit": _source_commit(args.lockfs_pythonpath),
    }
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    began = time.monotonic()
    try:
        for target in targets.values():
            target.mount()
        for name in args.names:
            workload = WORKLOADS[name](sizes, workdir)
            try:
                run_workload(workload, targets, args.rounds, results)
            except Exception as exc:
                log(f"{name} failed: {exc}")
                failures[name] = str(exc)
    finally:
        for target in targets.values():
            target.unmount()
        if not any(t.is_fuse and t.path.exists() and os.path.ismount(t.path)
                   for t in targets.values()):
            shutil.rmtree(workdir, ignore_errors=True)
    results = {k: v for k, v in results.items() if any(v["samples"].values())}
    summarize(results)
    report["seconds"] = round(time.monotonic() - began, 1)
    report["results"] = results
    report["failures"] = failures
    out = args.json or BENCH_DIR / "results" / (
        dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"\n{len(results)} metrics, {args.rounds} round(s), {report['seconds']} s; "
          f"JSON: {out}")
    if failures:
        print("FAILED workloads: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
