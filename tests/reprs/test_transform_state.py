"""A transform's whole state travels with the run (issue 14 class 7): checkpoints and the adapter folder
hold every parameter and persistent buffer outside the frozen base (ortho's parametrisation base,
ETHER's frozen W0), so a module rebuilt from them computes what the trained one did without relying on
re-initialisation; and ETHER seeds each collection key apart, so keys of one width get different W0.

Every ``conf/transform/*.yaml`` is enumerated (a new transform is covered without editing this file).
The rebuilt module's transform is drawn under another global seed: a state that the checkpoint drops
and re-initialisation recreates only by luck then shows up as a difference.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_TRAIN, compose_train
from hydra.utils import get_class
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

import reprpo_pl.methods.reprpo as reprpo_module
from reprpo_pl.config import CONF_DIR
from reprpo_pl.data.datamodule import PreferenceDataModule
from reprpo_pl.eval.adapter_export import export_adapter
from reprpo_pl.eval.from_checkpoint import build_module, build_module_from_adapter
from reprpo_pl.methods.base import saved_state_mismatch, saved_state_names
from reprpo_pl.reprs.transforms import build_transform, key_seed

TRANSFORMS = sorted(p.stem for p in (Path(CONF_DIR) / "transform").glob("*.yaml"))


@pytest.fixture
def build_seeded(monkeypatch):
    """``build(cfg, seed)``: the ReprPO module of ``cfg`` whose transform is built right after
    ``torch.manual_seed(seed)`` (the tiny model loader reseeds torch, so without this every build
    would draw the same init)."""
    real = reprpo_module.build_transform

    def build(cfg: DictConfig, seed: int):
        def seeded(*args, **kwargs):
            torch.manual_seed(seed)
            return real(*args, **kwargs)

        with monkeypatch.context() as mp:
            mp.setattr(reprpo_module, "build_transform", seeded)
            return get_class(cfg.method._target_)(cfg)

    return build


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    """One collated batch of two math pairs."""
    cfg = compose_train(TINY_TRAIN)
    dm = PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return next(iter(DataLoader(dm.train_set, batch_size=2, collate_fn=dm.collator)))


def transform_outputs(module, keys: list[str]) -> dict[str, torch.Tensor]:
    """The module's transform on fixed random states ``{key: [2, 5, d]}`` with a full mask ``[2, 5]``."""
    gen = torch.Generator().manual_seed(3)
    hs = {k: torch.randn(2, 5, module.collector.dims[k], generator=gen) for k in keys}
    with torch.no_grad():
        return module.transform(hs, torch.ones(2, 5, dtype=torch.bool))


def assert_same_module(rebuilt, trained, batch: dict[str, torch.Tensor]) -> None:
    keys = trained.collector.keys
    expected, got = transform_outputs(trained, keys), transform_outputs(rebuilt, keys)
    for key in keys:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.compute_loss(batch)[0], trained.compute_loss(batch)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_checkpoint_and_adapter_rebuild_the_trained_transform(name, build_seeded, batch, tmp_path):
    """One optimiser step through Lightning (its ModelCheckpoint writes last.ckpt through `on_save_checkpoint`),
    then the module rebuilt under another seed from (a) the checkpoint, by the eval path and by Lightning's
    resume path (`on_load_checkpoint`, then a non-strict load), and (b) the adapter folder: all equal the
    trained module, transform outputs and loss, exactly."""
    cfg = compose_train([*TINY_TRAIN, f"transform={name}"])
    trained = build_seeded(cfg, seed=1)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)])
    trainer.fit(trained, train_dataloaders=DataLoader([batch], batch_size=None))
    trained.eval()
    checkpoint = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]

    transform_keys = {f"transform.{k}" for k in trained.transform.state_dict()}
    assert transform_keys <= set(state), f"the checkpoint drops {sorted(transform_keys - set(state))}"
    lora = {n for n, p in trained.model.named_parameters() if p.requires_grad}
    assert {k.removeprefix("model.") for k in state if k.startswith("model.")} == lora  # no frozen base weights

    torch.manual_seed(2)
    rebuilt = build_module(cfg, state, tmp_path / "last.ckpt")
    assert_same_module(rebuilt.eval(), trained, batch)

    resumed = build_seeded(cfg, seed=2)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(state, strict=resumed.strict_loading)
    assert_same_module(resumed.eval(), trained, batch)

    folder = export_adapter(trained, tmp_path / "adapter")
    torch.manual_seed(2)
    assert_same_module(build_module_from_adapter(cfg, folder).eval(), trained, batch)


def test_ortho_checkpoint_keeps_the_parametrisation_base(build_seeded):
    module = build_seeded(compose_train([*TINY_TRAIN, "transform=ortho"]), seed=1)
    bases = [k for k in saved_state_names(module) if k.endswith("parametrizations.weight.0.base")]
    assert len(bases) == len(module.collector.keys)


def test_a_checkpoint_without_the_transform_buffers_is_refused(build_seeded):
    """A checkpoint written before the buffers were saved cannot rebuild the module: refused, naming the buffer."""
    module = build_seeded(compose_train([*TINY_TRAIN, "transform=ether"]), seed=1)
    state = {k: v for k, v in module.state_dict().items() if k in saved_state_names(module)}
    assert saved_state_mismatch(state, module) is None
    old = {k: v for k, v in state.items() if not k.endswith(".W0")}
    assert saved_state_mismatch(old, module) == "it lacks transform.per_key.hs-2.W0"


def test_ether_keys_of_one_width_get_different_w0_reproducibly(tiny_model):
    config = OmegaConf.load(Path(CONF_DIR) / "transform" / "ether.yaml")
    keys, dims = ["hs.1", "hs.2"], {"hs.1": 64, "hs.2": 64}
    config.reduction = 8  # f = 8: W0 is [8, 64]

    def w0(seed: int) -> list[torch.Tensor]:
        config.seed = seed
        return [m.W0 for m in build_transform(config, keys, dims, tiny_model, "hs").per_key.values()]

    first, second = w0(0)
    assert not torch.allclose(first, second)
    assert all(torch.equal(a, b) for a, b in zip(w0(0), (first, second)))  # reproducible from the seed
    assert not torch.allclose(w0(1)[0], first)
    assert key_seed(0, "hs.1") == 5463079982638639124  # stable across processes (not Python's salted hash)
