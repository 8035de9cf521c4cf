"""TopK: grow the policy's separation on the reference direction's largest coordinates to tr× (SPEC §3.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from reprpo_pl.errors import UserError
from reprpo_pl.reprs.geometry import (
    EPS,
    dot,
    key_geometries,
    mean_over_keys,
    norm,
    unit,
)
from reprpo_pl.reprs.losses import LogprobTerm
from reprpo_pl.reprs.losses.diagnostics import DEFAULT_REWARD_BETA, reprpo_diagnostics
from reprpo_pl.reprs.pooling import PoolingKind
from reprpo_pl.reprs.types import ReprBatch

MAX_AUTO_K = 100  # k = min(100, d/4) when not given


def top_coordinates(ref_direction: Tensor, k: int | None) -> Tensor:
    """Indices ``[B, k]`` of the k largest |r| coordinates per row of r ``[B, d]``; None → min(100, d//4)."""
    d = ref_direction.shape[-1]
    k = max(1, min(MAX_AUTO_K, d // 4)) if k is None else min(k, d)
    return ref_direction.abs().topk(k, dim=-1).indices


@dataclass(frozen=True, kw_only=True)
class TopKLoss:
    """``L = (tr − ratio)² + relu(1 − ratio) + 2·relu(ratio − tr)`` per pair and key, mean over keys then batch.

    On the index set I of the k largest |r| coordinates, ``ratio = ⟨q_I, û_I⟩ / ‖r_I‖`` with
    ``û_I = r_I/‖r_I‖`` (our reading: the unit vector of the restricted r), so ratio = 1 when the policy
    separates exactly like the reference and L is smallest at ratio = tr.
    """

    pooling: ClassVar[PoolingKind] = "mean"
    needs_token_logps: ClassVar[bool] = False
    logprob_term: ClassVar[LogprobTerm] = "none"
    needs_token_deviation: ClassVar[bool] = False

    k: int | None
    tr: float

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise UserError(f"topk k={self.k} must be a positive integer, or null for min(100, d/4)")

    def __call__(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        ratios = []
        for g in key_geometries(batch):
            index = top_coordinates(g.ref_direction, self.k)
            r_top, q_top = g.ref_direction.gather(-1, index), g.pi_separation.gather(-1, index)  # [B, k]
            ratios.append(dot(q_top, unit(r_top)) / (norm(r_top) + EPS))  # [B]
        per_key = [(self.tr - ratio) ** 2 + F.relu(1 - ratio) + 2 * F.relu(ratio - self.tr) for ratio in ratios]
        loss = mean_over_keys(per_key)  # [B]
        terms = {"loss/topk": loss.mean(), "hidden/topk_ratio": mean_over_keys(ratios).mean()}
        return loss.mean(), reprpo_diagnostics(batch, DEFAULT_REWARD_BETA, terms)
