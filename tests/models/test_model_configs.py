"""Every model config composes; the hub ones (the prototype's SFT models) fail offline with one line naming the id."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_train
from omegaconf import OmegaConf

from reprpo_pl.config import CONF_DIR
from reprpo_pl.errors import UserError
from reprpo_pl.models.loading import load_base_model

MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
HUB_MODELS = [m for m in MODELS if "/" in str(OmegaConf.load(Path(CONF_DIR) / "model" / f"{m}.yaml").name_or_path)
              and not str(OmegaConf.load(Path(CONF_DIR) / "model" / f"{m}.yaml").name_or_path).startswith("gguf://")]


def test_the_prototypes_sft_models_have_configs():
    assert {"smollm2_135m_sft", "smollm2_360m", "qwen3_0_6b", "llama1b", "olmo2_1b_sft", "llama3_8b_sft"} <= set(HUB_MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_model_config_composes(name: str):
    cfg = compose_train([f"model={name}"])
    assert cfg.model.name == name and cfg.model.name_or_path


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_model_offline_fails_with_one_line(name: str, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_train([f"model={name}"])
    with pytest.raises(UserError, match=rf"model.name_or_path={cfg.model.name_or_path} is neither a local folder nor in the HF cache"):
        load_base_model(cfg.model)
