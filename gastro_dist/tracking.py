"""Tracking: RUN/metrics.jsonl (every event, whatever the tracker) and W&B, MLflow and TensorBoard
through accelerate's trackers: one tracker run per training run, continued after a resume and by
`evaluate` (the ids are in RUN/tracking.json). Only the main process writes; secrets are masked.
Nothing is written outside the run folder (and MLflow's own store): the project, TensorBoard's
folder under RUN/tensorboard, is a plain name (`TrackingConfig`), and so is a W&B run id read back."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from gastro_dist import RunFailure, UserError
from gastro_dist.config import TrackingConfig
from gastro_dist.files import excerpt, safe_name
from gastro_dist.run_dir import RunDir, redact

# The package each tracker needs, and the pyproject extra that installs it.
_PACKAGES = {"wandb": ("wandb", None), "mlflow": ("mlflow", "mlflow"), "tensorboard": ("tensorboard", "tensorboard")}
_FIX_TRACKING_JSON = "restore the file, or delete it to start new tracker runs"


def check_trackers_installed(tracking: TrackingConfig) -> None:
    for name in tracking.tracker:
        package, extra = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            install = f"pip install 'gastro-dist[{extra}]'" if extra else f"pip install {package}"
            raise UserError(f"tracking.tracker={name} needs the {package} package: {install}, "
                            f"or leave {name} out of tracking.tracker")


def accelerator_tracking_kwargs(tracking: TrackingConfig, run_dir: RunDir) -> dict[str, Any]:
    """What `Accelerator(...)` needs to log to these trackers (TensorBoard writes under RUN/tensorboard)."""
    from accelerate.utils import ProjectConfiguration

    if not tracking.tracker:
        return {}
    return {"log_with": list(tracking.tracker),
            "project_config": ProjectConfiguration(project_dir=str(run_dir.path),
                                                   logging_dir=str(run_dir.path / "tensorboard"))}


def tracking_of_run(run_dir: RunDir) -> TrackingConfig | None:
    """The trackers a training run logged to (RUN/tracking.json), for `evaluate` to add to the same runs;
    checked as a config is (a run folder may come from anywhere), a mistake being the file's."""
    saved = run_dir.read_tracking()
    if not saved.get("trackers"):
        return None
    try:
        return TrackingConfig(tracker=saved["trackers"], project=saved.get("project") or "gastro-dist",
                              entity=saved.get("entity"), run_name=saved.get("run_name"),
                              tags=saved.get("tags") or [], group=saved.get("group"))
    except UserError as err:
        raise RunFailure(f"{run_dir.tracking_json}: {err}; {_FIX_TRACKING_JSON}") from None


def flat_values(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a/b": 1}`: the key form every tracker shows as a path."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_values(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _params(values: dict[str, Any]) -> dict[str, Any]:
    """Config-like values as flat parameters: lists become text (MLflow and TensorBoard take scalars only)."""
    return {key.replace("/", "."): (json.dumps(value) if isinstance(value, (list, tuple)) else value)
            for key, value in flat_values(values).items()}


class RunLog:
    """metrics.jsonl and the trackers of one run; every method is a no-op off the main process.

    `config` (the resolved run config) is logged when the tracker run starts, not when it resumes:
    MLflow refuses a parameter logged twice with another value.
    """

    def __init__(self, accelerator, run_dir: RunDir, tracking: TrackingConfig, config: dict | None = None):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.tracking = tracking
        self.is_main = accelerator.is_main_process
        self.trackers = list(tracking.tracker)
        if self.trackers:
            self._start(config)

    def _start(self, config: dict | None) -> None:
        saved = self.run_dir.read_tracking()
        resuming = bool(saved.get("trackers"))
        wandb_id = saved.get("wandb_run_id") or uuid.uuid4().hex[:12]
        # W&B names a folder after the run id: a path in a copied tracking.json would write outside the run.
        if "wandb" in self.trackers and (not isinstance(wandb_id, str) or safe_name(wandb_id) != wandb_id):
            raise RunFailure(f"{self.run_dir.tracking_json}: wandb_run_id {excerpt(wandb_id)} is not a plain name; "
                             f"{_FIX_TRACKING_JSON}")
        name = self.tracking.run_name or self.run_dir.path.name
        init_kwargs = {
            "wandb": {"id": wandb_id, "resume": "allow", "dir": str(self.run_dir.path), "name": name,
                      "entity": self.tracking.entity, "tags": list(self.tracking.tags), "group": self.tracking.group},
            "mlflow": {"run_id": saved.get("mlflow_run_id"), "run_name": name,
                       "tags": {"gastro_dist.group": self.tracking.group} if self.tracking.group else None,
                       "nested_run": _mlflow_parent_is_active()},
        }
        try:
            self.accelerator.init_trackers(self.tracking.project,
                                           config=None if resuming else _params(redact(config or {})),
                                           init_kwargs={k: v for k, v in init_kwargs.items() if k in self.trackers})
        except Exception as err:  # each tracker raises its own types (bad URI, refused store, no login)
            detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise UserError(f"could not start the trackers {', '.join(self.trackers)}: {type(err).__name__}: {detail}; "
                            "fix the tracker's settings or set tracking.tracker=none") from None
        if not self.is_main:
            return
        if "wandb" in self.trackers:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.define_metric("epoch")
            for metric, best in (("val/macro_accuracy", "max"), ("val/accuracy", "max"), ("val/macro_auc", "max"),
                                 ("val/loss", "min")):
                run.define_metric(metric, step_metric="epoch", summary=best)
            run.define_metric("val/*", step_metric="epoch")
        mlflow_run = self.accelerator.get_tracker("mlflow", unwrap=True) if "mlflow" in self.trackers else None
        self.run_dir.write_tracking({
            "trackers": self.trackers, "project": self.tracking.project, "entity": self.tracking.entity,
            "run_name": self.tracking.run_name, "tags": list(self.tracking.tags), "group": self.tracking.group,
            "wandb_run_id": wandb_id if "wandb" in self.trackers else None,
            "mlflow_run_id": mlflow_run.info.run_id if mlflow_run is not None else None,
            "tensorboard_dir": str(self.run_dir.path / "tensorboard" / self.tracking.project)
            if "tensorboard" in self.trackers else None,
        })

    # ------------------------------------------------------------ what a run logs
    def log(self, event: str, values: dict[str, Any], step: int | None = None, epoch: int | None = None) -> None:
        """One event: a line in metrics.jsonl, and its numbers in every tracker as `event/key`; `epoch`
        (counted over the whole run) is the x axis W&B shows per-epoch metrics against."""
        if not self.is_main:
            return
        record = {"event": event, "time": round(time.time(), 3), **values}
        with self.run_dir.metrics_jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(redact(record), default=float) + "\n")
        if self.trackers:
            numbers = {f"{event}/{k}": v for k, v in flat_values(values).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if epoch is not None:
                numbers["epoch"] = epoch
            self.accelerator.log(numbers, step=step)

    def log_facts(self, name: str, facts: dict[str, Any]) -> None:
        """Values that describe the run once (system, versions): parameters, not metrics."""
        if not self.is_main or not self.trackers:
            return
        facts = redact(facts)
        if "wandb" in self.trackers:
            self.accelerator.get_tracker("wandb", unwrap=True).config.update({name: facts}, allow_val_change=True)
        if "mlflow" in self.trackers:  # tags, not params: a resume on other hardware may change them
            import mlflow

            mlflow.set_tags({key: str(value)[:5000] for key, value in _params({name: facts}).items()})
        if "tensorboard" in self.trackers:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_text(name, "```\n" + json.dumps(facts, indent=2, default=str) + "\n```")
            writer.flush()

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        """PNG figures (confusion matrix, ROC, calibration, Grad-CAM) as images of the run."""
        if not self.is_main or not self.trackers:
            return
        if "wandb" in self.trackers:
            import wandb

            self.accelerator.get_tracker("wandb", unwrap=True).log(
                {tag: wandb.Image(str(path)) for tag, path in images.items()}, step=step)
        if "mlflow" in self.trackers:
            import mlflow

            for tag, path in images.items():
                mlflow.log_artifact(str(path), artifact_path=str(Path("images") / Path(tag).parent))
        if "tensorboard" in self.trackers:
            import numpy as np
            from PIL import Image

            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            for tag, path in images.items():
                with Image.open(path) as image:
                    writer.add_image(tag, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")
            writer.flush()

    def log_files(self, name: str, kind: str, files: list[Path]) -> None:
        """Files kept with the run: a W&B artifact, MLflow artifacts under `name` (TensorBoard keeps no files)."""
        if not self.is_main or not self.trackers:
            return
        if "wandb" in self.trackers:
            import wandb

            artifact = wandb.Artifact(safe_name(name), type=kind)  # W&B takes [A-Za-z0-9._-] only
            for file in files:
                artifact.add_file(str(file))
            self.accelerator.get_tracker("wandb", unwrap=True).log_artifact(artifact)
        if "mlflow" in self.trackers:
            import mlflow

            for file in files:
                mlflow.log_artifact(str(file), artifact_path=name)

    def close(self) -> None:
        """Finish the trackers. Not accelerate's `end_training()`: it also destroys the process group,
        which the ranks still need after this (their final barrier, evaluation in `compare`)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _mlflow_parent_is_active() -> bool:
    """A run started by `group_run` is active: the run being started becomes its child."""
    if importlib.util.find_spec("mlflow") is None:
        return False
    import mlflow

    return mlflow.active_run() is not None


@contextlib.contextmanager
def group_run(tracking: TrackingConfig, is_main: bool) -> Iterator[None]:
    """For `compare`: an MLflow parent run named after `tracking.group` that the runs started meanwhile
    nest under (W&B groups them by `group` alone; TensorBoard shows sibling folders side by side)."""
    if not (is_main and tracking.group and "mlflow" in tracking.tracker):
        yield
        return
    import mlflow

    # The experiment by id, not mlflow.set_experiment: that would stay the process's active experiment
    # afterwards, and MLflow then refuses to resume a run of another one (a later evaluate in the process).
    experiment = mlflow.get_experiment_by_name(tracking.project)
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(tracking.project)
    with mlflow.start_run(run_name=tracking.group, experiment_id=experiment_id):
        yield


def log_final_model(run_log: RunLog, run_dir: RunDir) -> None:
    run_log.log_files(f"model-{run_dir.path.name}", "model", [run_dir.model_weights, run_dir.model_json])
