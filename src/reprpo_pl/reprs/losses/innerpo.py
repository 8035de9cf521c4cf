"""InnerPO: DPO plus a logistic loss on how much closer chosen stays to the reference than rejected (SPEC §3.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reprpo_pl.objectives.dpo import dpo_loss
from reprpo_pl.objectives.wpo import weighted
from reprpo_pl.reprs.geometry import cosine, key_geometries
from reprpo_pl.reprs.losses import LogprobTerm
from reprpo_pl.reprs.losses.diagnostics import reprpo_diagnostics
from reprpo_pl.reprs.pooling import PoolingKind
from reprpo_pl.reprs.types import ReprBatch

DPO_BETA = 1.0  # SPEC writes the outer term as −logσ(ρ)


@dataclass(frozen=True, kw_only=True)
class InnerPOLoss:
    """``L = −logσ(ρ) + α·mean_K(−logσ(Hθ))`` per pair, then mean over the batch, with
    ``Hθ = β(cos(h^π_cho, h^ref_cho) − cos(h^π_rej, h^ref_rej))`` ``[B]`` per key.
 The hidden term rewards the policy's chosen states staying
    near the reference's and its rejected states moving away from them, in any direction: it does
    not look at the reference preference direction.
    """

    pooling: ClassVar[PoolingKind] = "mean"
    logprob_term: ClassVar[LogprobTerm] = "smooth"  # the DPO term
    needs_token_deviation: ClassVar[bool] = False
    needs_token_logps: ClassVar[bool] = False

    alpha: float
    beta: float
    norm_before_reduce: bool  # read by the module's ReprPipeline: unit-normalise each token's state before pooling
    auto_alpha: bool  # read by the module (`reprpo_pl.methods.loss_balance`): α re-measured from gradient norms

    def __call__(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        theta = torch.stack(
            [self.beta * (cosine(g.pi_cho, g.ref_cho) - cosine(g.pi_rej, g.ref_rej)) for g in key_geometries(batch)]
        )  # [K, B]
        loss_in = (-F.logsigmoid(theta)).mean(0)  # [B]
        loss_out = weighted(dpo_loss(batch.pi_logp_cho, batch.pi_logp_rej, batch.ref_logp_cho, batch.ref_logp_rej,
                                     beta=DPO_BETA), batch.dpo_weights)  # WPO-weighted with method.wpo
        terms = {"loss/out": loss_out.mean(), "loss/in": loss_in.mean(), "hidden/theta": theta.mean()}
        return (loss_out + self.alpha * loss_in).mean(), reprpo_diagnostics(batch, DPO_BETA, terms)
