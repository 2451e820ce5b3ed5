"""Tracking: RUN/metrics.jsonl (every event, whatever the tracker) and W&B through accelerate's
trackers, one run per job, continued after a resume (its id is in RUN/tracking.json). Only the
main process writes; secrets are masked (`run_dir.redact`)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from gastro_dist.config import TrainConfig, to_dict
from gastro_dist.run_dir import RunDir, redact


class RunLog:
    """metrics.jsonl + W&B for one run; every method is a no-op off the main process."""

    def __init__(self, accelerator, run_dir: RunDir, config: TrainConfig):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.is_main = accelerator.is_main_process
        self.use_wandb = config.tracking.tracker == "wandb"
        if self.use_wandb:
            self._init_wandb(config)

    def _init_wandb(self, config: TrainConfig) -> None:
        run_id = self.run_dir.read_tracking().get("wandb_run_id") or uuid.uuid4().hex[:12]
        init_kwargs = {"wandb": {
            "id": run_id, "resume": "allow", "dir": str(self.run_dir.path),
            "name": config.tracking.run_name or self.run_dir.path.name,
            "entity": config.tracking.entity, "tags": list(config.tracking.tags),
        }}
        self.accelerator.init_trackers(config.tracking.project, config=redact(to_dict(config)), init_kwargs=init_kwargs)
        if self.is_main:
            self.run_dir.write_tracking({"wandb_run_id": run_id, "project": config.tracking.project})
        self.wandb_run_id = run_id

    def log(self, event: str, values: dict[str, Any], step: int | None = None) -> None:
        if not self.is_main:
            return
        record = {"event": event, "time": round(time.time(), 3), **values}
        with self.run_dir.metrics_jsonl.open("a") as f:
            f.write(json.dumps(redact(record), default=float) + "\n")
        if self.use_wandb:
            flat = {f"{event}/{k}": v for k, v in _flatten(values).items() if isinstance(v, (int, float))}
            self.accelerator.log(flat, step=step)

    def close(self) -> None:
        """Finish the trackers. Not accelerate's `end_training()`: it also destroys the process group,
        which the ranks still need after this (their final barrier, evaluation in `compare`)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat
