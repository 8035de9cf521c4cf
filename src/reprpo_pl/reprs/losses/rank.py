"""Rank: hidden vectors as logits; push the policy's chosen log-softmax up relative to rejected (SPEC §3.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from reprpo_pl.objectives.dpo import preference_margin
from reprpo_pl.reprs.geometry import key_geometries, mean_over_keys
from reprpo_pl.reprs.losses import LogprobTerm
from reprpo_pl.reprs.losses.diagnostics import DEFAULT_REWARD_BETA, reprpo_diagnostics
from reprpo_pl.reprs.pooling import PoolingKind
from reprpo_pl.reprs.types import ReprBatch


@dataclass(frozen=True, kw_only=True)
class RankLoss:
    """``L = mean_d(−logσ(β·p)) + α·retain`` per pair (rank term averaged over keys), mean over the batch.

    Pooled states are ``g = mmean_t(log_softmax_d(H))`` ``[B, d]`` (``pooling = "log_softmax_mean"``) and
    ``p = (g^π_cho − g^ref_cho) − (g^π_rej − g^ref_rej)``: lowering L raises every coordinate of the
    policy's chosen log-softmax relative to the reference's, and of rejected lowers it [decided].
    ``retain`` = relu(−ρ) if ``use_dpo_loss`` + relu(NLL_π(cho) − NLL_ref(cho)) if ``use_nll_loss``:
    hinges that only penalise the log-prob preference or the chosen NLL getting worse than the reference's.
    It does not use the reference direction û.
    """

    pooling: ClassVar[PoolingKind] = "log_softmax_mean"
    needs_token_logps: ClassVar[bool] = False
    logprob_term: ClassVar[LogprobTerm] = "hinge"  # relu(−ρ), relu(NLL increase): zero gradient at ρ = 0
    needs_token_deviation: ClassVar[bool] = False

    alpha: float
    beta: float
    use_dpo_loss: bool
    use_nll_loss: bool

    def __call__(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        rank = []
        for g in key_geometries(batch):
            p = (g.pi_cho - g.ref_cho) - (g.pi_rej - g.ref_rej)  # [B, d]
            rank.append((-F.logsigmoid(self.beta * p)).mean(-1))
        loss_rank = mean_over_keys(rank)  # [B]
        rho = preference_margin(batch.pi_logp_cho, batch.pi_logp_rej, batch.ref_logp_cho, batch.ref_logp_rej)
        nll_increase = batch.pi_nll_cho - batch.ref_nll_cho.detach()
        retain = self.use_dpo_loss * F.relu(-rho) + self.use_nll_loss * F.relu(nll_increase)  # [B]
        terms = {"loss/rank": loss_rank.mean(), "loss/retain": retain.mean()}
        return (loss_rank + self.alpha * retain).mean(), reprpo_diagnostics(batch, DEFAULT_REWARD_BETA, terms)
