"""The DPO family of losses on aggregated completion log-probs (SPEC §3.1)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from reprpo_pl.errors import UserError

LossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def preference_margin(pi_cho: Tensor, pi_rej: Tensor, ref_cho: Tensor, ref_rej: Tensor) -> Tensor:
    """ρ = (ℓp_π(cho) − ℓp_π(rej)) − (ℓp_ref(cho) − ℓp_ref(rej)); all inputs ``[B]``, ref detached."""
    return (pi_cho - pi_rej) - (ref_cho - ref_rej).detach()


def dpo_loss(
    pi_cho: Tensor,
    pi_rej: Tensor,
    ref_cho: Tensor,
    ref_rej: Tensor,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair DPO loss ``[B]`` from aggregated log-probs ``[B]``.

    sigmoid: −(1−ε)·logσ(βρ) − ε·logσ(−βρ);  ipo: (ρ − 1/(2β))²;  hinge: relu(1 − βρ).
    """
    rho = preference_margin(pi_cho, pi_rej, ref_cho, ref_rej)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * rho) - label_smoothing * F.logsigmoid(-beta * rho)
    if loss_type == "ipo":
        return (rho - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return F.relu(1 - beta * rho)
    raise UserError(f"unknown loss_type={loss_type!r}: use one of {', '.join(LOSS_TYPES)}")


def dpo_metrics(pi_cho: Tensor, pi_rej: Tensor, ref_cho: Tensor, ref_rej: Tensor, beta: float) -> dict[str, Tensor]:
    """TRL-named DPO diagnostics (detached means) from aggregated log-probs ``[B]``."""
    rewards_cho = beta * (pi_cho - ref_cho).detach()
    rewards_rej = beta * (pi_rej - ref_rej).detach()
    return {
        "rewards/chosen": rewards_cho.mean(),
        "rewards/rejected": rewards_rej.mean(),
        "rewards/margins": (rewards_cho - rewards_rej).mean(),
        "rewards/accuracies": (rewards_cho > rewards_rej).float().mean(),
        "logps/chosen": pi_cho.detach().mean(),
        "logps/rejected": pi_rej.detach().mean(),
        "dpo_acc": (pi_cho > pi_rej).float().mean(),
    }
