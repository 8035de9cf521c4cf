"""Per-token completion log-probs from one concatenated forward (SPEC §2)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Agg = Literal["mean", "sum"]
AGGS = ("mean", "sum")


def token_logps(logits: Tensor, ids: Tensor, mask: Tensor, chunk: int = 4) -> Tensor:
    """log p(ids_t | prefix) in fp32 as gather − logsumexp, a few rows at a time so no full
    ``[N, C, V]`` fp32 log-softmax is materialised.

    logits: ``[N, C, V]`` (any dtype), already aligned so ``logits[:, t]`` predicts ``ids[:, t]``;
    ids, mask: ``[N, C]``. Returns ``[N, C]``, zero where mask is False."""
    out = []
    for rows in range(0, logits.shape[0], chunk):
        lg = logits[rows : rows + chunk].float()
        picked = lg.gather(-1, ids[rows : rows + chunk].unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(lg, dim=-1))
    return torch.where(mask, torch.cat(out), 0.0)


def aggregate(logps: Tensor, mask: Tensor, agg: Agg = "mean") -> Tensor:
    """``[N, C]`` per-token log-probs → ``[N]``: masked mean (default, per-token) or sum."""
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if agg == "mean" else total


def completion_logps(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Run ``model`` on a `concat_pairs` batch; return per-token completion log-probs ``[2B, C]``.

    Only the last C+1 positions are projected to the vocabulary (``logits_to_keep``); position
    C+P−1 predicts nothing and is dropped."""
    width = inputs["completion_ids"].shape[1]
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"].long(),
        position_ids=inputs["position_ids"],
        logits_to_keep=width + 1,
        use_cache=False,
    )
    return token_logps(out.logits[:, :-1], inputs["completion_ids"], inputs["completion_mask"])
