"""Merge several bench/run.py result files into one table and JSON.

Why: a full run can be completed in parts (``--only``), e.g. when one
workload had to be re-run; the parts' samples are merged per metric and
target, and medians and ratios are recomputed from them.

Usage: .venv/bin/python bench/merge.py OUT.json IN.json [IN.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import summarize, table


def merge(parts: list[dict]) -> dict:
    """Later parts replace earlier ones metric by metric (a re-run wins)."""
    merged = dict(parts[0])
    merged["parts"] = [{"command": p["command"], "started": p["started"], "sizes": p["sizes"],
                        "lockfs_pythonpath": p.get("lockfs_pythonpath"),
                        "failures": p.get("failures", {}), "seconds": p.get("seconds")}
                       for p in parts]
    results: dict[str, dict] = {}
    for part in parts:
        results.update(part["results"])
    summarize(results)
    merged["results"] = results
    merged["failures"] = {k: v for p in parts for k, v in p.get("failures", {}).items()
                          if not any(r["workload"] == k for r in results.values())}
    return merged


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    merged = merge([json.loads(Path(p).read_text()) for p in argv[1:]])
    Path(argv[0]).write_text(json.dumps(merged, indent=2) + "\n")
    print(table(merged["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
