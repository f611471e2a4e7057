"""Tables for benchmark output."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None,
                width: int | None = None) -> None:
    """`width`: columns to lay out for when the output is not a terminal (logs, pipes), where rich
    would otherwise squeeze a wide table into 80 columns."""
    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    console = Console()
    if width is not None and not console.is_terminal:
        console = Console(width=width)
    console.print(table)


def write_json(path: str | None, obj: Any) -> None:
    """Write a benchmark's JSON result (when `--json` was given) and say where."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
        print(f"wrote {path}")
