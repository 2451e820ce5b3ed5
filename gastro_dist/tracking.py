"""Tracking: RUN/metrics.jsonl, RUN/summary.json, and W&B through accelerate's trackers.

Only the main process writes. `metrics.jsonl` always gets one JSON object per logged event,
whatever the tracker. W&B is one run per job, started by accelerate's `init_trackers`; its run
id is kept in RUN/tracking.json so that a resumed or requeued job continues the same W&B run.
No secret from the environment (W&B API keys, tokens) is ever written: the config we log holds
none, and `redact` masks anything that looks like one before a file is written.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from gastro_dist.config import TrainConfig, to_dict

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)


def redact(value: Any) -> Any:
    """Mask values under secret-looking keys, and any string equal to a secret environment variable."""
    secrets = {v for k, v in os.environ.items() if _SECRET_KEY.search(k) and len(v) >= 8}

    def walk(obj: Any, key: str = "") -> Any:
        if isinstance(obj, dict):
            return {k: walk(v, str(k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v, key) for v in obj]
        if isinstance(obj, str) and (_SECRET_KEY.search(key) or any(s in obj for s in secrets)):
            return "***"
        return obj

    return walk(value)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(redact(data), indent=2, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


class RunLog:
    """metrics.jsonl + W&B for one run; every method is a no-op off the main process."""

    def __init__(self, accelerator, run_dir: Path, config: TrainConfig):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.is_main = accelerator.is_main_process
        self.use_wandb = config.tracking.tracker == "wandb"
        self.metrics_path = run_dir / "metrics.jsonl"
        if self.use_wandb:
            self._init_wandb(config)

    def _init_wandb(self, config: TrainConfig) -> None:
        tracking_file = self.run_dir / "tracking.json"
        run_id = None
        if tracking_file.is_file():
            run_id = json.loads(tracking_file.read_text()).get("wandb_run_id")
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
        init_kwargs = {"wandb": {
            "id": run_id, "resume": "allow", "dir": str(self.run_dir),
            "name": config.tracking.run_name or self.run_dir.name,
            "entity": config.tracking.entity, "tags": list(config.tracking.tags),
        }}
        self.accelerator.init_trackers(config.tracking.project, config=redact(to_dict(config)), init_kwargs=init_kwargs)
        if self.is_main:
            write_json_atomic(tracking_file, {"wandb_run_id": run_id, "project": config.tracking.project})
        self.wandb_run_id = run_id

    def log(self, event: str, values: dict[str, Any], step: int | None = None) -> None:
        if not self.is_main:
            return
        record = {"event": event, "time": round(time.time(), 3), **values}
        with self.metrics_path.open("a") as f:
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
