"""Pooling over completion tokens and attention-sink filtering (SPEC §3.4 "Pooling")."""

from __future__ import annotations

import pytest
import torch

from reprpo_pl.errors import UserError
from reprpo_pl.reprs.pooling import filter_attention_sinks, masked_mean, pool


def _states(batch_size: int = 2, tokens: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[B, T, d]`` and a completion mask ``[B, T]`` with 4 and 3 real positions."""
    x = torch.randn(batch_size, tokens, d, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(batch_size, tokens, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, 1:4] = True
    return x, mask


def test_masked_mean_averages_only_masked_positions() -> None:
    x, mask = _states()
    expected = torch.stack([x[0, :4].mean(0), x[1, 1:4].mean(0)])
    torch.testing.assert_close(masked_mean(x, mask), expected)


def test_masked_mean_of_an_empty_row_is_zero_and_bf16_pools_in_fp32() -> None:
    x, mask = _states()
    mask[1] = False
    pooled = masked_mean(x.bfloat16(), mask)
    assert pooled.dtype == torch.float32
    assert (pooled[1] == 0).all()


def test_gradient_reaches_only_masked_positions() -> None:
    x, mask = _states()
    x.requires_grad_(True)
    pool(x, mask).sum().backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).all()


def test_log_softmax_mean_is_the_masked_mean_of_log_softmax() -> None:
    x, mask = _states()
    torch.testing.assert_close(pool(x, mask, "log_softmax_mean"), masked_mean(torch.log_softmax(x, -1), mask))


def _with_sink(scale: float = 50.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0: 30 completion positions, a sink at position 2 (with n ≤ 10 positions no single outlier can
    exceed mean + 3·std: its z-score is at most (n − 1)/√n)."""
    x, mask = _states(tokens=32)
    mask[0, :30] = True
    x[0, 2] *= scale
    return x, mask


def test_sink_filter_drops_the_high_norm_completion_position() -> None:
    x, mask = _with_sink()
    kept = filter_attention_sinks(x, mask, k=3.0)
    expected = mask.clone()
    expected[0, 2] = False
    assert torch.equal(kept, expected)
    torch.testing.assert_close(pool(x, mask, sink_k=3.0), masked_mean(x, expected))


def test_sink_statistics_ignore_prompt_and_padding_positions() -> None:
    """[decided] A huge vector outside the mask changes neither the statistics nor the result."""
    x, mask = _with_sink()
    noisy = x.clone()
    noisy[0, 31] *= 1e4  # a padding position of row 0
    assert torch.equal(filter_attention_sinks(noisy, mask), filter_attention_sinks(x, mask))


def test_sink_filter_never_empties_a_row() -> None:
    x, mask = _states()
    kept = filter_attention_sinks(x, mask, k=-10.0)  # a threshold below every norm
    assert torch.equal(kept, mask)


def test_sink_filter_returns_a_subset_of_the_mask_without_gradient() -> None:
    x, mask = _with_sink()
    kept = filter_attention_sinks(x.requires_grad_(True), mask)
    assert not kept.requires_grad and not (kept & ~mask).any()


def test_unknown_pooling_kind_is_a_user_error() -> None:
    x, mask = _states()
    with pytest.raises(UserError, match="mean, log_softmax_mean"):
        pool(x, mask, "max")  # type: ignore[arg-type]


# ---- collection.pooling: token weights ---------------------------------------------------------------


def test_token_weights_last_picks_the_last_real_completion_token():
    from reprpo_pl.reprs.pooling import token_weights

    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False] * 4])
    w = token_weights(mask, "last")
    assert torch.equal(w, torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4]))


def test_token_weights_exp_decay_counts_completion_tokens_only():
    import math

    from reprpo_pl.reprs.pooling import EXP_DECAY_TOKENS, token_weights

    mask = torch.tensor([[False, True, True, True]])  # a leading non-completion position gets no weight, no count
    w = token_weights(mask, "exp_decay")[0]
    raw = torch.tensor([0.0, 1.0, math.exp(-1 / EXP_DECAY_TOKENS), math.exp(-2 / EXP_DECAY_TOKENS)])
    torch.testing.assert_close(w, raw / raw.sum())
    assert torch.equal(token_weights(mask, "mean")[0], torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]))


def test_unknown_token_weighting_is_a_user_error():
    from reprpo_pl.errors import UserError
    from reprpo_pl.reprs.pooling import token_weights

    with pytest.raises(UserError, match="collection.pooling='first'"):
        token_weights(torch.ones(1, 2, dtype=torch.bool), "first")
