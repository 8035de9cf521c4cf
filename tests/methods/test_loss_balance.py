"""The ReprPO module's wiring of the recipes' training options (SPEC-recipes §1.6, §2, §6): the per-term gradient
norms and ``loss.auto_alpha``, PrefVec's per-token NLL term, and ``loss.norm_before_reduce``."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_runner import TINY, run_inprocess
from tiny_modules import tiny_method_module

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.errors import UserError
from reprpo_pl.methods.loss_balance import term_gradient_norms
from reprpo_pl.models.logprobs import completion_logps
from reprpo_pl.reprs.pooling import masked_mean

LAYERS = "collection.layers=[1,2]"


@pytest.fixture
def text_batch(tokenizer, pairs):
    cfg = TokenizeConfig(max_length=48, max_prompt_length=24, chat_template=False)
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(list(tokenize_pairs(pairs, tokenizer, cfg))[:3])


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def own_gradient_norm(module: torch.nn.Module, term: torch.Tensor) -> float:
    """‖∇θ term‖ by an ordinary backward into .grad (independent of `term_gradient_norms`)."""
    module.zero_grad(set_to_none=True)
    term.backward(retain_graph=True)
    norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in trainable(module) if p.grad is not None))
    module.zero_grad(set_to_none=True)
    return norm


@pytest.mark.parametrize("method", ["innerdpo", "prefvec"])
def test_term_gradient_norms_equal_each_terms_own_backward(method, text_batch):
    module = tiny_method_module(method, LAYERS)
    _, metrics = module.compute_loss(text_batch)
    norms = term_gradient_norms(metrics, trainable(module))
    assert {"loss/out", "loss/in"} <= norms.keys() if method == "innerdpo" else {"loss/proj", "loss/dpo"} <= norms.keys()
    for name, value in norms.items():
        assert float(value) == pytest.approx(own_gradient_norm(module, metrics[name]), rel=1e-4), name
    assert all(float(v) > 0 for k, v in norms.items() if k in ("loss/out", "loss/in", "loss/proj", "loss/dpo"))


def test_auto_alpha_weights_the_hidden_term_to_the_dpo_terms_gradient_norm(text_batch):
    module = tiny_method_module("innerdpo", LAYERS, "loss.auto_alpha=true", "method.gradnorm_every_n_steps=1")
    loss = module.training_step(text_batch, 0)
    _, metrics = module.compute_loss(text_batch)  # the same batch again: the same terms, with a fresh graph
    alpha = float(module.auto_alpha)
    assert alpha != pytest.approx(module.cfg.loss.alpha)  # it was measured, not left at the yaml's 0.1
    torch.testing.assert_close(loss.detach(), (metrics["loss/out"] + alpha * metrics["loss/in"]).detach())
    # the property it is named for: α‖∇ L_in‖ = ‖∇ L_out‖
    assert alpha * own_gradient_norm(module, metrics["loss/in"]) == pytest.approx(
        own_gradient_norm(module, metrics["loss/out"]), rel=1e-3)
    assert "auto_alpha" in module.state_dict()  # a checkpoint carries it, so a resume goes on with it


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=prefvec", "+loss.auto_alpha=true"], r"^error: config for .*PrefVecLoss is invalid: .*'auto_alpha'"),
    (["method=innerdpo", "loss.auto_alpha=true", "loss.use_policy_weights=true"],
     r"^error: loss\.auto_alpha=true with loss\.use_policy_weights=true"),
    (["method=innerdpo", "loss.auto_alpha=true", "method.gradnorm_every_n_steps=null"],
     r"^error: loss\.auto_alpha=true needs method\.gradnorm_every_n_steps"),
    (["method=innerdpo", "method.gradnorm_every_n_steps=0"], r"^error: method\.gradnorm_every_n_steps=0 must be a positive"),
])
def test_auto_alpha_and_gradnorm_refuse_what_they_cannot_do(overrides, message, tmp_path: Path):
    result = run_inprocess([*TINY, LAYERS, *overrides], tmp_path / "run")
    assert result.code != 0 and len(result.error_lines) == 1, result.stderr[-3000:]
    assert re.match(message, result.error_lines[0]), result.error_lines[0]


def test_gradnorms_are_logged_every_n_steps_from_the_cli(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_inprocess([*TINY, LAYERS, "method=innerdpo", "data.n_train=8", "trainer.max_steps=3",
                            "trainer.log_every_n_steps=1", "method.gradnorm_every_n_steps=2", "loss.auto_alpha=true"],
                           run_dir)
    assert result.code == 0, result.stderr[-3000:]
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    measured = [r for r in rows if r["train/gradnorm/in"]]
    assert [int(r["step"]) for r in measured] == [0, 2]  # only where measured, never a stale repeat
    assert all(float(r["train/gradnorm/out"]) > 0 and float(r["train/gradnorm/in"]) > 0 for r in measured)
    steps = [r for r in rows if r["train/loss"]]
    assert len(steps) == 3 and all(float(r["train/auto_alpha"]) > 0 for r in steps)


def test_prefvec_nll_term_is_the_per_token_increase_of_the_chosen_nll(text_batch):
    module = tiny_method_module("prefvec", LAYERS, "loss.use_nll_loss=true", "loss.nll_weight=1")
    assert module.ref_cache is None  # per-token reference log-probs are not cached
    _, metrics = module.compute_loss(text_batch)
    # independently: both forwards on the same inputs, relu(NLL_π − NLL_ref) averaged over chosen completion tokens
    inputs = module.pair_inputs(text_batch)
    mask = inputs["completion_mask"].chunk(2)[0].float()
    with torch.no_grad():
        policy = completion_logps(module.model, inputs).chunk(2)[0]
        with module.reference():
            reference = completion_logps(module.model, inputs).chunk(2)[0]
    expected = ((F.relu(reference - policy) * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(metrics["loss/nll"].detach(), expected, rtol=1e-4, atol=1e-6)
    assert float(expected) > 0  # lora_B ≠ 0: the policy's NLL rose on some tokens
    assert own_gradient_norm(module, metrics["loss/nll"]) > 0


def test_norm_before_reduce_pools_unit_token_states_and_turns_the_cache_off(text_batch):
    module = tiny_method_module("innerdpo", LAYERS, "transform=none", "loss.norm_before_reduce=true")
    assert not module.pipeline.pool_first and module.ref_cache is None
    gen = torch.Generator().manual_seed(0)
    tokens = {"hs.1": torch.randn(4, 5, 6, generator=gen) * 7}
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    reference = module.pipeline.reference_states(tokens, mask)
    policy, _ = module.pipeline.pooled(tokens, reference, mask)
    torch.testing.assert_close(policy["hs.1"], masked_mean(tokens["hs.1"] / tokens["hs.1"].norm(dim=-1, keepdim=True), mask))
    loss, _ = module.compute_loss(text_batch)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if ".layers.1." in n)


@pytest.mark.parametrize("extra", [["loss.norm_before_reduce=true"], ["loss.align_method=cosine_logodds", "loss.auto_alpha=true"]])
def test_innerdpo_options_train_two_steps_from_the_cli(extra, tmp_path: Path):
    result = run_inprocess([*TINY, LAYERS, "method=innerdpo", "trainer.max_steps=2", *extra], tmp_path / "run")
    assert result.code == 0, result.stderr[-3000:]
