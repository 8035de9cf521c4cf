"""Pool per-token hidden states over completion tokens into one vector per row (SPEC §3.4 "Pooling")."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from reprpo_pl.errors import UserError

PoolingKind = Literal["mean", "log_softmax_mean"]
POOLING_KINDS = ("mean", "log_softmax_mean")


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


def pool(x: Tensor, mask: Tensor, kind: PoolingKind = "mean", sink_k: float | None = None) -> Tensor:
    """Pool x ``[B, T, d]`` over mask ``[B, T]`` (completion tokens) → ``[B, d]`` fp32.

    kind: ``mean`` = masked mean of x; ``log_softmax_mean`` = masked mean of ``log_softmax_d(x)``
    (the `rank` loss treats each hidden vector as logits). ``sink_k`` (e.g. 3) first drops attention-sink
    positions of x, see `filter_attention_sinks`; None keeps every completion token.
    """
    if kind not in POOLING_KINDS:
        raise UserError(f"unknown pooling kind={kind!r}: use one of {', '.join(POOLING_KINDS)}")
    if sink_k is not None:
        mask = filter_attention_sinks(x, mask, sink_k)
    if kind == "log_softmax_mean":
        x = torch.log_softmax(x.float(), dim=-1)
    return masked_mean(x, mask)
