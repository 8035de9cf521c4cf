"""MSE (circuit-breaker style): pull rejected states onto the reference's chosen ones, keep chosen (SPEC §3.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from reprpo_pl.reprs.geometry import EPS, key_geometries, mean_over_keys, norm
from reprpo_pl.reprs.losses import LogprobTerm
from reprpo_pl.reprs.losses.diagnostics import DEFAULT_REWARD_BETA, reprpo_diagnostics
from reprpo_pl.reprs.pooling import PoolingKind
from reprpo_pl.reprs.types import ReprBatch


@dataclass(frozen=True, kw_only=True)
class MSELoss:
    """``L = reroute + α·retain`` per pair and key, averaged over keys then batch, where
    ``reroute = log‖h^ref_cho − h^π_rej‖ − sg(log‖r‖)``, ``retain = log‖h^ref_cho − h^π_cho‖ − sg(log‖r‖)``
    (EPS inside each log). Not a separation loss: it lowers when the policy's rejected state moves onto the
    reference's chosen state, so it shrinks q rather than growing it along û.
    """

    pooling: ClassVar[PoolingKind] = "mean"
    needs_token_logps: ClassVar[bool] = False
    logprob_term: ClassVar[LogprobTerm] = "none"
    needs_token_deviation: ClassVar[bool] = False

    alpha: float

    def __call__(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        reroute, retain = [], []
        for g in key_geometries(batch):
            log_ref_norm = torch.log(norm(g.ref_direction) + EPS)  # detached: r has no grad
            reroute.append(torch.log(norm(g.ref_cho - g.pi_rej) + EPS) - log_ref_norm)
            retain.append(torch.log(norm(g.ref_cho - g.pi_cho) + EPS) - log_ref_norm)
        loss_reroute, loss_retain = mean_over_keys(reroute), mean_over_keys(retain)  # [B]
        terms = {"loss/reroute": loss_reroute.mean(), "loss/retain": loss_retain.mean()}
        return (loss_reroute + self.alpha * loss_retain).mean(), reprpo_diagnostics(batch, DEFAULT_REWARD_BETA, terms)
