"""The prototype's named runs in conf/experiment/: each composes to the intended method, transform,
loss and collection, and each trains one step on the tiny model."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import compose_train
from hydra.utils import get_class
from omegaconf import DictConfig

from reprpo_pl.data.datamodule import PreferenceDataModule

torch.set_num_threads(1)

# name → (method, transform, loss, collection mode); None where the method uses no transform/loss/collection
EXPERIMENTS = {
    "hs-ether-innerdpo": ("innerdpo", "ether", "innerdpo", "hs"),
    "hs-none-innerdpo": ("innerdpo", "none", "innerdpo", "hs"),
    "hs-supr-innerdpo": ("innerdpo", "supr", "innerdpo", "hs"),
    "side-none-innerdpo": ("innerdpo", "none", "innerdpo", "side"),
    "hs-ether-prefvec": ("prefvec", "ether", "prefvec", "hs"),
    "side-none-prefvec": ("prefvec", "none", "prefvec", "side"),
    "hs-ether-mse": ("mse", "ether", "mse", "hs"),
    "hs-ether-rank": ("rank", "ether", "rank", "hs"),
    "dpo": ("dpo", None, None, None),
    "projgrad": ("projgrad", None, None, None),
    "projbp": ("projbp", None, None, None),
}
TINY = ["model=tiny_random", "adapter.r=8", "data.n_train=2", "data.batch_size=2", "eval.n_samples=1"]


def compose_experiment(name: str, *overrides: str) -> DictConfig:
    return compose_train([f"experiment={name}", *overrides])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_composes(name):
    method, transform, loss, mode = EXPERIMENTS[name]
    cfg = compose_experiment(name)
    assert cfg.method.name == method
    # only ReprPO methods compose transform, loss and collection
    assert ("transform" in cfg, "loss" in cfg, "collection" in cfg) == (transform is not None,) * 3
    if transform is not None:
        assert (cfg.transform.name, cfg.loss.name, cfg.collection.mode) == (transform, loss, mode)
        assert cfg.method._target_ == "reprpo_pl.methods.reprpo.ReprPOModule"


@pytest.fixture(scope="module")
def datamodule(tokenizer) -> PreferenceDataModule:
    """Two training pairs from the embedded source (every experiment shares data settings)."""
    cfg = compose_experiment("dpo", *TINY)
    dm = PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_one_training_step(name, datamodule):
    """One optimiser step on the tiny model: finite loss, LoRA weights move, frozen ones do not. (Not every
    lora_B need move: a loss on hidden states at blocks 1-2 alone, like mse, gives block 3 no gradient.)"""
    cfg = compose_experiment(name, *TINY)
    module = get_class(cfg.method._target_)(cfg)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert moved <= trainable
    assert any("lora_B" in n for n in moved)
