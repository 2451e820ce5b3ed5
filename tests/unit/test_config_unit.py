"""Config loading on its own: coercion of every field type, overrides, and every check's one-line message."""

from __future__ import annotations

import dataclasses

import pytest

from gastro_dist import UserError
from gastro_dist.config import TrainConfig, apply_overrides, from_dict, load_config, to_dict


def _load(*overrides: str) -> TrainConfig:
    return load_config(None, list(overrides))


@pytest.mark.parametrize("override, field_path, value", [
    ("data.batch_size=8", "data.batch_size", 8),  # int
    ("data.batch_size='8'", "data.batch_size", 8),  # int from quoted text
    ("head.lr=1e-3", "head.lr", 1e-3),  # float that YAML 1.1 leaves as text
    ("head.lr=2E-4", "head.lr", 2e-4),
    ("head.lr=.5", "head.lr", 0.5),
    ("head.lr=3", "head.lr", 3.0),  # int accepted for a float
    ("data.hflip=false", "data.hflip", False),  # bool
    ("model.name=vgg19", "model.name", "vgg19"),  # str
    ("mixed_precision=no", "mixed_precision", "no"),  # YAML's no -> False -> back to the word
    ("head.unfreeze=2", "head.unfreeze", "2"),  # str from an int
    ("tracking.entity=team", "tracking.entity", "team"),  # Optional[str]
    ("tracking.entity=null", "tracking.entity", None),
    ("tracking.tags=[a,b]", "tracking.tags", ["a", "b"]),  # list[str]
    ("data.mean=[0.5,0.5,0.5]", "data.mean", (0.5, 0.5, 0.5)),  # tuple[float, ...]
    ("class_weights=balanced", "class_weights", "balanced"),  # Any
    ("class_weights=[1,2.5,0]", "class_weights", [1.0, 2.5, 0.0]),
])
def test_every_field_type_is_coerced(override, field_path, value):
    config = _load(override)
    section, _, name = field_path.rpartition(".")
    assert getattr(getattr(config, section) if section else config, name) == value


@pytest.mark.parametrize("override, message", [
    ("model.dropout=1", "dropout must be in [0, 1)"),
    ("model.aux_loss_weight=-1", "aux_loss_weight must be >= 0"),
    ("model.pretrained=''", "pretrained must be"),
    ("data.image_size=16", "image_size must be >= 32"),
    ("data.batch_size=0", "batch_size must be >= 1"),
    ("data.eval_batch_size=0", "eval_batch_size must be >= 1"),
    ("data.num_workers=-1", "num_workers must be >= 0"),
    ("data.max_member_mb=0", "max_member_mb must be >= 1"),
    ("data.shuffle_buffer=0", "shuffle_buffer must be >= 1"),
    ("data.crop_scale_min=0.01", "crop_scale_min must be in [0.05, 1]"),
    ("data.eval_crop_ratio=0.2", "eval_crop_ratio must be in [0.5, 1]"),
    ("data.hue_jitter=0.9", "hue_jitter must be in [0, 0.5]"),
    ("data.decode_on=gpu", "decode_on must be workers or device"),
    ("data.mean=[0.5,0.5]", "mean and std need 3 values"),
    ("head.epochs=-1", "epochs must be >= 0"),
    ("head.optimizer=adam", "optimizer must be 'adamw' or 'sgd'"),
    ("head.lr=0", "lr must be > 0"),
    ("head.weight_decay=-0.1", "weight_decay must be >= 0"),
    ("head.warmup_epochs=-1", "warmup_epochs must be >= 0"),
    ("head.min_lr_ratio=2", "min_lr_ratio must be in [0, 1]"),
    ("head.unfreeze=some", "unfreeze must be 'none', 'all' or a positive number"),
    ("tracking.tracker=comet", "unknown tracker comet"),
    ("tracking.log_every_steps=0", "log_every_steps must be >= 1"),
    ("mixed_precision=fp8", "mixed_precision must be"),
    ("grad_accum_steps=0", "grad_accum_steps must be >= 1"),
    ("grad_clip_norm=-1", "grad_clip_norm must be >= 0"),
    ("label_smoothing=1", "label_smoothing must be in [0, 1)"),
    ("class_weights=heavy", "class_weights must be 'none', 'balanced' or a list"),
    ("class_weights=[1,-1]", "class_weights must be numbers >= 0"),
    ("checkpoint_every_steps=-1", "checkpoint_every_steps must be >= 0"),
    ("keep_checkpoints=0", "keep_checkpoints must be >= 1"),
    ("max_nonfinite_steps=0", "max_nonfinite_steps must be >= 1"),
    ("max_steps_per_epoch=-1", "max_steps_per_epoch must be >= 0"),
    ("head.lr=fast", "config key 'head.lr' needs a finite number, got 'fast'"),
    ("head.lr=.inf", "config key 'head.lr' needs a finite number"),
    ("data.batch_size=1.5", "config key 'data.batch_size' needs a whole number"),
    ("data.hflip=maybe", "config key 'data.hflip' needs true or false"),
    ("tracking.tags=solo", "config key 'tracking.tags' needs a list"),
    ("data.colour=red", "unknown config key 'data.colour'"),
    ("data=3", "config section 'data.' must be a mapping"),
    ("nonsense", "must look like key=value"),
    ("data.batch_size.x=1", "config key 'data.batch_size' needs a whole number, got {'x': 1}"),
])
def test_every_mistake_is_one_line_naming_the_key_or_the_rule(override, message):
    with pytest.raises(UserError) as caught:
        _load(override)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_both_phases_at_zero_epochs_is_refused():
    with pytest.raises(UserError, match="nothing to train"):
        _load("head.epochs=0", "finetune.epochs=0")


def test_an_override_below_a_value_is_refused():
    with pytest.raises(UserError, match="'batch_size' is not a config section"):
        apply_overrides({"data": {"batch_size": 4}}, ["data.batch_size.x=1"])


def test_overrides_build_nested_sections_and_later_ones_win():
    data = apply_overrides({}, ["data.batch_size=4", "data.batch_size=6", "head.lr=0.1"])
    assert data == {"data": {"batch_size": 6}, "head": {"lr": 0.1}}


def test_a_config_survives_its_own_plain_dict():
    config = _load("head.lr=1e-3", "tracking.tags=[x]", "class_weights=[1,2,3]")
    assert from_dict(TrainConfig, to_dict(config)) == config


def test_every_config_field_has_a_default():
    for section in (TrainConfig, *{f.type for f in dataclasses.fields(TrainConfig) if isinstance(f.type, type)}):
        for f in dataclasses.fields(section):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


def _sections(cls: type) -> list[type]:
    found = [cls]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            found += _sections(type(default))
    return found


def test_every_config_field_has_a_one_line_doc_and_config_show_lists_it():
    from gastro_dist.config import describe_config, field_docs

    shown = describe_config(TrainConfig())
    for section in _sections(TrainConfig):
        docs = field_docs(section)
        for f in dataclasses.fields(section):
            assert docs.get(f.name), f"{section.__name__}.{f.name} has no docstring: `config show` cannot explain it"
            assert f"{f.name}: " in shown and docs[f.name] in shown


def test_config_show_is_yaml_that_loads_back_to_the_same_config():
    import yaml

    from gastro_dist.config import describe_config

    config = _load("head.lr=1e-3", "tracking.tracker=[wandb,mlflow]")
    assert from_dict(TrainConfig, yaml.safe_load(describe_config(config))) == config


def test_config_commands_through_the_cli(tmp_path, capsys):
    from gastro_dist.cli import main

    assert main(["config", "show", "finetune.epochs=40"]) == 0
    assert "epochs: 40  # Epochs of this phase (0 skips it). (default: 20)" in capsys.readouterr().out
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("head:\n  lr: 1e-3\n")
    bad.write_text("head:\n  lr: fast\n")
    assert main(["config", "check", str(good)]) == 0
    assert main(["config", "check", str(bad)]) == 2
    assert "head.lr" in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [("wandb", ["wandb"]), ("none", []), ("[wandb,mlflow,wandb]", ["wandb", "mlflow"]),
                                             ("[tensorboard,none]", ["tensorboard"])])
def test_trackers_are_a_name_or_a_list(value, expected):
    assert _load(f"tracking.tracker={value}").tracking.tracker == expected
