"""Checkpoints under RUN/checkpoints: training states for resume (accelerate's `save_state` plus
trainer_state.json and, with ema.decay, the EMA weights; counted only once their COMPLETE marker is
written) and per-phase weights (`<phase>-best`, `<phase>-last`: safetensors, so loading never runs code)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gastro_dist import RunFailure, UserError
from gastro_dist.files import read_json_file
from gastro_dist.run_dir import ModelMeta, RunDir

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"  # in a training state: the weight EMA (ema.decay), saved by us, not pickled
PHASE_ORDER = ("head", "finetune")


@dataclass
class TrainerState:
    """Where training stands; saved with every training-state checkpoint."""
    phase: str
    epoch: int = 0
    """Current epoch of the phase (0-based)."""
    micro_step: int = 0
    """Micro-batches of this epoch already trained (the data position inside the epoch)."""
    optimizer_steps: int = 0
    """Optimizer steps done in this phase."""
    total_optimizer_steps: int = 0
    """Optimizer steps done in the whole run (all phases): the tracker's step axis."""
    best_score: float = -1.0
    best_epoch: int = -1
    phase_done: bool = False
    data_positions: list = field(default_factory=list)
    """Per rank, per data worker: how many raw samples of this epoch's stream were consumed."""
    scheduler: dict = field(default_factory=dict)
    """The LR scheduler's state (plain numbers, kept here so that nothing is unpickled on resume)."""
    nonfinite_steps: int = 0
    """Optimizer steps skipped in this phase because the loss or gradients were not finite."""

    def sort_key(self) -> tuple:
        return (PHASE_ORDER.index(self.phase), self.phase_done, self.epoch, self.micro_step)


def state_dir_name(state: TrainerState) -> str:
    done = "done" if state.phase_done else f"e{state.epoch:03d}-s{state.micro_step:06d}"
    return f"state-{PHASE_ORDER.index(state.phase)}-{state.phase}-{done}"


def complete_states(run_dir: RunDir | Path) -> list[tuple[TrainerState, Path]]:
    """Committed training states, oldest first; half-written ones are ignored."""
    found = []
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return found
    for path in root.glob("state-*"):
        if not (path / COMPLETE_MARKER).is_file():
            continue
        try:
            state = TrainerState(**read_json_file(path / STATE_FILE, STATE_FILE))
        except (OSError, ValueError, TypeError):
            continue
        found.append((state, path))
    return sorted(found, key=lambda item: item[0].sort_key())


def latest_state(run_dir: RunDir | Path) -> tuple[TrainerState, Path] | None:
    states = complete_states(run_dir)
    return states[-1] if states else None


def save_training_state(accelerator, run_dir: RunDir | Path, state: TrainerState, keep: int,
                        ema_model: torch.nn.Module | None = None) -> Path:
    """All ranks call this. Writes `state-<phase index>-<phase>-e<epoch>-s<step>` under a temporary
    name, writes the COMPLETE marker last, renames it into place, and only then deletes states
    beyond the newest `keep`: a kill at any moment leaves the newest complete one loadable.
    `ema_model`: the weight EMA, the same on every rank, written by the main process as `EMA_FILE`."""
    root = RunDir(run_dir).checkpoints
    final = root / state_dir_name(state)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema_model is not None:
            save_file(_cpu_state(ema_model), str(tmp / EMA_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        _fsync_dir(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in complete_states(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    for item in path.iterdir():
        if item.is_file():
            with item.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _allowed_pickle_globals() -> list:
    """Plain-data classes found in accelerate's and DeepSpeed's state files (numpy arrays of RNG
    states; DeepSpeed's loss scaler, ZeRO stage enum, fragment addresses). Nothing else may appear."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    allowed = list(TORCH_SAFE_GLOBALS)
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return allowed


def state_damage(path: Path) -> str | None:
    """Why a committed training state cannot be loaded (a file truncated or damaged after it was
    written), or None when every file is intact. Every pickle-based file must load with
    `weights_only=True`: accelerate and DeepSpeed read some of them with `weights_only=False`, so
    a file that would run code when unpickled is refused here (an attack, not damage: no fallback).
    """
    allowed = _allowed_pickle_globals()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):  # validates the header and the file's length
                    pass
            except Exception as err:
                return f"{file.name}: {str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__}"
        elif file.suffix in (".pt", ".pth", ".bin", ".pkl"):
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                if "weights only load failed" not in str(err).lower():
                    return f"{file.name}: {str(err).strip()[:200]}"
                last_line = str(err).strip().splitlines()[-1]
                raise UserError(f"refusing to load checkpoint {path}: {file.name} needs pickle code execution "
                                f"({last_line[:200]}); delete that checkpoint folder to resume from an older one") from None
            except Exception as err:  # truncated zip, EOF, ...
                return f"{file.name}: {type(err).__name__}: {str(err).strip()[:200]}"
    return None


def latest_usable_state(run_dir: RunDir | Path, warn) -> tuple[TrainerState, Path] | None:
    """The newest committed state whose files are intact; damaged newer ones are reported through
    `warn` and passed over. If there are committed states but none is intact, the run stops."""
    states = complete_states(run_dir)
    for state, path in reversed(states):
        damage = state_damage(path)
        if damage is None:
            return state, path
        warn(f"checkpoint {path.name} is damaged ({damage}); trying the previous complete one")
    if states:
        raise RunFailure(f"every checkpoint in {RunDir(run_dir).checkpoints} is damaged; delete that folder to "
                         "train from the start, or restore it from a backup")
    return None


# ---------------------------------------------------------------- plain weights
def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_weights(model: torch.nn.Module, directory: Path, meta: dict) -> None:
    """model.safetensors + meta.json, written to a temp directory and renamed into place."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_cpu_state(model), str(tmp / "model.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    if directory.exists():
        old = directory.with_name(f".old-{directory.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def save_final_model(model: torch.nn.Module, run_dir: RunDir, meta: ModelMeta) -> None:
    """RUN/model.safetensors, then RUN/model.json, each replaced atomically: a model.json is only ever
    next to the complete weights it describes."""
    temporary = run_dir.path / f".{run_dir.model_weights.name}.tmp"
    save_file(_cpu_state(model), str(temporary))
    with temporary.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, run_dir.model_weights)
    meta.write(run_dir.model_json)


def load_weights_meta(directory: Path) -> dict:
    """The meta.json `save_weights` wrote next to a phase's weights (epoch, validation scores)."""
    return read_json_file(directory / "meta.json")


def load_weights(directory_or_file: Path) -> dict[str, torch.Tensor]:
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"weights file {path} not found")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for anything that is not safetensors
        detail = str(err).strip().splitlines()[-1][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a readable safetensors weights file ({detail}); give a model.safetensors "
                         "written by gastro-dist (other formats are refused: loading them could run code)") from None
