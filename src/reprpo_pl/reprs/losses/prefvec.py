"""PrefVec: move the policy's chosen and rejected states apart along the reference direction (SPEC §3.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from reprpo_pl.objectives.dpo import dpo_loss
from reprpo_pl.objectives.wpo import weighted
from reprpo_pl.reprs.geometry import cosine, dot, key_geometries, mean_over_keys, norm
from reprpo_pl.reprs.losses import LogprobTerm
from reprpo_pl.reprs.losses.diagnostics import reprpo_diagnostics
from reprpo_pl.reprs.pooling import PoolingKind
from reprpo_pl.reprs.types import ReprBatch


@dataclass(frozen=True, kw_only=True)
class PrefVecLoss:
    """``L = loss_proj + β·(loss_orth + loss_angle) + α·DPO`` (orth, angle, DPO each behind a flag).

    With the movements ``c = h^π_cho − h^ref_cho``, ``j = h^π_rej − h^ref_rej`` ``[B, d]`` and û:
    ``loss_proj = −(⟨c, û⟩ − ⟨j, û⟩)`` (signed scalar projection [decided]; the prototype averaged vector
    components), ``loss_orth = ‖c_orth‖ + ‖j_orth‖``, ``loss_angle = 2 − cos(c, r) − cos(j, −r)``.
    Hidden terms are averaged over keys, the total over the batch. DPO is SPEC §3.1's sigmoid loss with
    ``dpo_beta``. Note cos(c, r) has a gradient of order 1/‖c‖, large while the policy equals the reference.
    """

    pooling: ClassVar[PoolingKind] = "mean"
    needs_token_deviation: ClassVar[bool] = False

    alpha: float
    beta: float
    dpo_beta: float
    use_orth_loss: bool
    use_angle_loss: bool
    use_dpo_loss: bool

    @property
    def logprob_term(self) -> LogprobTerm:
        return "smooth" if self.use_dpo_loss else "none"

    def __call__(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        proj, orth, angle = [], [], []
        for g in key_geometries(batch):
            cho_move, rej_move, u, r = g.pi_cho - g.ref_cho, g.pi_rej - g.ref_rej, g.unit_ref, g.ref_direction
            cho_along, rej_along = dot(cho_move, u), dot(rej_move, u)  # [B]
            proj.append(-(cho_along - rej_along))
            orth.append(norm(cho_move - cho_along.unsqueeze(-1) * u) + norm(rej_move - rej_along.unsqueeze(-1) * u))
            angle.append(2 - cosine(cho_move, r) - cosine(rej_move, -r))
        loss_proj, loss_orth, loss_angle = mean_over_keys(proj), mean_over_keys(orth), mean_over_keys(angle)  # [B]
        loss_dpo = weighted(dpo_loss(
            batch.pi_logp_cho, batch.pi_logp_rej, batch.ref_logp_cho, batch.ref_logp_rej, beta=self.dpo_beta
        ), batch.dpo_weights)  # [B], WPO-weighted with method.wpo
        per_pair = (
            loss_proj
            + self.beta * (self.use_orth_loss * loss_orth + self.use_angle_loss * loss_angle)
            + self.alpha * self.use_dpo_loss * loss_dpo
        )
        terms = {
            "loss/proj": loss_proj.mean(),
            "loss/orth": loss_orth.mean(),
            "loss/angle": loss_angle.mean(),
            "loss/dpo": loss_dpo.mean(),
        }
        return per_pair.mean(), reprpo_diagnostics(batch, self.dpo_beta, terms)
