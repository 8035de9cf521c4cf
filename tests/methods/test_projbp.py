"""ProjBP (SPEC §3.3) on the tiny random Llama: the rewritten output gradient, an unchanged forward,
hooks gone after the step, and a few optimiser steps through Lightning."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from tiny_modules import tiny_method_module
from torch.utils.data import DataLoader

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.methods.projbp import ProjBPModule
from reprpo_pl.methods.projection import project_output_gradient

torch.set_num_threads(1)
LAST = "model.layers.3.mlp.down_proj"  # the last adapted module: its ∂loss/∂output is not touched by other hooks


def make_module(*overrides: str) -> ProjBPModule:
    return tiny_method_module("projbp", *overrides)


@pytest.fixture
def rows(pairs, tokenizer) -> list[dict]:
    return list(tokenize_pairs(pairs, tokenizer, TokenizeConfig(max_length=128, max_prompt_length=64)))


@pytest.fixture
def batch(rows, tokenizer) -> dict[str, torch.Tensor]:
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows)


def lora_grads(module: ProjBPModule) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def test_projected_backward(batch):
    """The training step's loss equals plain DPO's; the gradient reaching every LoRA layer changes; at
    the last layer lora_B's gradient is exactly s·Σ_t g'ᵀ(A x) with g' = project_output_gradient of the
    raw ∂loss/∂output, chosen rows using −p_b and rejected rows +p_b, p_b = a_c,b − a_r,b by hand."""
    module = make_module("method.projection.mag_clip=0.005")  # small enough to clip rows on the tiny model
    plain_loss = module.compute_loss(batch)[0]
    plain_loss.backward()
    plain = lora_grads(module)
    module.zero_grad()

    layer = module.model.base_model.model.get_submodule(LAST)
    seen: dict[str, torch.Tensor] = {}

    def spy(mod, args, output):  # registered before training_step's hooks, so its gradient hook runs first
        if mod.disable_adapters:
            seen["reference"] = output.detach()
        else:
            output.register_hook(lambda g: seen.__setitem__("raw_grad", g.clone()))

    handles = [layer.register_forward_hook(spy),
               layer.lora_A["default"].register_forward_hook(lambda mod, args, out: seen.__setitem__("ax", out.detach()))]
    loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, plain_loss)  # the forward is untouched
    loss.backward()
    for h in handles:
        h.remove()
    projected = lora_grads(module)
    for n in plain:
        if "lora_B" in n:
            assert not torch.allclose(projected[n], plain[n]), f"ProjBP did not change the gradient of {n}"

    B, C = batch["chosen_mask"].shape
    completion_mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    ref = seen["reference"][:, -C:]
    pooled = torch.stack([ref[i][completion_mask[i]].mean(0) for i in range(2 * B)])
    p = pooled[:B] - pooled[B:]
    directions = torch.cat([-p, p])
    token_mask = torch.cat([batch["prompt_mask"].repeat(2, 1), completion_mask], dim=1)
    g = project_output_gradient(seen["raw_grad"], directions, token_mask, beta=0.2, neg_slope=0.01, mag_clip=0.005)
    expected = layer.scaling["default"] * torch.einsum("nth,ntr->hr", g, seen["ax"])
    key = f"model.base_model.model.{LAST}.lora_B.default.weight"
    torch.testing.assert_close(projected[key], expected, atol=1e-7, rtol=1e-4)


def test_hooks_are_gone_after_the_step(batch):
    """After a training step, a plain forward + backward gives DPO's gradients again."""
    module = make_module()
    module.compute_loss(batch)[0].backward()
    plain = lora_grads(module)
    module.zero_grad()
    module.training_step(batch, 0).backward()
    assert any(not torch.allclose(g, plain[n]) for n, g in lora_grads(module).items())
    assert all(not layer._forward_hooks for layer in module._layers.values())
    module.zero_grad()
    module.compute_loss(batch)[0].backward()
    for n, g in lora_grads(module).items():
        torch.testing.assert_close(g, plain[n], msg=n)


def test_lightning_steps(rows, tokenizer):
    module = make_module("method.lr=1e-3")
    loader = DataLoader(rows, batch_size=2, collate_fn=PreferenceCollator(pad_token_id=tokenizer.pad_token_id))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", max_steps=3, gradient_clip_val=10.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 3
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    for n, p in module.named_parameters():
        assert (not torch.equal(p, before[n])) == p.requires_grad, n
    assert all(not layer._forward_hooks for layer in module._layers.values())
