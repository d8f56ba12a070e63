"""Results as data: every evaluation appends one JSON line; tables are pure functions of the rows.

Rows are appended with a single ``write`` of one line under an exclusive lock, so concurrent
evaluations (a matrix run on several GPUs) never interleave half-lines.
"""

from __future__ import annotations

import fcntl
import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from sslbench import __version__
from sslbench.errors import SslbenchError

RESULTS_FILE = "results.jsonl"
ROW_FIELDS = ("method", "checkpoint", "dataset", "task", "protocol", "metric", "value", "seed", "epochs", "seconds")

# Short task names for table headers, so the table fits a terminal.
SHORT_TASK = {"classification": "class", "counting": "count", "depth": "depth", "segmentation": "seg"}

# The metric shown in the summary table for each task, and whether lower is better.
HEADLINE_METRIC: dict[str, tuple[str, bool]] = {
    "classification": ("top1", False),
    "counting": ("accuracy", False),
    "depth": ("rmse", True),
    "segmentation": ("miou", False),
}


def results_path(path: Path) -> Path:
    """``path`` itself if it is a file (or ends in .jsonl), else ``path/results.jsonl``."""
    return path if path.suffix == ".jsonl" or path.is_file() else path / RESULTS_FILE


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows (each with every field of ``ROW_FIELDS``) plus version and time stamp."""
    target = results_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    lines = []
    for row in rows:
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            raise ValueError(f"result row lacks {missing}")
        lines.append(json.dumps({**row, "version": __version__, "time": stamp}, sort_keys=True) + "\n")
    with open(target, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("".join(lines))
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_UN)


def load_rows(path: Path) -> list[dict[str, Any]]:
    target = results_path(path)
    if not target.is_file():
        raise SslbenchError(f"no results file at {target}; run 'sslbench eval' or 'sslbench demo' with --out pointing there first")
    rows = []
    for number, line in enumerate(target.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise SslbenchError(f"{target} line {number} is not JSON; remove or fix that line") from None
    return rows


def summary_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the method x task table: headline metric per task, mean +- std over seeds.

    Columns are "task/protocol metric" in a fixed task order; rows keep the order in which methods
    first appear. The newest row wins when the same (method, checkpoint, task, protocol, metric,
    seed) was evaluated twice.
    """
    latest: dict[tuple, dict] = {}
    for row in rows:
        key = (row["method"], row["checkpoint"], row["dataset"], row["task"], row["protocol"], row["metric"], row["seed"])
        latest[key] = row
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    methods: list[str] = []
    columns: list[tuple[str, str, str]] = []
    for row in latest.values():
        metric, _ = HEADLINE_METRIC.get(row["task"], (row["metric"], False))
        if row["metric"] != metric:
            continue
        column = (row["task"], row["protocol"], metric)
        if column not in columns:
            columns.append(column)
        if row["method"] not in methods:
            methods.append(row["method"])
        cells[(row["method"], column)].append(float(row["value"]))
    order = list(HEADLINE_METRIC)
    columns.sort(key=lambda c: (order.index(c[0]) if c[0] in order else len(order), c[1]))
    header = ["method"] + [f"{SHORT_TASK.get(task, task)}/{protocol} {metric} {'↓' if HEADLINE_METRIC.get(task, ('', False))[1] else '↑'}"
                           for task, protocol, metric in columns]
    body = []
    for method in methods:
        line = [method]
        for column in columns:
            values = cells.get((method, column), [])
            line.append(format_cell(values))
        body.append(line)
    return header, body


def format_cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1 or math.isnan(mean):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def render_table(rows: list[dict[str, Any]], title: str = "sslbench results") -> None:
    """Print the summary table with rich."""
    from rich.console import Console
    from rich.table import Table

    header, body = summary_table(rows)
    table = Table(title=title, caption="↑ higher is better, ↓ lower is better")
    for name in header:
        table.add_column(name, justify="left" if name == "method" else "right", no_wrap=name == "method")
    for line in body:
        table.add_row(*line)
    console = Console()
    Console(width=max(console.width, 120)).print(table)
