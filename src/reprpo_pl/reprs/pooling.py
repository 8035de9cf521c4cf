"""Pool per-token hidden states over completion tokens into one vector per row (SPEC §3.4 "Pooling")."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from reprpo_pl.errors import UserError

PoolingKind = Literal["mean", "log_softmax_mean"]  # what a loss pools: the states, or their log-softmax over d
POOLING_KINDS = ("mean", "log_softmax_mean")
TokenWeighting = Literal["mean", "last", "exp_decay"]  # which completion tokens, how much (collection.pooling)
TOKEN_WEIGHTINGS = ("mean", "last", "exp_decay")
EXP_DECAY_TOKENS = 50  # τ of exp_decay (SPEC-recipes §4, the prototype's weight_tokens)


def token_weights(mask: Tensor, kind: TokenWeighting = "mean") -> Tensor:
    """Pooling weights ``[B, T]`` fp32 over the completion tokens of ``mask [B, T]`` (bool), each row summing
    to 1 (0 for a row without tokens).

    mean: uniform; last: the last real completion token only; exp_decay: ``∝ exp(−C_t/50)`` with ``C_t`` the
    number of completion tokens before t, so the first tokens of the answer count most [decided: completion
    tokens only, the prototype's mask included the prompt until 05-29, which chosen and rejected share]."""
    m = mask.to(torch.float32)
    if kind == "mean":
        w = m
    elif kind == "last":
        last = (m.cumsum(1) == m.sum(1, keepdim=True)) & mask  # the last True of each row
        w = last.to(torch.float32)
    elif kind == "exp_decay":
        before = m.cumsum(1) - m
        w = m * torch.exp(-before / EXP_DECAY_TOKENS)
    else:
        raise UserError(f"collection.pooling={kind!r}: use one of {', '.join(TOKEN_WEIGHTINGS)}")
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``mmean_t(x, mask)``: x ``[B, T, d]``, mask ``[B, T]`` bool → ``[B, d]`` in fp32.

    A row with no masked-in position pools to zeros. Accumulates in fp32 so bf16 states keep precision.
    """
    weights = mask.to(torch.float32)
    return torch.einsum("btd,bt->bd", x.float(), weights) / weights.sum(1, keepdim=True).clamp_min(1.0)


@torch.no_grad()
def filter_attention_sinks(x: Tensor, mask: Tensor, k: float = 3.0) -> Tensor:
    """Drop attention-sink positions from ``mask``: x ``[B, T, d]``, mask ``[B, T]`` bool → ``[B, T]`` bool.

    A masked-in position is dropped when its vector norm exceeds ``mean + k·std`` of the norms of the
    masked-in (completion) positions of the same row; padding and prompt never enter the statistics
    [decided]. A row that would lose every position keeps its original mask. With population std, one
    outlier among n positions has z ≤ (n − 1)/√n, so at k = 3 rows of ≤ 10 positions never drop anything.
    """
    norms = torch.linalg.vector_norm(x.float(), dim=-1)  # [B, T]
    weights = mask.to(torch.float32)
    count = weights.sum(1, keepdim=True).clamp_min(1.0)
    mean = (norms * weights).sum(1, keepdim=True) / count
    std = (((norms - mean) ** 2 * weights).sum(1, keepdim=True) / count).sqrt()
    kept = mask & (norms <= mean + k * std)
    empty = ~kept.any(1, keepdim=True)
    return torch.where(empty, mask, kept)


def weighted_mean(x: Tensor, weights: Tensor) -> Tensor:
    """``Σ_t w_t x_t``: x ``[B, T, d]``, `token_weights` ``[B, T]`` → ``[B, d]`` fp32 (accumulated in fp32)."""
    return torch.einsum("btd,bt->bd", x.float(), weights)


def pool(x: Tensor, mask: Tensor, kind: PoolingKind = "mean", sink_k: float | None = None,
         tokens: TokenWeighting = "mean") -> Tensor:
    """Pool x ``[B, T, d]`` over mask ``[B, T]`` (completion tokens) → ``[B, d]`` fp32.

    kind: ``mean`` = masked mean of x; ``log_softmax_mean`` = masked mean of ``log_softmax_d(x)``
    (the `rank` loss treats each hidden vector as logits). ``sink_k`` (e.g. 3) first drops attention-sink
    positions of x, see `filter_attention_sinks`; None keeps every completion token. ``tokens`` weights the
    remaining positions (`token_weights`: mean, last, exp_decay).
    """
    if kind not in POOLING_KINDS:
        raise UserError(f"unknown pooling kind={kind!r}: use one of {', '.join(POOLING_KINDS)}")
    if sink_k is not None:
        mask = filter_attention_sinks(x, mask, sink_k)
    if kind == "log_softmax_mean":
        x = torch.log_softmax(x.float(), dim=-1)
    return weighted_mean(x, token_weights(mask, tokens))
