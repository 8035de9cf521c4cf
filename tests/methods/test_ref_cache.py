"""Reference cache and the fast forward paths: a cached second epoch gives the same losses and
gradients as recomputing the reference; the packed layout and pool-first match their plain forms;
transforms declare truthfully whether pooling commutes with them."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from omegaconf import OmegaConf

from reprpo_pl.config import CONF_DIR
from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.methods.ref_cache import RefCache
from reprpo_pl.reprs.pooling import masked_mean
from reprpo_pl.reprs.transforms import (
    build_transform,
    transform_traits,
)
from reprpo_pl.reprs.transforms.ether import HTYPES

EPOCH1 = [[0, 1, 2], [3, 4, 5]]
EPOCH2 = [[4, 0, 2], [5, 1, 3]]  # other batch compositions (and so other padding) than epoch 1


DPO_LIKE = ("method=dpo", "method=projgrad", "method=projbp")  # no collection section to set layers in


def make_cfg(*overrides: str):
    layers = [] if any(o in DPO_LIKE for o in overrides) else ["collection.layers=[1,2]"]
    return compose_train(["model=tiny_random", "adapter.r=8", *layers, *overrides])


def make_module(*overrides: str):
    from hydra.utils import get_class

    cfg = make_cfg(*overrides)
    module = get_class(cfg.method._target_)(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # policy ≠ reference from the start
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return module.train()


@pytest.fixture(scope="module")
def rows(tokenizer_module):
    from datasets import Dataset

    texts = [
        ("What is the capital of France?", " Paris.", " London, which is in England."),
        ("Is it fine to lie about a gift?", " A small kind untruth is usually fine.", " Yes."),
        ("Name a colour.", " Blue.", " Seven."),
        ("Write one sentence about the sea.", " The sea is wide, deep and restless.", " The sea is made of sand."),
        ("Someone found a wallet. What now?", " Hand it to the police.", " Keep the cash."),
        ("2+2=", " 4", " 5"),
    ]
    pairs = Dataset.from_dict({k: [t[i] for t in texts] for i, k in enumerate(("prompt", "chosen", "rejected"))})
    pairs = pairs.add_column("index", list(range(len(pairs))))
    return list(tokenize_pairs(pairs, tokenizer_module, TokenizeConfig(max_length=96, max_prompt_length=48)))


@pytest.fixture(scope="module")
def tokenizer_module():
    from transformers import AutoTokenizer

    from reprpo_pl.models.loading import SMOLLM2_GGUF, convert_gguf

    tok = AutoTokenizer.from_pretrained(convert_gguf(SMOLLM2_GGUF))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def collate(rows, tokenizer, which):
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)([rows[i] for i in which])


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def step(module, batch, lr: float = 0.05):
    """training_step + backward + a plain SGD update (so the policy moves away from the reference)."""
    module.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module.training_step(batch, 0)
    loss.backward()
    out = loss.detach(), grads(module)
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return out


# ---- the cache itself -------------------------------------------------------------------------


def test_refcache_store_lookup_grow_and_fingerprint():
    cache = RefCache()
    cache.bind("a")
    cache.store(torch.tensor([0, 2]), {"x": torch.tensor([1.0, 3.0]), "h": torch.ones(2, 2, 5)})
    assert cache.lookup(torch.tensor([0, 1]), "cpu") is None  # 1 missing
    got = cache.lookup(torch.tensor([2, 0]), "cpu")
    torch.testing.assert_close(got["x"], torch.tensor([3.0, 1.0]))
    assert got["h"].shape == (2, 2, 5)
    cache.store(torch.tensor([40]), {"x": torch.tensor([7.0]), "h": torch.zeros(1, 2, 5)})  # grows
    assert len(cache) == 3 and cache.lookup(torch.tensor([40, 0]), "cpu")["x"].tolist() == [7.0, 1.0]
    cache.bind("a")
    assert len(cache) == 3
    cache.bind("b")  # anything that changes the reference outputs changed: start again
    assert len(cache) == 0 and cache.lookup(torch.tensor([0]), "cpu") is None


def test_fingerprint_tracks_what_changes_reference_outputs():
    base = make_module("method=innerdpo")
    fp = base.reference_fingerprint()
    assert fp == base.reference_fingerprint()
    for key, value in [("data.max_length", 64), ("data.chat_template", False), ("model.name_or_path", "other"),
                       ("collection.layers", "[1]"), ("collection.mode", "side"), ("collection.sink_k", 3.0),
                       ("method.agg", "sum"), ("data.seed", 5)]:
        changed = copy.deepcopy(base.cfg)
        OmegaConf.update(changed, key, value)
        base.cfg = changed
        assert base.reference_fingerprint() != fp, key
        base.cfg = make_cfg("method=innerdpo")


# ---- which setups may cache -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "cached"),
    [
        (["method=dpo"], True),
        (["method=dpo", "ref_cache.enabled=false"], False),
        (["method=innerdpo", "transform=ether"], True),
        (["method=innerdpo", "transform=hra", "collection.sink_k=3"], True),  # orthogonal: sinks on raw norms are the same
        (["method=innerdpo", "transform=ether", "collection.sink_k=3"], False),  # ETHER changes norms
        (["method=innerdpo", "transform=supr"], False),  # not linear per token
        (["method=innerdpo", "loss.use_token_constraint=true"], False),  # reads per-token reference states
        (["method=rank"], False),  # log-softmax pooling
        (["method=projgrad"], False),  # hooks read the reference forward: fast paths are not inherited
    ],
)
def test_which_setups_cache(overrides, cached):
    module = make_module(*overrides)
    assert (module.ref_cache is not None) == cached


def test_declared_traits_hold():
    """Every transform declaring ``commutes_with_mean`` (its class's ``traits``) satisfies T(mmean H) = mmean T(H) (and
    ``preserves_norm``: ‖T(h)‖ = ‖h‖), with random (non-initial) parameters; supr declares neither."""
    module = make_module("method=innerdpo")
    keys, dims = module.collector.keys, module.collector.dims
    gen = torch.Generator().manual_seed(0)
    hs = {k: torch.randn(3, 7, dims[k], generator=gen) for k in keys}
    mask = torch.rand(3, 7, generator=gen) > 0.3
    mask[:, 0] = True
    # every shipped transform yaml (a new one is checked here too), ether once per Htype (reduction 16: the
    # tiny widths 64/128 need f = ⌊d/reduction⌋ divisible by nb=2), hra also with Gram–Schmidt
    names = sorted(p.stem for p in (Path(CONF_DIR) / "transform").glob("*.yaml"))
    variants = [(name, {}) for name in names if name != "ether"] + [("hra", {"apply_GS": True})]
    variants += [("ether", {"Htype": h, "reduction": 16}) for h in HTYPES]
    for name, options in variants:
        cfg = OmegaConf.load(f"{CONF_DIR}/transform/{name}.yaml")
        cfg.merge_with(options)
        transform = build_transform(cfg, keys, dims, module.model, "hs")
        with torch.no_grad():
            for p in transform.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        traits = transform_traits(transform)
        out = transform(hs, mask)
        if traits.commutes_with_mean:
            pooled = {k: masked_mean(h, mask) for k, h in hs.items()}
            ones = torch.ones(3, 1, dtype=torch.bool)
            pooled_then = transform({k: v[:, None] for k, v in pooled.items()}, ones)
            for k in keys:
                torch.testing.assert_close(pooled_then[k][:, 0], masked_mean(out[k], mask), atol=1e-5, rtol=1e-5)
        if traits.preserves_norm:
            for k in keys:
                torch.testing.assert_close(out[k].norm(dim=-1), hs[k].norm(dim=-1), atol=1e-4, rtol=1e-5)
        if name == "supr":
            assert not traits.commutes_with_mean


# ---- equivalences ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dpo", "innerdpo"])
def test_second_epoch_from_cache_matches_recomputed_reference(method, rows, tokenizer_module):
    """Two identical modules, cache on/off, trained in lockstep for two epochs (batches recomposed in
    epoch 2): the same loss and gradients at every step, and no reference forward in epoch 2."""
    cached, fresh = make_module(f"method={method}"), make_module(f"method={method}", "ref_cache.enabled=false")
    assert cached.ref_cache is not None and fresh.ref_cache is None
    reference_calls = {"n": 0}
    original = cached.reference

    def counting_reference():
        reference_calls["n"] += 1
        return original()

    cached.reference = counting_reference
    for epoch, batches in enumerate((EPOCH1, EPOCH2)):
        calls_before = reference_calls["n"]
        for which in batches:
            batch = collate(rows, tokenizer_module, which)
            loss_c, grads_c = step(cached, batch)
            loss_f, grads_f = step(fresh, batch)
            torch.testing.assert_close(loss_c, loss_f, atol=1e-6, rtol=1e-5)
            assert grads_c.keys() == grads_f.keys() and grads_c
            for name in grads_c:
                torch.testing.assert_close(grads_c[name], grads_f[name], atol=1e-5, rtol=1e-4, msg=name)
        expected_calls = len(batches) if epoch == 0 else 0
        assert reference_calls["n"] - calls_before == expected_calls
    assert cached.ref_cache.hits == len(EPOCH2) and cached.ref_cache.misses == len(EPOCH1)
    assert abs(loss_c.item() - 0.6931) > 1e-3  # the policy moved: a stale reference would show


def test_cache_only_in_training_steps(rows, tokenizer_module):
    """compute_loss outside a training step (evaluation, tests) never reads or fills the cache."""
    module = make_module("method=dpo")
    batch = collate(rows, tokenizer_module, [0, 1])
    module.compute_loss(batch)
    assert len(module.ref_cache) == 0
    step(module, batch)
    assert len(module.ref_cache) == 2


@pytest.mark.parametrize("method", ["dpo", "innerdpo"])
def test_packed_layout_matches_concat(method, rows, tokenizer_module):
    packed, concat = make_module(f"method={method}"), make_module(f"method={method}", "method.packed_forward=false")
    batch = collate(rows, tokenizer_module, [0, 1, 3, 5])
    assert packed.pair_inputs(batch)["input_ids"].shape[0] == 4 and concat.pair_inputs(batch)["input_ids"].shape[0] == 8
    loss_p, grads_p = step(packed, batch)
    loss_c, grads_c = step(concat, batch)
    torch.testing.assert_close(loss_p, loss_c, atol=1e-6, rtol=1e-5)
    for name in grads_c:
        torch.testing.assert_close(grads_p[name], grads_c[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("overrides", [["transform=ether"], ["transform=hra", "collection.sink_k=1.0"], ["transform=svd"],
                                       ["transform=ether", "collection.pooling=last"],
                                       ["transform=hra", "collection.pooling=exp_decay", "collection.sink_k=1.0"]])
def test_pool_first_matches_transform_then_pool(overrides, rows, tokenizer_module):
    """The pool-first shortcut gives the loss and gradients of transforming every token, then pooling."""
    first, per_token = make_module("method=innerdpo", *overrides), make_module("method=innerdpo", *overrides)
    assert first.pipeline.pool_first
    per_token.pipeline.pool_first, per_token.ref_cache = False, None  # per-token reference states are not cacheable
    with torch.no_grad():  # move the transform off its init
        gen = torch.Generator().manual_seed(3)
        for a, b in zip(first.transform.parameters(), per_token.transform.parameters()):
            a.add_(torch.randn(a.shape, generator=gen) * 0.2)
            b.copy_(a)
    batch = collate(rows, tokenizer_module, [0, 2, 4])
    loss_a, grads_a = step(first, batch)
    loss_b, grads_b = step(per_token, batch)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    assert any("transform" in n for n in grads_a) == any(True for _ in first.transform.parameters())  # svd has none
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)
