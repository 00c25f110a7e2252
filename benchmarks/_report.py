"""The benchmarks' common ending: print the JSON report and, with ``--json FILE``, write it there too."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, path: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
