"""PrefVec: move the policy's chosen and rejected states apart along a preference direction (SPEC §3.4,
SPEC-recipes §1): the signed final form by default, the prototype's v2/v3 formulas with ``prototype_compat``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from reprpo_pl.errors import UserError
from reprpo_pl.objectives.dpo import dpo_loss, preference_margin
from reprpo_pl.objectives.wpo import weighted
from reprpo_pl.reprs.geometry import EPS, PreferenceGeometry, cosine, dot, key_geometries, mean_over_keys, norm, unit
from reprpo_pl.reprs.losses import LogprobTerm
from reprpo_pl.reprs.losses.diagnostics import reprpo_diagnostics
from reprpo_pl.reprs.pooling import PoolingKind
from reprpo_pl.reprs.types import ReprBatch

OrthOn = Literal["q", "cj"]
ORTH_ON = ("q", "cj")
PrototypeCompat = Literal["v2", "v3"]
PROTOTYPE_COMPAT = (None, "v2", "v3")
V3_ONLY = ("use_proj_loss", "use_proj_abs_loss")  # flags that exist only in v3 (null otherwise)
# The prototype's hard-coded factors (SPEC-recipes §1.2/§1.3): m(·) is ~1/d, so it scaled the terms up.
# v2 at 7b248f4 used 1e6 on orth: with its angle term off that is v2 here with beta ×10 (0.5 × 1e6 = 5 × 1e5).
PROJ_SCALE, V2_ORTH_SCALE, V3_ORTH_SCALE, V3_ANGLE_SCALE = 1e5, 1e5, 1e6, 1e5


def component_mean(x: Tensor) -> Tensor:
    """The prototype's m(x) = ⟨x, 𝟙⟩/d ``[..., d] → [...]`` (a mean of components, not a norm)."""
    return x.mean(-1)


def reject(x: Tensor, e: Tensor) -> Tensor:
    """x_⊥ = x − ⟨x, e⟩e for a unit ``e`` ``[B, d]`` → ``[B, d]``."""
    return x - dot(x, e).unsqueeze(-1) * e


def mean_nll_increase(batch: ReprBatch) -> Tensor:
    """``mean_T relu(NLL_π,t − NLL_ref,t)`` over the chosen completion tokens ``[B]`` (shifted next-token NLL,
    per-token log-probs ``[B, C]`` and mask ``[B, C]`` from the batch)."""
    if batch.pi_token_logp_cho is None or batch.ref_token_logp_cho is None or batch.completion_mask_cho is None:
        raise UserError("loss.use_nll_loss=true needs the chosen completion's per-token log-probs, which this ReprPO "
                        "module does not pass: use loss.use_nll_loss=false")
    mask = batch.completion_mask_cho.to(batch.pi_token_logp_cho.dtype)
    increase = F.relu(batch.ref_token_logp_cho.detach() - batch.pi_token_logp_cho)  # NLL_π − NLL_ref per token
    return (increase * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


@dataclass(frozen=True, kw_only=True)
class PrefVecLoss:
    """Per pair ``loss_proj + β·(loss_orth + loss_angle) + α·(DPO + nll_weight·NLL)`` (each behind a flag), mean
    over the batch; hidden terms are averaged over keys. States and movements are ``[B, d]`` per key.

    Movements ``c = h^π_cho − h^ref_cho``, ``j = h^π_rej − h^ref_rej`` (so ``c − j = q − r``) are measured on ê:
    ``use_pref_ref=true``: ê = û, the reference's preference direction (detached). ``use_pref_ref=false``: ê = the
    policy's own separation direction q/‖q‖, detached [decided]: the terms then grow ‖q‖ in whatever direction it
    already points and ignore r (SPEC-recipes "free"; J 2024-11-10 found it unstable). The prototype did not detach
    it, and with the gradient through ê, −⟨q − r, q̂⟩ = −‖q‖ + ⟨r, q̂⟩ rewards turning q away from r.

    Final form (``prototype_compat=null``), with n = ‖r‖+eps when ``norm_by_ref`` (SPEC-recipes §1.6's recommendation:
    scale-free terms, like innerdpo's pars_rat), else n = 1 (SPEC §3.4) [decided: default false, because the
    ratio's gradient grows as 1/‖r‖: on the tiny model's side states ‖r‖ ≈ 1e-3 and the step's gradient norm was
    1.8e5, so clipping at 10 erased the DPO term's gradient to the layers after the collected ones]:
    ``loss_proj = −(⟨c,ê⟩ − ⟨j,ê⟩)/n`` (signed scalar projection [decided]; the prototype averaged vector
    components); ``loss_orth = ‖q_⊥‖/n`` (``orth_on=q``) or ``(‖c_⊥‖ + ‖j_⊥‖)/n`` (``orth_on=cj``),
    with ``x_⊥ = x − ⟨x,ê⟩ê``: a constraint, blind to the sign by design (J 05-10), not a reward;
    ``loss_angle = 2 − cos(c,ê) − cos(j,−ê)``. DPO is SPEC §3.1's sigmoid loss with ``dpo_beta`` (WPO-weighted
    with method.wpo). NLL (``use_nll_loss``): ``mean_T relu(NLL_π,t − NLL_ref,t)`` over the chosen completion's
    tokens (shifted; the prototype's was unshifted). ``weight_tokens`` is the prototype's name for
    ``collection.pooling=exp_decay`` (τ=50, `reprpo_pl.reprs.pooling.token_weights`); the start-of-run check
    requires that pooling with it, so the weighting has one implementation.

    ``prototype_compat=v2|v3`` computes SPEC-recipes §1.2/§1.3's raw formulas on the pooled states instead, quirks
    included (m(·) = mean of components, the 10⁵/10⁶ factors, v2's leading 1, the DPO term logσ(−ρ) without β,
    which falls without bound; v3's abs, which PENALISES the separation it was meant to reward). v2:
    ``orth_on=q`` is the prototype's use_proj_rel=true (proj_rel and rel_orth), ``cj`` its false. v3 needs
    ``use_proj_loss`` and ``use_proj_abs_loss`` (null outside v3) and ê = û. ``dpo_beta`` then only scales the
    logged rewards. Not reproduced: the prototype's pooling over prompt tokens, its sink statistics over padding,
    its unshifted NLL (``method.agg=sum`` gives its summed ℓp).
    Note cos(c, ê) has a gradient of order 1/‖c‖, large while the policy equals the reference.
    """

    pooling: ClassVar[PoolingKind] = "mean"
    needs_token_deviation: ClassVar[bool] = False

    alpha: float
    beta: float
    dpo_beta: float
    use_orth_loss: bool
    use_angle_loss: bool
    use_dpo_loss: bool
    use_pref_ref: bool
    orth_on: OrthOn
    norm_by_ref: bool
    use_nll_loss: bool
    nll_weight: float
    weight_tokens: bool
    prototype_compat: PrototypeCompat | None
    use_proj_loss: bool | None
    use_proj_abs_loss: bool | None

    def __post_init__(self) -> None:
        compat = self.prototype_compat
        if compat not in PROTOTYPE_COMPAT:
            raise UserError(f"loss.prototype_compat={compat!r}: use null (the signed final form), v2 or v3")
        if self.orth_on not in ORTH_ON:
            raise UserError(f"loss.orth_on={self.orth_on!r}: use q (orth penalty on q_⊥) or cj (on c_⊥ and j_⊥)")
        v3_set = [f for f in V3_ONLY if getattr(self, f) is not None]
        if compat != "v3" and v3_set:
            raise UserError(f"loss.{v3_set[0]}={getattr(self, v3_set[0])} is a flag of loss.prototype_compat=v3 only: "
                            f"drop it (null) or set loss.prototype_compat=v3")
        if compat == "v3":
            if len(v3_set) < len(V3_ONLY):
                raise UserError("loss.prototype_compat=v3 needs loss.use_proj_loss and loss.use_proj_abs_loss "
                                "(v3's defaults: both true)")
            if not self.use_pref_ref:
                raise UserError("loss.use_pref_ref=false with loss.prototype_compat=v3: v3's direction is always the "
                                "reference's û; use loss.use_pref_ref=true or loss.prototype_compat=v2")
            if self.use_nll_loss:
                raise UserError("loss.use_nll_loss=true with loss.prototype_compat=v3: v3 has no NLL term (it only logged "
                                "it); use loss.use_nll_loss=false or loss.prototype_compat=v2")
            if self.use_orth_loss and self.orth_on != "q":
                raise UserError("loss.orth_on=cj with loss.prototype_compat=v3: v3's orth term is on q_⊥; "
                                "use loss.orth_on=q")
        if compat is not None and self.norm_by_ref:
            raise UserError(f"loss.norm_by_ref=true with loss.prototype_compat={compat}: the prototype's terms are not "
                            "divided by ‖r‖; use loss.norm_by_ref=false")
        if compat is None and self.use_orth_loss and self.orth_on == "q" and not self.use_pref_ref:
            raise UserError("loss.orth_on=q with loss.use_pref_ref=false: q has no part orthogonal to its own "
                            "direction, so the term is 0; use loss.orth_on=cj")

    @property
    def logprob_term(self) -> LogprobTerm:
        return "smooth" if self.use_dpo_loss else "none"

    @property
    def needs_token_logps(self) -> bool:
        """Whether the loss reads ``batch.pi_token_logp_cho``/``ref_token_logp_cho`` (the NLL term)."""
        return self.use_nll_loss

    def direction(self, g: PreferenceGeometry) -> Tensor:
        """ê ``[B, d]``: û, or the policy's q/‖q‖ (detached here; with gradient in v2, as the prototype had it)."""
        if self.use_pref_ref:
            return g.unit_ref
        q_hat = unit(g.pi_separation)
        return q_hat if self.prototype_compat == "v2" else q_hat.detach()

    def __call__(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.prototype_compat == "v2":
            per_pair, terms = self._v2(batch)
        elif self.prototype_compat == "v3":
            per_pair, terms = self._v3(batch)
        else:
            per_pair, terms = self._signed(batch)
        return per_pair.mean(), reprpo_diagnostics(batch, self.dpo_beta, terms)

    def _nll(self, batch: ReprBatch) -> Tensor:
        """``[B]``: the NLL increase when ``use_nll_loss``, else zeros (never reads the per-token log-probs)."""
        return mean_nll_increase(batch) if self.use_nll_loss else torch.zeros_like(batch.pi_logp_cho)

    def _signed(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The final form ``[B]`` and its logged terms."""
        proj, orth, angle = [], [], []
        for g in key_geometries(batch):
            e = self.direction(g)
            scale = norm(g.ref_direction) + EPS if self.norm_by_ref else 1.0
            c, j = g.pi_cho - g.ref_cho, g.pi_rej - g.ref_rej
            proj.append(-(dot(c, e) - dot(j, e)) / scale)
            if self.orth_on == "q":
                orth.append(norm(reject(g.pi_separation, e)) / scale)
            else:
                orth.append((norm(reject(c, e)) + norm(reject(j, e))) / scale)
            angle.append(2 - cosine(c, e) - cosine(j, -e))
        loss_proj, loss_orth, loss_angle = mean_over_keys(proj), mean_over_keys(orth), mean_over_keys(angle)  # [B]
        loss_dpo = weighted(dpo_loss(
            batch.pi_logp_cho, batch.pi_logp_rej, batch.ref_logp_cho, batch.ref_logp_rej, beta=self.dpo_beta
        ), batch.dpo_weights)  # [B]
        loss_nll = self._nll(batch)
        per_pair = (
            loss_proj
            + self.beta * (self.use_orth_loss * loss_orth + self.use_angle_loss * loss_angle)
            + self.alpha * (self.use_dpo_loss * loss_dpo + self.use_nll_loss * self.nll_weight * loss_nll)
        )
        terms = {"loss/proj": loss_proj.mean(), "loss/orth": loss_orth.mean(), "loss/angle": loss_angle.mean(),
                 "loss/dpo": loss_dpo.mean(), "loss/nll": loss_nll.mean()}
        return per_pair, terms

    def _prototype_dpo(self, batch: ReprBatch) -> Tensor:
        """The prototype's ``logσ(−ρ)`` ``[B]`` (falls as ρ rises, unbounded below; not DPO), WPO-weighted."""
        rho = preference_margin(batch.pi_logp_cho, batch.pi_logp_rej, batch.ref_logp_cho, batch.ref_logp_rej)
        return weighted(F.logsigmoid(-rho), batch.dpo_weights)

    def _v2(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """SPEC-recipes §1.2 ``[B]``: ``R = 1 + 10⁵·{proj_rel|proj} + [orth]β·10⁵·{rel_orth|orth} + [angle]β·angle``,
        ``retain = [dpo]logσ(−ρ) + [nll]nll_weight·NLL``, per pair ``R + α·retain``."""
        proj, orth, angle = [], [], []
        for g in key_geometries(batch):
            e = self.direction(g)
            m_e = component_mean(e)
            c, j, q = g.pi_cho - g.ref_cho, g.pi_rej - g.ref_rej, g.pi_separation
            if self.orth_on == "q":  # the prototype's use_proj_rel=true
                proj.append(-dot(q, e) * m_e)
                orth.append(component_mean(reject(q, e)).abs())
            else:
                proj.append(-(dot(c, e) - dot(j, e)) * m_e)
                orth.append(component_mean(reject(c, e)).abs() + component_mean(reject(j, e)).abs())
            angle.append(3 - cosine(c, e) + cosine(j, e) - cosine(q, e))
        loss_proj, loss_orth, loss_angle = mean_over_keys(proj), mean_over_keys(orth), mean_over_keys(angle)  # [B]
        hidden = (1 + PROJ_SCALE * loss_proj + self.use_orth_loss * self.beta * V2_ORTH_SCALE * loss_orth
                  + self.use_angle_loss * self.beta * loss_angle)
        loss_dpo, loss_nll = self._prototype_dpo(batch), self._nll(batch)
        retain = self.use_dpo_loss * loss_dpo + self.use_nll_loss * self.nll_weight * loss_nll
        terms = {"loss/proj": loss_proj.mean(), "loss/orth": loss_orth.mean(), "loss/angle": loss_angle.mean(),
                 "loss/hidden": hidden.mean(), "loss/dpo": loss_dpo.mean(), "loss/nll": loss_nll.mean()}
        return hidden + self.alpha * retain, terms

    def _v3(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """SPEC-recipes §1.3 ``[B]``: ``I = [proj]10⁵·mean_K(−s·m(û))``, ``[abs] I ← |I|``,
        ``I += [orth]β·10⁶·mean_K|m(q_⊥)| + [angle]β·10⁵·mean_K(−|cos(q,r)|)``, per pair ``I + α·[dpo]logσ(−ρ)``."""
        proj, orth, angle = [], [], []
        for g in key_geometries(batch):
            proj.append(-g.signed_proj * component_mean(g.unit_ref))
            orth.append(component_mean(g.orthogonal).abs())
            angle.append(-cosine(g.pi_separation, g.ref_direction).abs())
        loss_proj, loss_orth, loss_angle = mean_over_keys(proj), mean_over_keys(orth), mean_over_keys(angle)  # [B]
        inner = self.use_proj_loss * PROJ_SCALE * loss_proj
        if self.use_proj_abs_loss:
            inner = inner.abs()
        inner = (inner + self.use_orth_loss * self.beta * V3_ORTH_SCALE * loss_orth
                 + self.use_angle_loss * self.beta * V3_ANGLE_SCALE * loss_angle)
        loss_dpo = self._prototype_dpo(batch)
        terms = {"loss/proj": loss_proj.mean(), "loss/orth": loss_orth.mean(), "loss/angle": loss_angle.mean(),
                 "loss/hidden": inner.mean(), "loss/dpo": loss_dpo.mean()}
        return inner + self.alpha * self.use_dpo_loss * loss_dpo, terms
