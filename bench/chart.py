"""Draw the ratios of a bench/run.py result as a PNG bar chart.

Usage: .venv/bin/python bench/chart.py RESULT.json OUT.png

matplotlib is a bench-only dependency: it is installed into the running
interpreter's environment on first use and is never a runtime dependency of
lockfs.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path


def _matplotlib():
    try:
        return importlib.import_module("matplotlib")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        return importlib.import_module("matplotlib")


def draw(report: dict, out: Path) -> None:
    """One group of bars per throughput metric: lockfs/native, bindfs/native (log scale)."""
    mpl = _matplotlib()
    mpl.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    rows = [(key, entry) for key, entry in report["results"].items()
            if entry["higher_is_better"] and entry["ratios"]["lockfs/native"] is not None]
    labels = [key for key, _ in rows]
    lockfs = [entry["ratios"]["lockfs/native"] for _, entry in rows]
    bindfs = [entry["ratios"]["bindfs/native"] or 0 for _, entry in rows]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.6))
    y = list(range(len(rows)))
    ax.barh([i - 0.2 for i in y], lockfs, height=0.4, label="lockfs / native", color="#1f77b4")
    ax.barh([i + 0.2 for i in y], bindfs, height=0.4, label="bindfs / native", color="#bbbbbb")
    for i, value in enumerate(lockfs):
        ax.text(value * 1.05, i - 0.2, f"{value:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("throughput ratio to the native directory (log scale; 1 = native)")
    mode = report.get("mode", "?")
    ax.set_title(f"lockfs vs bindfs, medians of {report.get('rounds')} round(s), {mode} run",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    draw(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
