"""Every valid method × transform × loss × collection mode trains on the tiny random Llama.

Each combination is composed from ``conf/`` with ``hydra.compose`` (methods from ``conf/method/*.yaml``,
transforms from ``conf/transform/*.yaml`` plus every ETHER ``Htype``, losses from ``conf/loss/*.yaml``,
collection modes ``hs`` and ``side``), built once, and fitted for two optimiser steps (two epochs of one batch) by a Lightning
``Trainer`` made from ``conf/trainer/default.yaml`` (in-memory logger, no callbacks). Then:

- the loss and every logged metric are finite, and SPEC §3.4's diagnostics were logged;
- every trainable parameter (LoRA and transform) changed — for losses read only from hidden states,
  every LoRA parameter up to the last collected layer changed, and the ones after it did not
  (nothing after the last collected state can move such a loss; weight decay is 0);
- frozen tensors (embedding, a LoRA ``base_layer`` weight, a norm, transform buffers) are unchanged;
- the reference (adapter disabled) log-probs are bit-identical before and after.

DPO-like methods (no transform, loss or collection section) run once. A ReprPO
method that pins its loss (``override /loss: X`` in its yaml) runs with that loss; a generic one
(``reprpo``) runs the losses no named method pins (`test_generic_reprpo_matches_named_methods`
checks that ``method=reprpo loss=X`` is ``method=X``). Invalid combinations are skipped with their
reason, and `test_invalid_combination_raises` checks each raises a clear `UserError`.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from conftest import compose_train
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers.logger import Logger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

import reprpo_pl.methods.base as methods_base
from reprpo_pl.config import CONF_DIR
from reprpo_pl.data.datamodule import PreferenceDataModule
from reprpo_pl.errors import UserError
from reprpo_pl.models.pair_layouts import concat_pairs
from reprpo_pl.reprs.transforms import transform_traits
from reprpo_pl.reprs.transforms.ether import HTYPES

CONF = Path(CONF_DIR)
LAYERS = [1, 2]  # the tiny model has L=4; the default "0.5:-2" is empty there
LAST_LAYER = max(LAYERS)
COLLECT = [f"collection.layers=[{','.join(map(str, LAYERS))}]"]  # ReprPO methods only
TINY = [
    "model=tiny_random",
    # 8 math rows → 4 survive max_length=40 (the others' completions are identical after truncation):
    # one batch of 4 pairs, completions ≤ 24 tokens (the 49k vocab dominates a step)
    "data.n_train=8",
    "data.batch_size=4",
    "data.max_length=40",
    "data.max_prompt_length=16",
    "eval.n_samples=8",  # the datamodule also tokenises every target; some rows drop at max_length=40
]
O_PROJ_ONLY = [r"self_attn\.o_proj$"]  # side collection of d-wide states only (what svd accepts)
# Two epochs of the one batch: LoRA B starts at 0, so lora_A only gets a gradient from the second step
# on; and the second step reads the reference cache where the method has one.
N_STEPS = 2

DPO_DIAGNOSTICS = [
    "train/loss",
    "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins", "train/rewards/accuracies",
    "train/logps/chosen", "train/logps/rejected", "train/dpo_acc",
    "train/nll/chosen", "train/nll/chosen_ref",
]
HIDDEN_DIAGNOSTICS = ["train/hidden/signed_proj", "train/hidden/cos_pi_ref", "train/hidden/dev_norm"]


# ---- enumeration ---------------------------------------------------------------------------------


def yaml_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def pinned_loss(method: str) -> str | None:
    """The loss a method yaml selects with ``override /loss: X`` in its defaults list, if any."""
    for entry in OmegaConf.load(CONF / "method" / f"{method}.yaml").get("defaults") or []:
        if isinstance(entry, DictConfig) and "override /loss" in entry:
            return str(entry["override /loss"])
    return None


def preset_of(method: str) -> str | None:
    """The method yaml a preset builds on (``- prefvec`` in prefvec_v3's defaults), if any."""
    methods = set(yaml_names("method"))
    for entry in OmegaConf.load(CONF / "method" / f"{method}.yaml").get("defaults") or []:
        if isinstance(entry, str) and entry in methods and entry != "reprpo":
            return entry
    return None


class Transform(NamedTuple):
    id: str
    overrides: list[str]


def transform_variants() -> list[Transform]:
    """Each conf/transform yaml; ether once per Htype. etherplusHH needs nb | f = ⌊d/reduction⌋:
    reduction=16 gives f = 4 (d=64, hs and o_proj inputs) and 8 (d=128, down_proj inputs), nb=2."""
    out = []
    for name in yaml_names("transform"):
        if name != "ether":
            out.append(Transform(name, [f"transform={name}"]))
            continue
        for htype in HTYPES:
            extra = ["transform.reduction=16"] if htype == "etherplusHH" else []
            out.append(Transform(f"ether-{htype}", ["transform=ether", f"transform.Htype={htype}", *extra]))
    return out


def invalid_reason(transform: str, mode: str) -> str | None:
    """Why a transform × mode cannot run on the tiny model (d=64, down_proj input width 128)."""
    if transform == "supr" and mode == "side":
        return "supr compares consecutive residual-stream layers: hs mode only"
    if transform == "svd" and mode == "side":
        return "svd projects d-wide states; side collects down_proj inputs of width 128 ≠ d=64 (o_proj-only side is tested)"
    return None


class Combo(NamedTuple):
    method: str
    loss: str | None
    transform: str | None
    mode: str | None
    overrides: list[str]
    side_modules: list[str] | None = None  # replaces collection.modules after composing


def combinations() -> list[Any]:
    """pytest params: one per method × transform × loss × mode (DPO-like methods once)."""
    params: list[Any] = []
    methods = yaml_names("method")
    reprpo_methods, pinned = [], {}
    for method in methods:
        try:
            cfg = compose_train(["model=tiny_random", f"method={method}"])
        except Exception:  # a broken yaml fails its own test (composing it again there), not the collection
            params.append(pytest.param(Combo(method, None, None, None, [f"method={method}"]), id=method))
            continue
        if "loss" not in cfg:
            params.append(pytest.param(Combo(method, None, None, None, [f"method={method}"]), id=method))
            continue
        reprpo_methods.append(method)
        if (loss := pinned_loss(method)) is not None:
            pinned[method] = loss
    for method in reprpo_methods:
        if (parent := preset_of(method)) is not None:  # a preset's code paths are its parent's: once, as composed
            params.append(pytest.param(Combo(method, pinned[parent], "ether", "hs", [f"method={method}"]), id=method))
            continue
        if method in pinned:
            losses = [pinned[method]]
        else:  # generic: the losses no named method covers
            losses = [loss for loss in yaml_names("loss") if loss not in pinned.values()]
        for loss in losses:
            for transform in transform_variants():
                for mode in ("hs", "side"):
                    overrides = [f"method={method}", f"loss={loss}", *transform.overrides, f"collection.mode={mode}"]
                    combo = Combo(method, loss, transform.id, mode, overrides)
                    cid = f"{method}-{loss}-{transform.id}-{mode}"
                    if reason := invalid_reason(transform.id, mode):
                        params.append(pytest.param(combo, id=cid, marks=pytest.mark.skip(reason=reason)))
                    else:
                        params.append(pytest.param(combo, id=cid))
                    if transform.id == "svd" and mode == "side":  # the valid side form: d-wide modules only
                        params.append(pytest.param(combo._replace(side_modules=O_PROJ_ONLY), id=f"{cid}-o_proj"))
    return params


COMBINATIONS = combinations()


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def cached_base_model():
    """Load the tiny base model and tokenizer once; each module gets a deep copy (its own weights)."""
    real = methods_base.load_base_model
    cache: dict[str, Any] = {}

    def load(model_cfg):
        key = repr(OmegaConf.to_container(model_cfg) if isinstance(model_cfg, DictConfig) else dict(model_cfg))
        if key not in cache:
            cache[key] = real(model_cfg)
        model, tokenizer = cache[key]
        return copy.deepcopy(model), tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(methods_base, "load_base_model", load)
        yield


@pytest.fixture(scope="module")
def datamodule(tokenizer) -> PreferenceDataModule:
    """The math training pairs, tokenised once for the whole module."""
    cfg = compose_train(TINY)
    dm = PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    assert len(dm.train_set) == cfg.data.batch_size, "the tiny data settings no longer give one full batch"
    return dm


class MemoryLogger(Logger):
    """Keeps every `log_metrics` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> None:
        return None

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history.append(dict(metrics))


# ---- helpers ------------------------------------------------------------------------------------


def build(combo: Combo):
    cfg = compose_train(TINY + (COLLECT if combo.loss is not None else []) + combo.overrides)
    if combo.side_modules is not None:
        cfg.collection.modules = combo.side_modules
    if combo.loss is not None:
        assert cfg.loss.name == combo.loss
    if combo.transform is not None:
        assert cfg.transform.name == combo.transform.split("-")[0]
    return get_class(cfg.method._target_)(cfg), cfg


def layer_of(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def upstream_in_last_layer(name: str, combo: Combo) -> bool:
    """Does this adapter weight of the last collected block feed a collected state? hs: the whole block.
    side collects *inputs*: o_proj's input needs q/k/v; down_proj's input also o_proj, gate and up."""
    if combo.mode == "hs":
        return True
    attention = any(f".{p}_proj." in name for p in "qkv")
    return attention if combo.side_modules == O_PROJ_ONLY else ".down_proj." not in name


def snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@torch.no_grad()
def reference_logps(module, batches) -> list[torch.Tensor]:
    out = []
    for batch in batches:
        with module.reference():
            cho, rej, nll = module.pair_logps(concat_pairs(batch))
        out.append(torch.cat([cho, rej, nll]))
    return out


def fit(module, cfg: DictConfig, loader: DataLoader, root: Path) -> MemoryLogger:
    logger = MemoryLogger()
    trainer = instantiate(
        cfg.trainer, max_steps=N_STEPS, max_epochs=-1, logger=logger, callbacks=[], enable_checkpointing=False,
        enable_progress_bar=False, default_root_dir=str(root),
    )
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == N_STEPS
    return logger


# ---- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBINATIONS)
def test_combination_trains(combo: Combo, datamodule: PreferenceDataModule, tmp_path: Path):
    module, cfg = build(combo)
    loader = DataLoader(datamodule.train_set, batch_size=datamodule.batch_size, shuffle=False, collate_fn=datamodule.collator)
    batches = list(loader)

    params = dict(module.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    transform_params = {n for n in trainable if n.startswith("transform.")}
    assert lora, "no LoRA parameters are trainable"
    assert trainable == lora | transform_params, f"unexpected trainable parameters: {sorted(trainable - lora - transform_params)}"
    if combo.loss is None:
        assert not transform_params, "a DPO-like method should have no transform parameters"
    else:  # what the transform class declares
        assert bool(transform_params) == transform_traits(module.transform).learnable, combo.transform
    frozen = [
        next(n for n in params if n.endswith("embed_tokens.weight")),
        next(n for n in params if ".layers.0." in n and n.endswith("q_proj.base_layer.weight")),
        next(n for n in params if f".layers.{LAST_LAYER + 1}." in n and n.endswith("down_proj.base_layer.weight")),
        next(n for n in params if n.endswith("model.norm.weight")),
    ]
    assert not any(params[n].requires_grad for n in frozen)
    transform_buffers = {n: b.clone() for n, b in module.named_buffers() if n.startswith("transform.")}

    before = snapshot(module)
    ref_before = reference_logps(module, batches)
    logger = fit(module, cfg, loader, tmp_path)
    after = snapshot(module)
    ref_after = reference_logps(module, batches)

    # the loss and every diagnostic are finite and SPEC §3.4's diagnostics are there
    logged = {k: v for row in logger.history for k, v in row.items()}
    losses = [row["train/loss"] for row in logger.history if "train/loss" in row]
    assert len(losses) == N_STEPS and all(math.isfinite(v) for v in losses), losses
    assert all(math.isfinite(v) for v in logged.values()), {k: v for k, v in logged.items() if not math.isfinite(v)}
    expected = DPO_DIAGNOSTICS + (HIDDEN_DIAGNOSTICS if combo.loss is not None else [])
    assert not (missing := [k for k in expected if k not in logged]), f"diagnostics not logged: {missing}"
    if combo.loss is not None:
        assert any(k.startswith("train/loss/") for k in logged), f"no per-term loss (train/loss/...) logged: {sorted(logged)}"

    # which parameters moved
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # what the loss class declares: with no log-prob gradient at ρ = 0 (step 1) only the adapter up to the
    # last collected layer must move; with no log-prob term at all, the adapter after it must not
    logprob_term = module.loss_fn.logprob_term if combo.loss is not None else "smooth"
    if logprob_term != "smooth":
        upstream = {n for n in lora if (layer_of(n) or 0) < LAST_LAYER or (
            layer_of(n) == LAST_LAYER and upstream_in_last_layer(n, combo))}
        must_change = upstream | transform_params
        if logprob_term == "none":
            downstream = {n for n in lora if (layer_of(n) or 0) > LAST_LAYER}
            assert downstream and not (moved := downstream & changed), f"adapter after the last collected layer moved: {sorted(moved)}"
    else:
        must_change = trainable
    assert not (stuck := sorted(must_change - changed)), f"{len(stuck)} trainable parameters did not change: {stuck[:8]}"
    assert not (moved := sorted(changed - trainable)), f"frozen parameters changed: {moved[:8]}"
    if getattr(module, "ref_cache", None) is not None:  # step 2 = epoch 2: its reference comes from the cache
        assert (module.ref_cache.misses, module.ref_cache.hits) == (1, 1)
    for n in frozen:
        assert torch.equal(before[n], after[n]), f"frozen {n} changed"
    for n, buffer in module.named_buffers():
        if n in transform_buffers:
            assert torch.equal(buffer, transform_buffers[n]), f"transform buffer {n} changed"
    for b, (x, y) in enumerate(zip(ref_before, ref_after)):
        assert torch.equal(x, y), f"reference log-probs of batch {b} changed: max |Δ| = {(x - y).abs().max():.3g}"


INVALID = [
    pytest.param(["transform=supr", "collection.mode=side"], r"supr needs collection\.mode=hs", id="supr-side"),
    pytest.param(["transform=supr", "collection.mode=hs", "collection.layers=[2]"], r"supr.*≥ 2", id="supr-one-layer"),
    pytest.param(["transform=svd", "collection.mode=side"], r"svd projects states of the model width d=64.*down_proj", id="svd-side"),
    pytest.param(["transform=ether", "transform.Htype=etherplusHH"], r"etherplusHH needs transform\.nb=2 to divide f", id="etherplusHH-nb-f"),
    pytest.param(["loss=rank", "collection.pooling=last"], r"collection.pooling=last: loss=rank pools log_softmax_mean", id="rank-last"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID)
def test_invalid_combination_raises(overrides: list[str], message: str):
    cfg = compose_train(TINY + COLLECT + ["method=innerdpo", *overrides])
    with pytest.raises(UserError, match=message):
        get_class(cfg.method._target_)(cfg)


@pytest.mark.parametrize("loss", yaml_names("loss"))
def test_generic_reprpo_matches_named_methods(loss: str):
    """``method=reprpo loss=X`` is the same run as ``method=X`` (up to the method's name), so testing
    the named methods covers the generic one."""
    named = [m for m in yaml_names("method") if pinned_loss(m) == loss]
    if not named:
        pytest.skip(f"no named method pins loss {loss}: the generic reprpo runs it in test_combination_trains")
    generic = compose_train(["method=reprpo", f"loss={loss}"])
    for method in named:
        cfg = compose_train([f"method={method}"])
        assert cfg.loss == generic.loss
        assert {k: v for k, v in cfg.method.items() if k != "name"} == {k: v for k, v in generic.method.items() if k != "name"}
