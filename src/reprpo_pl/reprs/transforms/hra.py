"""``hra``: Householder reflection adaptation (SPEC §3.4), an orthogonal map ``z = xW``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprpo_pl.errors import UserError
from reprpo_pl.reprs.transforms import TransformTraits


class HRA(nn.Module):
    """``z = x W`` with ``W = Π_{i=1..r} (I − 2 û_i û_iᵀ)`` (``apply_GS=false``) or ``W = I − 2 Q Qᵀ``
    with ``Q`` ``[d, r]`` the Gram–Schmidt orthonormalisation of ``U`` (``apply_GS=true``);
    ``[B, T, d] -> [B, T, d]``. W is orthogonal, so ``‖z‖ = ‖x‖``.

    Trainable parameters: ``U`` ``[d, r]``, count ``d·r``.

    Init: ``U`` has distinct, orthonormal random columns [decided] (the prototype duplicated columns,
    which made Gram–Schmidt degenerate). With orthonormal columns the reflections commute and both
    forms equal ``I − 2UUᵀ`` at init, so W is a reflection of an r-dim subspace, not the identity.
    """

    traits = TransformTraits(commutes_with_mean=True, preserves_norm=True, learnable=True)  # z = xW, W orthogonal

    def __init__(self, dim: int, r: int = 8, apply_GS: bool = False) -> None:
        super().__init__()
        if not 1 <= r <= dim:
            raise UserError(f"transform.r={r} reflections need 1 ≤ r ≤ d={dim} for distinct orthonormal columns")
        self.apply_GS = apply_GS
        self.U = nn.Parameter(torch.linalg.qr(torch.randn(dim, r))[0])  # [d, r]

    def forward(self, x: Tensor) -> Tensor:
        if self.apply_GS:
            q = torch.linalg.qr(self.U)[0]  # [d, r]; same span and QQᵀ as Gram–Schmidt, stabler
            return x - 2 * (x @ q) @ q.T
        for u in F.normalize(self.U, dim=0).unbind(-1):  # z = x (I − 2û₁û₁ᵀ)(I − 2û₂û₂ᵀ)…: û₁ acts first
            x = x - 2 * (x @ u)[..., None] * u
        return x
