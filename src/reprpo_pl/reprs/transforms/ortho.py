"""``ortho``: a learnable orthogonal ``d×d`` map via torch's orthogonal parametrisation (SPEC §3.4)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from reprpo_pl.errors import UserError
from reprpo_pl.reprs.transforms import TransformTraits

ORTHOGONAL_MAPS = ("householder", "cayley", "matrix_exp")


class Ortho(nn.Module):
    """``z = x Wᵀ`` with W ``[d, d]`` orthogonal, ``[B, T, d] -> [B, T, d]``; ``‖z‖ = ‖x‖``.

    ``nn.Linear(d, d, bias=False)``: no bias, which would break ``‖z‖ = ‖x‖``.
    Trainable parameters: the parametrisation's unconstrained ``[d, d]`` matrix, count ``d²``, of
    which torch reads only the ``d(d−1)/2`` strictly-lower entries (the others get zero gradient).
    The state_dict also holds torch's ``[d, d]`` base buffer (``W = base · map(original)``).
    Init: torch's (the orthogonalised default ``nn.Linear`` init), a random orthogonal W.

    Default ``matrix_exp`` (torch's default for square matrices): ``householder`` keeps column signs
    on the diagonal of the unconstrained matrix and reads them with ``.int()``, so any weight decay
    (1.0 → 0.99 → 0) zeroes W's columns after one AdamW step.
    """

    traits = TransformTraits(commutes_with_mean=True, preserves_norm=True, learnable=True)  # z = xWᵀ, W orthogonal

    def __init__(self, dim: int, orthogonal_map: str = "matrix_exp") -> None:
        super().__init__()
        if orthogonal_map not in ORTHOGONAL_MAPS:
            raise UserError(f"transform.orthogonal_map={orthogonal_map!r} is unknown: use one of {', '.join(ORTHOGONAL_MAPS)}")
        self.dim, self.orthogonal_map = dim, orthogonal_map
        self.linear = orthogonal(nn.Linear(dim, dim, bias=False), orthogonal_map=orthogonal_map)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def __reduce__(self) -> tuple:
        """Pickle through the state_dict: torch refuses to pickle parametrised modules directly."""
        return _rebuild, (self.dim, self.orthogonal_map, self.state_dict(), self.training)


def _rebuild(dim: int, orthogonal_map: str, state_dict: dict[str, Tensor], training: bool) -> Ortho:
    """Inverse of `Ortho.__reduce__`."""
    module = Ortho(dim, orthogonal_map).to(next(iter(state_dict.values())).device)
    module.load_state_dict(state_dict)
    return module.train(training)
