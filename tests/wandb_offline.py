"""Reading what W&B wrote for a run in offline mode, once it has all been written.

`run.finish()` only tells W&B's service process that the run is over; the service closes (and
flushes) the run's `.wandb` log afterwards, on its own schedule. A test that reads the log right
after training in the same process can therefore see a file holding only its header. Tearing the
service down waits for it to exit, after which every log it wrote is complete; the next W&B run in
the same process starts a new service.
"""

from __future__ import annotations

from pathlib import Path


def finish_wandb_writes() -> None:
    import wandb

    wandb.teardown()


def wandb_offline_records(run: Path) -> tuple[list[Path], bytes]:
    """The offline run folders under `run/wandb` and the bytes of their logs (logged keys are plain text)."""
    finish_wandb_writes()
    folders = sorted((run / "wandb").glob("offline-run-*"))
    return folders, b"".join(p.read_bytes() for folder in folders for p in folder.glob("run-*.wandb"))
