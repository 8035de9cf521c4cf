"""``svd``: remove the part of a state that the (un)embedding reads or writes (SPEC §3.4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reprpo_pl.errors import UserError
from reprpo_pl.reprs.transforms import (
    ReprTransform,
    TransformTraits,
    embedding,
    gram,
    unembedding,
)


class SVDRemoval(ReprTransform):
    """``z = h − P h`` for every key, ``[B, T, d] -> [B, T, d]``, with ``P = V diag(g) Vᵀ`` ``[d, d]``.

    ``W`` ``[V, d]`` is the unembedding (``dual_svd``: the unembedding and the input embedding, each
    scaled to unit Frobenius norm, stacked to ``[2V, d]``); ``W = U diag(s) Vᵀ``, ``s`` ``[d]``.
    The threshold ``τ`` is the ``quantile``-quantile of ``s`` and the gains ``g`` ``[d]`` are

    - ``soft=true`` (default): ``g_i = max(s_i − τ, 0) / s_i``, i.e. ``P = W⁺ S_τ(W)`` with ``S_τ``
      the soft-thresholding of the singular values: directions below τ are left in z entirely,
      directions above τ are removed in proportion ``1 − τ/s_i``;
    - ``soft=false``: ``g_i = 1[s_i ≥ τ]``, the hard projection onto the top singular directions.

    ``soft=false, quantile=0`` keeps all d directions of the square basis V: P = I and z = 0, so it
    is refused. V and s come from the eigendecomposition of ``WᵀW`` (no ``[V, d]`` SVD).

    Parameters: none. ``P`` is a non-persistent buffer (rebuilt from the model, not saved); all keys
    must have the model width d (in side mode, only d-wide modules such as ``o_proj`` inputs);
    ``collection_mode`` is part of the builder's signature and not needed here.
    """

    traits = TransformTraits(commutes_with_mean=True, preserves_norm=False)  # z = h − hP

    def __init__(
        self,
        keys: list[str],
        dims: dict[str, int],
        model: nn.Module,
        collection_mode: str,
        quantile: float = 0.3,
        soft: bool = True,
        dual_svd: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= quantile <= 1:
            raise UserError(f"transform.quantile={quantile} must lie in [0, 1]")
        weight = unembedding(model)
        if dual_svd:
            input_weight = embedding(model)
            weight = torch.cat([weight / weight.norm(), input_weight / input_weight.norm()])
        d = weight.shape[1]
        if wrong := {key: dims[key] for key in keys if dims[key] != d}:
            raise UserError(
                f"transform=svd projects states of the model width d={d}, but keys {wrong} (width) differ: "
                "use collection.mode=hs or collect d-wide modules only"
            )
        eigenvalues, right_vectors = torch.linalg.eigh(gram(weight))  # s² [d] ascending, V [d, d]
        singular_values = eigenvalues.clamp(min=0).sqrt()
        tau = torch.quantile(singular_values, quantile)
        if soft:
            gains = (singular_values - tau).clamp(min=0) / singular_values.clamp(min=torch.finfo(torch.float64).tiny)
        else:
            gains = (singular_values >= tau).double()
        if bool((gains == 1).all()):
            raise UserError(
                f"transform=svd with soft=false and quantile={quantile} projects onto all d={d} singular directions "
                "(a full-rank square basis): P = I and z = h − P(h) = 0; use transform.soft=true or a quantile > 0"
            )
        self.register_buffer("projection", ((right_vectors * gains) @ right_vectors.T).float(), persistent=False)

    def forward(self, hs: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        return {key: h - h @ self.projection.to(h.dtype) for key, h in hs.items()}
