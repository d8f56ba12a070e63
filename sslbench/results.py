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
    """(header, body) of the method x task table of whatever ``rows`` hold (see ``matrix_table``).

    Rows keep the order in which methods first appear; columns are the (task, protocol) pairs found,
    in a fixed task order, each pooling the datasets it was evaluated on.
    """
    methods = list(dict.fromkeys(row["method"] for row in rows))
    columns = list(dict.fromkeys((row["task"], row["protocol"], None) for row in rows))
    order = list(HEADLINE_METRIC)
    columns.sort(key=lambda c: (order.index(c[0]) if c[0] in order else len(order), c[1]))
    return matrix_table(rows, methods, columns)


def matrix_table(rows: list[dict[str, Any]], methods: list[str],
                 columns: list[tuple[str, str, str | None]]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the core study's table: one line per method in ``methods``, one column per
    ``(task, protocol, dataset)`` in ``columns`` (dataset None: any), each cell the task's headline
    metric as ``mean ± std`` over seeds (sample std), ``-`` where no row exists. A task missing from
    ``HEADLINE_METRIC`` shows the first metric its rows carry.

    The newest row wins when the same (method, checkpoint, dataset, task, protocol, metric, seed)
    was evaluated twice, so a re-run replaces a value instead of counting as another seed.
    """
    latest: dict[tuple, dict] = {}
    for row in rows:
        key = (row["method"], row["checkpoint"], row["dataset"], row["task"], row["protocol"], row["metric"], row["seed"])
        latest[key] = row
    headline = {task: metric for task, (metric, _) in HEADLINE_METRIC.items()}
    for row in rows:
        headline.setdefault(row["task"], row["metric"])
    cells: dict[tuple[str, tuple[str, str, str | None]], list[float]] = defaultdict(list)
    for row in latest.values():
        if row["metric"] == headline[row["task"]]:
            for column in ((row["task"], row["protocol"], row["dataset"]), (row["task"], row["protocol"], None)):
                cells[(row["method"], column)].append(float(row["value"]))
    header = ["method"]
    for task, protocol, dataset in columns:
        metric, lower_is_better = headline.get(task, "-"), HEADLINE_METRIC.get(task, ("", False))[1]
        prefix = f"{dataset} " if dataset is not None else ""
        header.append(f"{prefix}{SHORT_TASK.get(task, task)}/{protocol} {metric} {'↓' if lower_is_better else '↑'}")
    body = [[method, *(format_cell(cells.get((method, column), [])) for column in columns)] for method in methods]
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
    print_table(*summary_table(rows), title=title)


def print_table(header: list[str], body: list[list[str]], title: str) -> None:
    """Print a (header, body) table with rich, at least 120 columns wide."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Labels such as ``detcon_s[fh]`` or ``ddae[t=11,up1.1]`` are data, not rich markup: escape them, or rich
    # would swallow the brackets as a style tag and print ``detcon_s``.
    table = Table(title=escape(title), caption="↑ higher is better, ↓ lower is better")
    for name in header:
        table.add_column(escape(name), justify="left" if name == "method" else "right", no_wrap=name == "method")
    for line in body:
        table.add_row(*map(escape, line))
    console = Console()
    Console(width=max(console.width, 120)).print(table)
