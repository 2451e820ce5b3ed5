"""Every shipped config loads against the code: its keys and values are valid and its model exists."""

import pytest

from conftest import REPO
from gastro_dist.config import load_config
from gastro_dist.models.backbones import check_model_name, model_preprocessing

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_the_configs_folder_is_not_empty():
    assert {"smoke.yaml", "resnet50.yaml", "vgg19.yaml", "inception_v3.yaml", "convnext_tiny.yaml",
            "vit_small.yaml"} <= {path.name for path in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_shipped_config_loads(path):
    config = load_config(path)
    check_model_name(config.model.name)
    preprocessing = model_preprocessing(config.model.name)
    assert preprocessing.image_size >= 32 and len(preprocessing.mean) == 3
    assert config.head.epochs + config.finetune.epochs > 0
    if config.model.name.startswith("timm:"):
        assert config.finetune.optimizer == "adamw" and config.finetune.warmup_epochs > 0
