"""WPO weights (method.wpo): a direct transcription of TRL's weighting, the log Σπ² term from our chunked
unembedding against the full logits, detached weights, and the methods that use them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train
from tiny_modules import tiny_method_module

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.errors import UserError
from reprpo_pl.models.logprobs import completion_logps_and_log_sum_sq, token_logps
from reprpo_pl.models.pair_layouts import concat_pairs, pack_pairs, prediction_positions
from reprpo_pl.objectives.wpo import wpo_log_weight, wpo_weights


def trl_policy_weights(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL 1.x DPOTrainer (use_weighting): aligned = (logp − logsumexp(2·log_softmax)) · mask, mean per row,
    weights = exp(mean); chosen_weights · rejected_weights. logits ``[2B, C, V]``, rows chosen then rejected."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    per_token_logps = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    log_sum_sq_probs = torch.logsumexp(2 * logprobs, dim=-1)
    aligned = (per_token_logps - log_sum_sq_probs) * mask
    weights = torch.exp(aligned.sum(1) / mask.sum(1).clamp_min(1))
    chosen, rejected = weights.chunk(2)
    return chosen * rejected


def test_trl_mode_is_trls_weighting_clamped_at_one():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, 11, generator=gen) * 3
    labels = logits.argmax(-1).where(torch.rand(8, 5, generator=gen) > 0.3, torch.randint(0, 11, (8, 5), generator=gen))
    mask = torch.rand(8, 5, generator=gen) > 0.2
    mask[:, 0] = True
    sq: list[torch.Tensor] = []
    logps = token_logps(logits, labels, mask, log_sum_sq=sq)
    lw_cho, lw_rej = wpo_log_weight(logps, sq[0], mask).chunk(2)
    ours = wpo_weights(lw_cho, lw_rej, "trl")
    trl = trl_policy_weights(logits, labels, mask.float())
    assert (trl > 1).any() and (trl < 1).any()  # both sides of the clamp are exercised
    torch.testing.assert_close(ours, trl.clamp(max=1.0), atol=1e-6, rtol=1e-5)


def test_sigmoid_norm_has_mean_one_and_keeps_the_order():
    lw_cho, lw_rej = torch.tensor([-1.0, -2.0, -0.5, -4.0]), torch.tensor([-1.5, -1.0, -0.5, -3.0])
    w = wpo_weights(lw_cho, lw_rej, "sigmoid_norm")
    assert w.mean().item() == pytest.approx(1.0)
    assert torch.equal(w.argsort(), (lw_cho + lw_rej).argsort())


@pytest.fixture
def batch(tokenizer, pairs):
    cfg = TokenizeConfig(max_length=64, max_prompt_length=32, chat_template=False)
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(list(tokenize_pairs(pairs, tokenizer, cfg)))


@pytest.mark.parametrize("layout", [concat_pairs, pack_pairs])
def test_log_sum_sq_from_the_chunked_unembedding_matches_the_full_logits(layout, tiny_peft, batch):
    inputs = layout(batch)
    with torch.no_grad():
        logps, log_sum_sq = completion_logps_and_log_sum_sq(tiny_peft, inputs)
        hidden = tiny_peft.get_base_model().model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                                                  if inputs["attention_mask"].dim() == 2 else inputs["attention_mask"],
                                                  position_ids=inputs["position_ids"]).last_hidden_state
        rows, positions = prediction_positions(inputs)
        logits = tiny_peft.get_base_model().lm_head(hidden[rows, positions])  # [2B, C, V]
    mask = inputs["completion_mask"].bool()
    expected = torch.logsumexp(2 * F.log_softmax(logits.float(), -1), -1).where(mask, 0.0)
    torch.testing.assert_close(log_sum_sq, expected, atol=1e-5, rtol=1e-5)
    assert not log_sum_sq.requires_grad


@pytest.mark.parametrize("method", ["dpo", "innerdpo", "projgrad"])
def test_methods_weight_their_dpo_term_with_detached_weights(method, batch):
    plain = tiny_method_module(method)
    weighted = tiny_method_module(method, "method.wpo=trl")
    loss_plain, _ = plain.compute_loss(batch)
    loss_w, metrics = weighted.compute_loss(batch)
    w = metrics["wpo/weight"]
    assert 0 < w.item() <= 1 and not w.requires_grad
    assert not torch.allclose(loss_plain, loss_w)  # the weights change the loss
    loss_w.backward()  # and only through the weighted loss, never through the weights
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in weighted.parameters())


def test_dpo_loss_is_the_weighted_mean_of_per_pair_losses(batch):
    from reprpo_pl.objectives.dpo import dpo_loss

    module = tiny_method_module("dpo", "method.wpo=sigmoid_norm")
    inputs = module.pair_inputs(batch)
    with module.reference():
        ref_cho, ref_rej, _ = module.pair_logps(inputs)
    pi_cho, pi_rej, _, w = module.policy_logps(inputs)
    per_pair = dpo_loss(pi_cho, pi_rej, ref_cho, ref_rej, module.method_cfg.beta)
    loss, _ = module.compute_loss(batch)
    torch.testing.assert_close(loss, (per_pair * w).mean(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=dpo", "method.wpo=always"], "method.wpo='always'"),
    (["method=rank", "method.wpo=trl"], "loss=rank has none"),
])
def test_bad_wpo_settings_are_refused(overrides, message):
    from hydra.utils import get_class

    cfg = compose_train(["model=tiny_random", *overrides])
    with pytest.raises(UserError, match=message):
        get_class(cfg.method._target_)(cfg)
