"""Vector maths shared by the representation losses (SPEC §3.4 "Vectors").

Every function reduces over the last axis: ``[..., d]`` vectors give ``[...]`` scalars.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

import torch
from torch import Tensor

from reprpo_pl.reprs.types import ReprBatch

EPS = 1e-6  # keeps divisions and logs finite; same constant in every loss


def norm(x: Tensor) -> Tensor:
    """‖x‖₂ ``[..., d] → [...]``; torch gives it a zero (finite) gradient at x = 0."""
    return torch.linalg.vector_norm(x, dim=-1)


def l1_norm(x: Tensor) -> Tensor:
    """‖x‖₁ ``[..., d] → [...]``."""
    return x.abs().sum(-1)


def unit(x: Tensor) -> Tensor:
    """``x / (‖x‖ + EPS)`` ``[..., d]``; the zero vector stays zero."""
    return x / (norm(x) + EPS).unsqueeze(-1)


def dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩ ``[..., d] → [...]``."""
    return (a * b).sum(-1)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(a, b) ``[..., d] → [...]``; 0 when either vector is zero (the gradient there stays finite)."""
    return dot(a, b) / (norm(a) * norm(b)).clamp_min(EPS)


def symlog(x: Tensor) -> Tensor:
    """``sign(x)·log(1 + |x|)``, elementwise."""
    return torch.sign(x) * torch.log1p(x.abs())


def mean_over_keys(values: Iterable[Tensor]) -> Tensor:
    """Mean of per-key tensors of one shape (e.g. ``[B]``) over the collection keys (layers)."""
    return torch.stack(list(values)).mean(0)


@dataclass(frozen=True)
class PreferenceGeometry:
    """Policy and reference states of one collection key and the SPEC vectors built from them.

    States are ``[B, d]``; the reference states must come in detached (`key_geometries` does that). Derived vectors are ``[B, d]``,
    scalars ``[B]``, each computed once.
    """

    pi_cho: Tensor
    pi_rej: Tensor
    ref_cho: Tensor
    ref_rej: Tensor

    @cached_property
    def ref_direction(self) -> Tensor:
        """r = h^ref_cho − h^ref_rej, the reference preference direction ``[B, d]`` (no grad)."""
        return self.ref_cho - self.ref_rej

    @cached_property
    def pi_separation(self) -> Tensor:
        """q = h^π_cho − h^π_rej ``[B, d]``."""
        return self.pi_cho - self.pi_rej

    @cached_property
    def unit_ref(self) -> Tensor:
        """û = r / (‖r‖ + EPS) ``[B, d]`` (no grad)."""
        return unit(self.ref_direction)

    @cached_property
    def signed_proj(self) -> Tensor:
        """s = ⟨q, û⟩ ``[B]``: the policy's chosen−rejected separation along the reference direction."""
        return dot(self.pi_separation, self.unit_ref)

    @cached_property
    def parallel(self) -> Tensor:
        """q_par = s·û ``[B, d]``."""
        return self.signed_proj.unsqueeze(-1) * self.unit_ref

    @cached_property
    def orthogonal(self) -> Tensor:
        """q_orth = q − q_par ``[B, d]``."""
        return self.pi_separation - self.parallel

    @cached_property
    def parallel_norm(self) -> Tensor:
        """P = ‖q_par‖ ``[B]``."""
        return norm(self.parallel)

    @cached_property
    def orthogonal_norm(self) -> Tensor:
        """O = ‖q_orth‖ ``[B]``."""
        return norm(self.orthogonal)


def key_geometries(batch: ReprBatch) -> list[PreferenceGeometry]:
    """One `PreferenceGeometry` per collection key of the batch (same order as ``batch.keys``)."""
    return [
        PreferenceGeometry(batch.pi_cho[k], batch.pi_rej[k], batch.ref_cho[k].detach(), batch.ref_rej[k].detach())
        for k in batch.keys
    ]
