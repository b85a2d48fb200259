"""Smoke test of the benchmark: it runs, prints its table and writes valid JSON.

Why no timing asserts: timings on shared machines are noise; the benchmark
itself (bench/run.py, docs/performance.md) is the performance gate. This only
guards the harness: three targets mounted side by side, every mount unmounted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import require

REPO = Path(__file__).resolve().parents[1]


def test_bench_quick_prints_table_and_writes_json(tmp_path: Path) -> None:
    for tool in ("fio", "bindfs", "dbench", "pgbench"):
        require(tool)
    out = tmp_path / "result.json"
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--rounds", "1",
         "--only", "metadata,openclose", "--json", str(out), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header[:5] == ["metric", "unit", "native", "lockfs", "bindfs"]
    assert any(line.startswith("meta_create") for line in lines)
    assert any(line.startswith("openclose_4") for line in lines)

    report = json.loads(out.read_text())
    assert report["mode"] == "quick"
    assert set(report["targets"]) == {"native", "lockfs", "bindfs"}
    assert not report["failures"]
    for key in ("meta_create", "meta_stat", "meta_list", "meta_rename", "meta_unlink",
                "openclose_1", "openclose_4"):
        entry = report["results"][key]
        assert set(entry["samples"]) == {"native", "lockfs", "bindfs"}
        for samples in entry["samples"].values():
            assert len(samples) == 1 and samples[0] > 0
        assert set(entry["ratios"]) == {"lockfs/native", "bindfs/native", "lockfs/bindfs"}
    # Nothing left mounted and the work directory is gone.
    with open("/proc/self/mountinfo") as mountinfo:
        assert str(workdir) not in mountinfo.read()
    assert not workdir.exists()
