"""WPO weights for the DPO term (SPEC-recipes §3; Zhou et al. 2024, eq. 2): pairs the policy itself would
generate count more. Off by default; the weights never carry gradient.

Per completion ``y``: ``lw(y) = mean_t [log π(y_t) − log Σ_v π(v)²]`` over its real tokens (policy, no grad).

- ``trl``: ``w = min(1, exp(lw_cho + lw_rej))`` — the prototype's form (balance_losses), TRL's with the
  clamp TRL ≤ 0.19 applied; TRL 1.x drops the clamp (``exp(lw_cho)·exp(lw_rej)``), equal wherever it is ≤ 1.
- ``sigmoid_norm``: ``w = σ((lw_cho + lw_rej)/3) / mean_B σ(·)`` — the prototype's vast2 form, mean 1 per batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

WpoMode = Literal["off", "trl", "sigmoid_norm"]
WPO_MODES = ("off", "trl", "sigmoid_norm")


@torch.no_grad()
def wpo_log_weight(logps: Tensor, log_sum_sq: Tensor, mask: Tensor) -> Tensor:
    """``lw`` ``[N]``: mean over the real tokens (``mask [N, C]``) of ``log π(y_t) − log Σ_v π(v)²`` (both ``[N, C]``)."""
    m = mask.float()
    return ((logps.detach() - log_sum_sq) * m).sum(-1) / m.sum(-1).clamp(min=1)


@torch.no_grad()
def wpo_weights(lw_cho: Tensor, lw_rej: Tensor, mode: WpoMode) -> Tensor:
    """Per-pair weights ``[B]`` of the DPO loss from `wpo_log_weight` of chosen and rejected ``[B]`` each."""
    if mode == "trl":
        return torch.exp(lw_cho + lw_rej).clamp(max=1.0)
    if mode == "sigmoid_norm":
        s = torch.sigmoid((lw_cho + lw_rej) / 3)
        return s / s.mean().clamp_min(1e-12)
    raise ValueError(f"wpo mode {mode!r} has no weights: use one of {', '.join(WPO_MODES[1:])}")


def weighted(per_pair_loss: Tensor, weights: Tensor | None) -> Tensor:
    """``per_pair_loss [B]`` times the WPO ``weights [B]`` (unchanged when None, i.e. ``wpo=off``)."""
    return per_pair_loss if weights is None else per_pair_loss * weights
