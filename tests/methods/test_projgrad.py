"""ProjGrad (SPEC §3.2) on the tiny random Llama: the projected LoRA gradients, accumulation, weight_dim,
and a few optimiser steps through Lightning."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from tiny_modules import tiny_method_module
from torch.utils.data import DataLoader

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.errors import UserError
from reprpo_pl.methods.projgrad import ProjGradModule
from reprpo_pl.models.pair_layouts import concat_pairs

torch.set_num_threads(1)
LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj")  # a square and a non-square module


def make_module(*overrides: str) -> ProjGradModule:
    return tiny_method_module("projgrad", *overrides)


@pytest.fixture
def rows(pairs, tokenizer) -> list[dict]:
    return list(tokenize_pairs(pairs, tokenizer, TokenizeConfig(max_length=128, max_prompt_length=64)))


@pytest.fixture
def micro_batches(rows, tokenizer) -> list[dict[str, torch.Tensor]]:
    """The six pairs as two micro-batches of three (one optimiser step with accumulation 2)."""
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    return [collate(rows[:3]), collate(rows[3:])]


def reference_difference(module: ProjGradModule, layer_name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """a_c − a_r ``[B, h]`` of one layer's reference output, pooled by hand row by row."""
    layer = module.model.base_model.model.get_submodule(layer_name)
    inputs = concat_pairs(batch)
    outputs = []
    handle = layer.base_layer.register_forward_hook(lambda mod, args, out: outputs.append(out))
    with module.reference():
        module.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"])
    handle.remove()
    out, mask = outputs[0], inputs["completion_mask"]
    pooled = torch.stack([out[i, -mask.shape[1] :][mask[i]].mean(0) for i in range(out.shape[0])])
    chosen, rejected = pooled.chunk(2)
    return chosen - rejected


def test_projected_gradient(micro_batches):
    """Two micro-batches, one projection: the raw accumulated gradient is DPO's, lora_B's becomes
    relu(u·G)u + 0.8·G_orth with u = −mean over ALL six pairs of a_c − a_r, and lora_A's is untouched."""
    module = make_module()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for batch in micro_batches:
        module.compute_loss(batch)[0].backward()
    plain = {n: p.grad.clone() for n, p in trainable.items()}
    module.zero_grad()
    for i, batch in enumerate(micro_batches):
        module.training_step(batch, i).backward()
    for n, p in trainable.items():
        torch.testing.assert_close(p.grad, plain[n], msg=f"caching changed the raw gradient of {n}")
    assert all(not layer._forward_hooks for layer in module._layers.values())

    kept = module.project_gradients()

    for layer_name in LAYERS:
        p = -torch.cat([reference_difference(module, layer_name, b) for b in micro_batches]).mean(0)
        u = p / p.norm()
        key = f"model.base_model.model.{layer_name}.lora_B.default.weight"
        grad, projected = plain[key], trainable[key].grad  # [h, r]
        coefficient = u @ grad
        expected = torch.outer(u, F.relu(coefficient)) + 0.8 * (grad - torch.outer(u, coefficient))
        torch.testing.assert_close(projected, expected, atol=1e-7, rtol=1e-4)
        assert (u @ projected >= -1e-8).all() and (coefficient < 0).any()  # anti-aligned columns were dropped
        key_a = key.replace("lora_B", "lora_A")
        torch.testing.assert_close(trainable[key_a].grad, plain[key_a])
    b_keys = [n for n in trainable if "lora_B" in n]
    ratio = math.sqrt(sum(trainable[n].grad.square().sum() for n in b_keys) / sum(plain[n].square().sum() for n in b_keys))
    assert kept.item() == pytest.approx(ratio, rel=1e-5) and 0 < kept.item() < 1
    assert not module._differences  # forgotten: the next step uses only its own micro-batches


def test_weight_dim():
    with pytest.raises(UserError, match="not square"):
        make_module("method.projection.weight_dim=0")  # all-linear adapts gate/up/down too
    with pytest.raises(UserError, match="weight_dim=2"):
        make_module("method.projection.weight_dim=2")
    module = make_module("method.projection.weight_dim=0", "adapter.target_modules=[q_proj,o_proj]")
    assert {(tuple(p.shape), axis) for _, p, axis in module._targets} == {((8, 64), 1)}  # lora_A [r, in], input axis
    assert len(module._targets) == 8
    default = make_module()
    assert all(axis == 0 and p.shape[1] == 8 for _, p, axis in default._targets)  # lora_B [h, r], output axis
    assert len(default._targets) == 4 * 7


def test_lightning_steps_with_accumulation(rows, tokenizer):
    """Four micro-batches, accumulation 2: two projections, each with two micro-batches' directions;
    finite loss, LoRA weights move, frozen weights do not."""
    module = make_module()
    loader = DataLoader(rows, batch_size=1, collate_fn=PreferenceCollator(pad_token_id=tokenizer.pad_token_id))
    seen = []
    project = module.project_gradients
    module.project_gradients = lambda: seen.append({len(d) for d in module._differences.values()}) or project()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, gradient_clip_val=10.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    assert seen == [{2}, {2}]
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert 0 < trainer.callback_metrics["train/projgrad/grad_norm_kept"].item() <= 1
    for n, p in module.named_parameters():
        assert (not torch.equal(p, before[n])) == p.requires_grad, n
