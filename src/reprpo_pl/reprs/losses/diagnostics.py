"""Diagnostics logged by every representation loss (SPEC §3.4 "Logged for every ReprPO run")."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from reprpo_pl.objectives.dpo import dpo_metrics
from reprpo_pl.reprs.geometry import cosine, key_geometries, mean_over_keys, norm
from reprpo_pl.reprs.types import ReprBatch

DEFAULT_REWARD_BETA = 0.1  # β of rewards/* for losses without a DPO term (TRL's default)


class PairLogProbs(Protocol):
    """Aggregated completion log-probs ``[B]`` of a batch of pairs; `ReprBatch` is one."""

    pi_logp_cho: Tensor
    pi_logp_rej: Tensor
    ref_logp_cho: Tensor
    ref_logp_rej: Tensor


def dpo_diagnostics(batch: PairLogProbs, beta: float) -> dict[str, Tensor]:
    """SPEC §3.1's TRL-named diagnostics (detached scalars): ``rewards/chosen`` = β(ℓp_π(cho) − ℓp_ref(cho)),
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``,
    ``dpo_acc``. β is the loss's own DPO temperature, so the rewards are the implicit rewards it optimises."""
    return dpo_metrics(batch.pi_logp_cho, batch.pi_logp_rej, batch.ref_logp_cho, batch.ref_logp_rej, beta)


@torch.no_grad()
def hidden_diagnostics(batch: ReprBatch) -> dict[str, Tensor]:
    """Scalars averaged over keys and batch: ``hidden/signed_proj`` (s = ⟨q, û⟩), ``hidden/cos_pi_ref``
    (cosine of policy vs reference states, chosen and rejected averaged) and ``hidden/dev_norm``
    (‖h^π − h^ref‖, chosen and rejected averaged)."""
    geometries = key_geometries(batch)
    cos_pi_ref = [(cosine(g.pi_cho, g.ref_cho) + cosine(g.pi_rej, g.ref_rej)) / 2 for g in geometries]
    dev_norm = [(norm(g.pi_cho - g.ref_cho) + norm(g.pi_rej - g.ref_rej)) / 2 for g in geometries]
    return {
        "hidden/signed_proj": mean_over_keys(g.signed_proj for g in geometries).mean(),
        "hidden/cos_pi_ref": mean_over_keys(cos_pi_ref).mean(),
        "hidden/dev_norm": mean_over_keys(dev_norm).mean(),
    }


def reprpo_diagnostics(batch: ReprBatch, beta: float, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Everything a representation loss logs: ``terms`` (e.g. ``{"loss/out": …}``; ``loss/*`` keep their graph for
    `reprpo_pl.methods.loss_balance`, the module detaches them when it logs, the rest are detached here), then
    `dpo_diagnostics` and `hidden_diagnostics`."""
    kept = {name: value if name.startswith("loss/") else value.detach() for name, value in terms.items()}
    return {**kept, **dpo_diagnostics(batch, beta), **hidden_diagnostics(batch)}
