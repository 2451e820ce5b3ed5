"""What a training run prints on the console: the progress bar, a line per epoch, a table per phase."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from gastro_dist.progress import LineProgress, progress


def epoch_progress(console: Console, enabled: bool) -> Progress | LineProgress:
    """A bar per epoch with the running loss and images/s (`add_task(..., loss=, ips=)`); plain lines in logs."""
    return progress(console, TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), enabled=enabled,
                    describe_fields=lambda fields: f"loss {fields['loss']:.3f} {fields['ips']:,.0f} img/s")


def print_epoch(console: Console, phase: str, epoch: int, epochs: int, scores: dict, improved: bool, train_loss: float,
                learning_rates: dict[str, float], epoch_time_s: float, ema_scores: dict | None = None,
                winner: str = "live") -> None:
    """'finetune epoch 3/20: train loss 0.612 | val loss 0.571 acc 0.800 macro 0.798 | lr 3.0e-04 | 41.2 s |
    per class ...', the learning rates of the parameter groups as a range when they differ; with a weight
    EMA, its macro accuracy too, and 'best (ema)' when the EMA's weights became the best."""
    per_class = "  ".join(f"{c}={v:.3f}" for c, v in scores["per_class_accuracy"].items() if v is not None)
    mark = f" [green]best{' (ema)' if winner == 'ema' else ''}[/]" if improved else ""
    ema = f" | ema macro {ema_scores['macro_accuracy']:.3f}" if ema_scores is not None else ""
    rates = sorted(set(learning_rates.values()))
    lr = f"{rates[0]:.1e}" if len(rates) == 1 else f"{rates[0]:.1e}-{rates[-1]:.1e}"
    console.print(f"{phase} epoch {epoch}/{epochs}: train loss {train_loss:.3f} | val loss {scores['loss']:.3f} "
                  f"acc {scores['accuracy']:.3f} macro {scores['macro_accuracy']:.3f}{ema} | lr {lr} | "
                  f"{epoch_time_s:.1f} s | {per_class}{mark}")


def print_phase_table(console: Console, phase: str, summary: dict, classes: list[str]) -> None:
    table = Table(title=f"phase {phase}: best epoch {summary['best_epoch']}")
    table.add_column("class")
    table.add_column("val accuracy", justify="right")
    for c in classes:
        v = summary["val_per_class_accuracy"].get(c)
        table.add_row(c, "n/a" if v is None else f"{v:.3f}")
    table.add_row("[bold]overall[/]", f"{summary['val_accuracy']:.3f}")
    table.add_row("images/s", f"{summary['images_per_s']:.1f}" if summary["images_per_s"] else "n/a")
    console.print(table)
