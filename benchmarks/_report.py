"""What the benchmarks share: the CPU's name for their reports, each figure's median over rounds, and their common
ending (print the JSON report and, with ``--json FILE``, write it there too)."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(report: dict, path: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def median_result(runs: list[dict]) -> dict:
    """One system's results over several rounds → each number its median (the middle round; the mean of the two
    middle ones for an even count), anything else as the first round had it, and the rounds themselves under
    ``rounds``. A number missing from a round (a failed part) is taken over the rounds that have it."""
    out: dict = {}
    for key in dict.fromkeys(k for r in runs for k in r):
        vals = [r[key] for r in runs if key in r]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[key] = statistics.median(nums) if nums and len(nums) == len(vals) else vals[0]
    out["rounds"] = runs
    return out
