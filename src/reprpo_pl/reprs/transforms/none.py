"""``none``: the identity (SPEC §3.4)."""

from __future__ import annotations

from torch import Tensor, nn

from reprpo_pl.reprs.transforms import TransformTraits


class NoTransform(nn.Module):
    """``z = h``, ``[B, T, d] -> [B, T, d]``. Parameters: 0."""

    traits = TransformTraits(commutes_with_mean=True, preserves_norm=True)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, h: Tensor) -> Tensor:
        return h
