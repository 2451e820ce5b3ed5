"""Progress for people and for log files: rich's bars on a terminal; elsewhere (SLURM, nohup, CI)
a plain line per task every GASTRO_DIST_LOG_EVERY_S seconds (default 30), e.g.
`finetune epoch 3/20 step 140/412 loss 0.612 1,230 img/s eta 00:05:41`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn

LOG_EVERY_S_ENV = "GASTRO_DIST_LOG_EVERY_S"
DEFAULT_LOG_EVERY_S = 30.0


def log_every_s() -> float:
    """Seconds between plain progress lines (GASTRO_DIST_LOG_EVERY_S; 0 prints every update)."""
    try:
        return max(0.0, float(os.environ.get(LOG_EVERY_S_ENV, DEFAULT_LOG_EVERY_S)))
    except ValueError:
        return DEFAULT_LOG_EVERY_S


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started_s: float = field(default_factory=time.monotonic)
    printed_s: float = field(default_factory=time.monotonic)
    lines_printed: int = 0


class LineProgress:
    """The part of `rich.progress.Progress` gastro-dist uses, writing plain lines: a line each time a
    task's interval has passed, and a last one when it finishes (a task done within its first interval
    prints nothing: its result says enough). `describe_fields` turns a task's fields into text."""

    def __init__(self, console: Console, unit: str, describe_fields: Callable[[dict], str] | None,
                 interval_s: float):
        self.console, self.unit, self.describe_fields, self.interval_s = console, unit, describe_fields, interval_s
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        task_id = len(self.tasks)
        self.tasks[task_id] = _Task(description, total, completed, fields)
        return task_id

    def update(self, task_id: int, *, completed: float | None = None, advance: float | None = None,
               total: float | None = None, description: str | None = None, **fields) -> None:
        task = self.tasks[task_id]
        task.completed = completed if completed is not None else task.completed + (advance or 0)
        task.total = total if total is not None else task.total
        task.description = description or task.description
        task.fields.update(fields)
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        if (finished and task.lines_printed) or now - task.printed_s >= self.interval_s:
            task.printed_s, task.lines_printed = now, task.lines_printed + 1
            self.console.print(self.line(task, now), markup=False, highlight=False)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    def line(self, task: _Task, now: float) -> str:
        total = f"/{task.total:,.0f}" if task.total is not None else ""
        parts = [task.description, f"{self.unit} {task.completed:,.0f}{total}"]
        if self.describe_fields is not None:
            parts.append(self.describe_fields(task.fields))
        if task.total and 0 < task.completed < task.total:
            eta_s = (now - task.started_s) / task.completed * (task.total - task.completed)
            parts.append("eta " + time.strftime("%H:%M:%S", time.gmtime(eta_s)))
        return " ".join(part for part in parts if part)


def progress(console: Console, *columns: ProgressColumn, unit: str = "step", enabled: bool = True,
             transient: bool = False, describe_fields: Callable[[dict], str] | None = None) -> Progress | LineProgress:
    """Rich's bar (with `columns`, or a default set) on a terminal, plain lines otherwise, nothing when
    not `enabled` (e.g. off the main process)."""
    if enabled and not console.is_terminal:
        return LineProgress(console, unit, describe_fields, log_every_s())
    columns = columns or (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=transient, disable=not enabled)
