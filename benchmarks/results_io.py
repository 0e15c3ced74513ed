"""Where a benchmark's results go: benchmarks/results/<name>.md (the table, with its command) and <name>.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, lines: list[str], data: Any) -> str:
    """Write the Markdown `lines` and the raw `data`; returns (and prints) the Markdown."""
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(text)
    return text
