"""InnerDPO, the headline ReprPO loss: DPO on log-probs plus a DPO-style loss on a hidden margin (SPEC §3.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from reprpo_pl.errors import UserError
from reprpo_pl.objectives.dpo import dpo_loss
from reprpo_pl.objectives.wpo import weighted
from reprpo_pl.reprs.geometry import (
    EPS,
    PreferenceGeometry,
    cosine,
    dot,
    key_geometries,
    l1_norm,
    norm,
    symlog,
)
from reprpo_pl.reprs.losses import LogprobTerm
from reprpo_pl.reprs.losses.diagnostics import reprpo_diagnostics
from reprpo_pl.reprs.pooling import PoolingKind
from reprpo_pl.reprs.types import ReprBatch

MarginLossType = Literal["sigmoid", "ipo"]
MARGIN_LOSS_TYPES = ("sigmoid", "ipo")
TOKEN_CONSTRAINT_WEIGHT = 0.5  # Hθ −= ½·relu(D_rej − D_cho)
ANGLE_MAG_NORM_RANGE = (0.1, 2.0)  # clamp of ‖r‖ in angle_mag


def _para_orth(g: PreferenceGeometry) -> Tensor:
    """``log-odds(P, O)_π − log-odds(P_ref, O_ref)`` with L1 norms, ``[B]``.

    Our reading: P, O are the L1 norms of q_par, q_orth, and P_ref, O_ref those of the reference's
    own r split along û, where O_ref = 0 by construction. Plain ``log P − log O`` would then make the
    reference term log(P_ref/EPS) and give O a 1/EPS gradient at init, so both log-odds are smoothed
    by the reference's parallel mass: ``log-odds(P, O) = log(P + EPS) − log(O + P_ref + EPS)``. The
    reference term is then 0 and Hθ = log(P + EPS) − log(O + P_ref + EPS): zero at policy = reference,
    up with |s|, down with orthogonal movement measured in units of P_ref.
    """
    ref_parallel = dot(g.ref_direction, g.unit_ref).unsqueeze(-1) * g.unit_ref
    return torch.log(l1_norm(g.parallel) + EPS) - torch.log(l1_norm(g.orthogonal) + l1_norm(ref_parallel) + EPS)


def _angle_mag(g: PreferenceGeometry) -> Tensor:
    """``clamp(‖r‖, 0.1, 2)·atanh(|cos(q, r)| − EPS)`` ``[B]``."""
    magnitude = norm(g.ref_direction).clamp(*ANGLE_MAG_NORM_RANGE)
    return magnitude * torch.atanh(cosine(g.pi_separation, g.ref_direction).abs().clamp(max=1.0) - EPS)


COS_CLAMP = 1e-4  # cosine_logodds clamps cos(q, r) to ±(1 − this) before atanh
PARS_RAT_LOG_SCALE = 10.0  # the prototype's factor of pars_rat_log (8418662)


def _cosine_logodds(g: PreferenceGeometry) -> Tensor:
    """``logit((1 + cos(q, r))/2) = 2·atanh(cos(q, r))`` ``[B]``, cos clamped to ±(1 − ε) (SPEC-recipes §2, J 05-30):
    up as the policy's separation turns towards the reference's, signed."""
    return 2 * torch.atanh(cosine(g.pi_separation, g.ref_direction).clamp(-1 + COS_CLAMP, 1 - COS_CLAMP))


def _cross_similarity(g: PreferenceGeometry) -> Tensor:
    """``(cos(π_c, ref_c) − cos(π_c, ref_j)) − (cos(π_j, ref_c) − cos(π_j, ref_j))`` ``[B]``, bounded in [−4, 4]
    (SPEC-recipes §2, J 05-30): chosen closer to the reference's chosen than to its rejected, and vice versa."""
    return (cosine(g.pi_cho, g.ref_cho) - cosine(g.pi_cho, g.ref_rej)) - (cosine(g.pi_rej, g.ref_cho) - cosine(g.pi_rej, g.ref_rej))


def _pars_rat_log(g: PreferenceGeometry) -> Tensor:
    """``10·(log(max(s, ε)) − log(‖r‖ + ε))`` ``[B]`` (8418662): pars_rat in log space. The prototype's form is NaN
    for s < 0; clamped here [decided], so it has no gradient while the policy's separation is backwards."""
    return PARS_RAT_LOG_SCALE * (torch.log(g.signed_proj.clamp(min=EPS)) - torch.log(norm(g.ref_direction) + EPS))


# Hθ per key, ``[B]``, as listed in SPEC §3.4 (and SPEC-recipes §2's ✓ margins at the end); s = ⟨q, û⟩,
# P = ‖q_par‖, O = ‖q_orth‖.
ALIGN_METHODS: dict[str, Callable[[PreferenceGeometry], Tensor]] = {
    "pars_rat": lambda g: g.signed_proj / (norm(g.ref_direction) + EPS) - 1,
    "para_signed": lambda g: g.signed_proj,
    "para_signed_log": lambda g: symlog(g.signed_proj),
    "para_orth_signed": lambda g: g.signed_proj - g.orthogonal_norm,
    "para_orth_signed_log": lambda g: symlog(g.signed_proj) - torch.log(g.orthogonal_norm + EPS),
    "logodds_noref": lambda g: torch.log(g.parallel_norm + EPS) - torch.log(g.orthogonal_norm + EPS),
    "odds_noref": lambda g: g.parallel_norm - g.orthogonal_norm,
    # [decided] negated vs the SPEC text so that, like every align_method, it rewards separation
    "cosine_policy_margin": lambda g: cosine(g.ref_cho, g.ref_rej) - cosine(g.pi_cho, g.pi_rej),
    "cosine_cross_model": lambda g: cosine(g.pi_cho, g.ref_cho) - cosine(g.pi_rej, g.ref_rej),
    "para_orth": _para_orth,
    "direct_projection": lambda g: torch.log(l1_norm(g.pi_separation * g.unit_ref) + EPS),
    "angle_mag": _angle_mag,
    "cosine_logodds": _cosine_logodds,
    "cross_similarity": _cross_similarity,
    "pars_rat_log": _pars_rat_log,
}


def margin_loss(margin: Tensor, beta: float, loss_type: MarginLossType) -> Tensor:
    """DPO-style loss on a margin ``[B]`` (here the hidden margin): sigmoid −logσ(β·m); ipo (m − 1/(2β))²."""
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margin)
    return (margin - 1 / (2 * beta)) ** 2


def policy_weights(batch: ReprBatch) -> Tensor:
    """WPO weights ``[B]`` = exp(ℓp_π(cho) + ℓp_π(rej)), detached, unnormalised.

    Read from the batch's aggregated log-probs, i.e. per-token means with the default ``agg=mean``, so a
    weight is the product of the two completions' geometric-mean token probabilities (in (0, 1]). It
    scales the loss down (≈ e^-4 for typical chat data); with ``agg=sum`` it underflows towards 0.
    """
    return torch.exp(batch.pi_logp_cho + batch.pi_logp_rej).detach()


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"unknown {what}={value!r}: use one of {', '.join(valid)}")


@dataclass(frozen=True, kw_only=True)
class InnerDPOLoss:
    """``L = L_out + α·L_in`` per pair, then mean over the batch (SPEC §3.4 innerdpo).

    L_out: DPO (sigmoid or ipo, β_out) on ρ. L_in: `margin_loss` with β on the hidden margin
    ``mean_K Hθ`` where Hθ ``[B]`` per key comes from ``align_method`` (see `ALIGN_METHODS`).
    Options: ``trust_region`` clamps each key's Hθ from above; ``use_token_constraint`` subtracts
    ½·relu(D_rej − D_cho) from the hidden margin (D = ``batch.token_dev_*``); ``use_policy_weights``
    multiplies each pair's loss by its `policy_weights`; ``norm_before_reduce`` (the prototype's 06-03…06-08 option)
    has the module pool unit-normalised token states ``H_t/‖H_t‖``; ``auto_alpha`` has it replace α by
    ``‖∇L_out‖/‖∇L_in‖`` (experimental, `reprpo_pl.methods.loss_balance`).
    """

    pooling: ClassVar[PoolingKind] = "mean"
    logprob_term: ClassVar[LogprobTerm] = "smooth"  # the DPO term
    needs_token_logps: ClassVar[bool] = False

    align_method: str
    alpha: float
    beta: float
    beta_out: float
    inner_loss_type: MarginLossType
    outer_loss_type: MarginLossType
    trust_region: float | None
    use_token_constraint: bool
    use_policy_weights: bool
    norm_before_reduce: bool  # read by the module's ReprPipeline: unit-normalise each token's state before pooling
    auto_alpha: bool  # read by the module (`reprpo_pl.methods.loss_balance`): α re-measured from gradient norms

    def __post_init__(self) -> None:
        _check_choice("align_method", self.align_method, tuple(ALIGN_METHODS))
        _check_choice("inner_loss_type", self.inner_loss_type, MARGIN_LOSS_TYPES)
        _check_choice("outer_loss_type", self.outer_loss_type, MARGIN_LOSS_TYPES)

    @property
    def needs_token_deviation(self) -> bool:
        return self.use_token_constraint

    def __call__(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        align = ALIGN_METHODS[self.align_method]
        theta = torch.stack([align(g) for g in key_geometries(batch)])  # [K, B]
        clamped = theta if self.trust_region is None else theta.clamp(max=self.trust_region)
        hidden_margin = clamped.mean(0)  # [B]
        terms: dict[str, Tensor] = {}
        if self.use_token_constraint:
            if batch.token_dev_cho is None or batch.token_dev_rej is None:
                raise ValueError("use_token_constraint needs batch.token_dev_cho/rej (see needs_token_deviation)")
            penalty = TOKEN_CONSTRAINT_WEIGHT * F.relu(batch.token_dev_rej - batch.token_dev_cho)
            hidden_margin = hidden_margin - penalty
            terms["hidden/token_penalty"] = penalty.mean()
        loss_in = margin_loss(hidden_margin, self.beta, self.inner_loss_type)  # [B]
        loss_out = weighted(dpo_loss(
            batch.pi_logp_cho, batch.pi_logp_rej, batch.ref_logp_cho, batch.ref_logp_rej,
            beta=self.beta_out, loss_type=self.outer_loss_type,
        ), batch.dpo_weights)  # [B], WPO-weighted with method.wpo
        per_pair = loss_out + self.alpha * loss_in
        if self.use_policy_weights:
            per_pair = per_pair * policy_weights(batch)
        terms |= {"loss/out": loss_out.mean(), "loss/in": loss_in.mean(), "hidden/theta": theta.mean()}
        return per_pair.mean(), reprpo_diagnostics(batch, self.beta_out, terms)
