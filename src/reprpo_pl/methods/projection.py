"""Gradient projection onto a hidden preference direction: the maths shared by ProjGrad (SPEC §3.2)
and ProjBP (§3.3). Pure functions of tensors; the modules in projgrad.py/projbp.py supply them.

Conventions: ``h`` is the output width of one adapter-wrapped module; a direction ``p`` lives in that
output space. A tensor to project carries ``h`` on its LAST axis and one direction per index of its
FIRST axis (``N``): ``x [N, ..., h]`` with ``u [N, h]``.

"Keep the parallel part where it is positive" acts on the scalar coefficient ``⟨x, u⟩``, not on the
coordinates of the vector ``⟨x, u⟩u`` [decided]: the prototype applied ``leaky_relu`` to the vector's
coordinates, which depends on the signs of the basis rather than on whether ``x`` agrees with ``u``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reprpo_pl.reprs.pooling import masked_mean

EPS = 1e-12


def pair_output_difference(output: Tensor, completion_mask: Tensor) -> Tensor:
    """``a_c − a_r`` ``[B, h]`` fp32 from a module's output on a `concat_pairs` batch.

    output: ``[2B, P+C, h]`` (rows 0..B-1 chosen, B..2B-1 rejected); completion_mask: ``[2B, C]``.
    ``a = mmean_t`` of the output over each row's completion tokens (the last C positions)."""
    if output.shape[0] != completion_mask.shape[0]:
        raise ValueError(f"expected the concat layout's 2B={completion_mask.shape[0]} rows, got {output.shape[0]} (packed pairs?)")
    pooled = masked_mean(output[:, -completion_mask.shape[1] :], completion_mask)  # [2B, h]
    chosen, rejected = pooled.chunk(2)
    return chosen - rejected


def preference_direction(differences: Tensor, per_sample: bool = False, reverse_pref: bool = False) -> Tensor:
    """The preference direction ``p`` from per-pair differences ``a_c − a_r`` ``[N, h]``.

    Returns ``[1, h]`` = the mean over ALL N pairs (the prototype used pair 0 only), or, with
    ``per_sample``, ``[N, h]`` = one direction per pair. ``reverse_pref`` negates it."""
    p = differences if per_sample else differences.mean(0, keepdim=True)
    return -p if reverse_pref else p


def pair_row_directions(differences: Tensor, reverse_pref: bool = False) -> Tensor:
    """Per-row directions ``[2B, h]`` for the rows of a `concat_pairs` forward, from ``p_b = a_c,b − a_r,b`` ``[B, h]``.

    Rejected row B+b gets ``+p_b`` and chosen row b gets ``−p_b`` [decided]: a projected gradient keeps
    its component with positive coefficient, and a descent step moves the output against the gradient,
    so the kept part moves chosen outputs towards ``+p_b`` and rejected outputs towards ``−p_b``: the
    pair separates along its reference direction. ``reverse_pref`` negates both halves."""
    rows = torch.cat([-differences, differences])
    return -rows if reverse_pref else rows


def unit(p: Tensor) -> Tensor:
    """``p/‖p‖`` along the last axis; a zero vector stays zero (no NaN)."""
    return p / torch.linalg.vector_norm(p, dim=-1, keepdim=True).clamp_min(EPS)


def _per_leading(u: Tensor, x: Tensor) -> Tensor:
    """Reshape per-leading-index vectors ``[N, h]`` to broadcast against ``x [N, ..., h]``."""
    return u.reshape(u.shape[0], *([1] * (x.dim() - 2)), u.shape[-1])


def _norm(x: Tensor) -> Tensor:
    """Frobenius norm of each leading slice: ``x [N, ...]`` → ``[N, 1, ..., 1]``."""
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


def split_parallel(x: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``x [N, ..., h]`` along unit directions ``u [N, h]`` (last axis).

    Returns ``coefficient [N, ..., 1] = ⟨x, u⟩``, ``parallel = coefficient·u`` and
    ``orthogonal = x − parallel`` (both ``[N, ..., h]``, ``⟨orthogonal, u⟩ = 0``)."""
    u = _per_leading(u, x)
    coefficient = (x * u).sum(-1, keepdim=True)
    parallel = coefficient * u
    return coefficient, parallel, x - parallel


def project_onto_direction(
    x: Tensor, u: Tensor, beta: float, neg_slope: float = 0.0, scale_orth: bool = False
) -> Tensor:
    """``leaky_relu(⟨x, u⟩, neg_slope)·u + β·x_orth / scale`` for ``x [N, ..., h]``, ``u [N, h]`` unit.

    ``scale = ‖x_orth‖/‖x_par‖`` (Frobenius norms of each leading slice) with ``scale_orth``, else 1.
    ``neg_slope=0`` drops the anti-aligned part; ``β=1, neg_slope=1`` returns x; ``u=0`` gives ``β·x``."""
    coefficient, parallel, orthogonal = split_parallel(x, u)
    if scale_orth:
        orthogonal = orthogonal * (_norm(parallel) / _norm(orthogonal).clamp_min(EPS))
    return F.leaky_relu(coefficient, neg_slope) * _per_leading(u, x) + beta * orthogonal


def clip_magnitude(x: Tensor, size: Tensor, limit: Tensor) -> Tensor:
    """``x / max(1, size/limit)``, i.e. ``x·min(1, limit/size)``; size, limit ``[N]`` for ``x [N, ...]``.
    ``limit=0`` zeroes x, ``size=0`` leaves it (never NaN)."""
    factor = (limit / size.clamp_min(EPS)).clamp(max=1.0)
    return x * factor.reshape(-1, *([1] * (x.dim() - 1)))


def project_weight_gradient(
    grad: Tensor,
    p: Tensor,
    beta: float,
    neg_slope: float = 0.0,
    scale_orth: bool = False,
    mag_clip: float | None = None,
) -> Tensor:
    """ProjGrad (SPEC §3.2) for one gradient with its output axis last, ``grad [..., h]`` (e.g. lora_B's
    gradient transposed, ``[r, h]``), and directions ``p [N, h]`` from `preference_direction`.

    Each direction gives ``project_onto_direction(grad, unit(p_n))``; the result is their mean over n
    (N=1 for the batch-mean direction). ``mag_clip`` c first scales grad by ``min(1, c‖p_n‖/‖grad‖)``
    (the prototype's clip; its scale depends on the units of gradient and activation)."""
    x = grad.float().unsqueeze(0).expand(p.shape[0], *grad.shape)
    if mag_clip is not None:
        x = clip_magnitude(x, torch.linalg.vector_norm(grad.float()).expand(p.shape[0]), mag_clip * p.norm(dim=-1))
    return project_onto_direction(x, unit(p), beta, neg_slope, scale_orth).mean(0).to(grad.dtype)


def project_output_gradient(
    grad: Tensor,
    p: Tensor,
    token_mask: Tensor,
    beta: float,
    neg_slope: float = 0.01,
    mag_clip: float | None = 0.6,
) -> Tensor:
    """ProjBP (SPEC §3.3) for ``grad = ∂loss/∂output`` ``[N, T, h]`` with one direction per row ``p [N, h]``.

    1. ``mag_clip`` c: ``g_n ← g_n / max(1, ‖mmean_t g_n‖/(c‖p_n‖))``, the token mean over real tokens
       (``token_mask [N, T]``) so that padding does not dilute it;
    2. ``g' = leaky_relu(⟨g, u⟩, neg_slope)·u + β·g_orth`` per token, ``u = unit(p)``;
    3. rescale each row's ``g'`` to the Frobenius norm of its (clipped) ``g`` (so the whole tensor keeps
       its norm too). Returns ``[N, T, h]`` in grad's dtype."""
    g = grad.float()
    if mag_clip is not None:
        g = clip_magnitude(g, masked_mean(g, token_mask).norm(dim=-1), mag_clip * p.norm(dim=-1))
    projected = project_onto_direction(g, unit(p), beta, neg_slope)
    projected = projected * (_norm(g) / _norm(projected).clamp_min(EPS))
    return projected.to(grad.dtype)
