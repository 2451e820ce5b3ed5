"""Plain progress lines for logs (SLURM, nohup, CI): what they say and when."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from gastro_dist.progress import LineProgress, progress


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_a_log_gets_plain_lines_with_fields_and_eta(monkeypatch):
    monkeypatch.setenv("GASTRO_DIST_LOG_EVERY_S", "0")
    console, out = _console()
    bar = progress(console, describe_fields=lambda f: f"loss {f['loss']:.3f} {f['ips']:,.0f} img/s")
    assert isinstance(bar, LineProgress)
    with bar:
        task = bar.add_task("finetune epoch 3/20", total=412, loss=float("nan"), ips=0.0)
        bar.update(task, completed=140, loss=0.6123, ips=1230.4)
        bar.update(task, completed=412)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("finetune epoch 3/20 step 140/412 loss 0.612 1,230 img/s eta ")
    assert lines[-1] == "finetune epoch 3/20 step 412/412 loss 0.612 1,230 img/s"


def test_lines_come_at_most_once_per_interval_and_short_tasks_stay_quiet(monkeypatch):
    monkeypatch.setenv("GASTRO_DIST_LOG_EVERY_S", "3600")
    console, out = _console()
    with progress(console, unit="samples") as bar:
        task = bar.add_task("verifying", total=10)
        for _ in range(10):
            bar.advance(task)
    assert out.getvalue() == ""


def test_a_terminal_gets_rich_bars_and_other_ranks_nothing():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress(terminal), Progress)
    console, _ = _console()
    quiet = progress(console, enabled=False)
    assert isinstance(quiet, Progress) and quiet.disable
