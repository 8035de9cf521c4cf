"""``ether``: a learnable block-diagonal reflection inside a low-rank map (SPEC §3.4).

Row-vector shapes for one key (d = width, nb blocks of n = d/nb, f = ⌊d/reduction⌋)::

    x [B,T,d] --blockdiag(H) [d,d]--> [B,T,d] --W0 [f,d], frozen--> [B,T,f]
              --(etherplusHH only: blockdiag(H') [f,f])--> [B,T,f] --W_up [d,f]--> z [B,T,d]

i.e. ``z = W_up (H') W0 blockdiag(H) x`` in the SPEC's column-vector form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprpo_pl.errors import UserError
from reprpo_pl.reprs.transforms import TransformTraits, key_seed

HTYPES = ("ether", "etherplus", "oft", "etherplusHH")


class BlockDiagonal(nn.Module):
    """``blockdiag(H_1, …, H_nb)`` acting on the last axis (size ``nb·n``) of ``[..., nb·n]``.

    Block parametrisations (each ``H_b`` is ``[n, n]``):

    - ``ether``: ``H_b = I − 2 r_b r_bᵀ/‖r_b‖²``, ``r`` ``[nb, n]`` ~ N(0, 1): a reflection.
    - ``etherplus``: ``H_b = I − r1_b r1_bᵀ/‖r1_b‖² + r2_b r2_bᵀ/‖r2_b‖²``, ``r1, r2`` ``[nb, n]``,
      ``r1`` ~ N(0, 1), ``r2 = −r1`` so ``H = I`` at init.
    - ``oft``: Cayley ``H_b = (I + S_b)(I − S_b)⁻¹``, ``S = ½(R − Rᵀ)``, ``R`` ``[nb, n, n]`` = 0 so
      ``H = I`` at init.
    """

    def __init__(self, size: int, nb: int, htype: str, generator: torch.Generator) -> None:
        super().__init__()
        self.nb, self.n, self.htype = nb, size // nb, htype
        if htype == "ether":
            self.r = nn.Parameter(torch.randn(nb, self.n, generator=generator))
        elif htype == "etherplus":
            r1 = torch.randn(nb, self.n, generator=generator)
            self.r1, self.r2 = nn.Parameter(r1), nn.Parameter(-r1)
        else:  # "oft"
            self.R = nn.Parameter(torch.zeros(nb, self.n, self.n))

    def blocks(self) -> Tensor:
        """The blocks ``H`` ``[nb, n, n]``."""
        param = next(self.parameters())
        eye = torch.eye(self.n, dtype=param.dtype, device=param.device)
        if self.htype == "ether":
            u = F.normalize(self.r, dim=-1)
            return eye - 2 * u[:, :, None] * u[:, None, :]
        if self.htype == "etherplus":
            u1, u2 = F.normalize(self.r1, dim=-1), F.normalize(self.r2, dim=-1)
            return eye - u1[:, :, None] * u1[:, None, :] + u2[:, :, None] * u2[:, None, :]
        skew = (self.R - self.R.transpose(-1, -2)) / 2
        return torch.linalg.solve(eye - skew, eye + skew)  # (I−S)⁻¹(I+S) = (I+S)(I−S)⁻¹: they commute

    def forward(self, x: Tensor) -> Tensor:
        """``[..., nb·n] -> [..., nb·n]``: block b maps ``x_b`` to ``H_b x_b``."""
        y = torch.einsum("...bj,bij->...bi", x.unflatten(-1, (self.nb, self.n)), self.blocks())
        return y.flatten(-2)


class ETHER(nn.Module):
    """``z = W_up (H') W0 blockdiag(H) x``: ``[B, T, d] -> [B, T, d]`` (shapes in the module docstring).

    ``Htype`` picks the blocks (see `BlockDiagonal`); ``etherplusHH`` puts etherplus blocks on both
    sides of ``W0`` (``H`` on d, ``H'`` on f, both with ``nb`` blocks).

    Trainable parameters (f = ⌊d/reduction⌋):

    - ``ether``: ``d + d·f``
    - ``etherplus``: ``2d + d·f``
    - ``oft``: ``d²/nb + d·f``
    - ``etherplusHH``: ``2d + 2f + d·f``

    Init (all draws from a generator seeded with ``key_seed(seed, key)``, so two keys of one width get
    different W0, reproducibly from ``seed``; the prototype seeded every key alike): ``W0`` (a persistent
    buffer, saved in checkpoints and the adapter folder) has orthonormal rows (QR of a Gaussian); ``W_up = W0ᵀ``, so with identity blocks (etherplus, oft) z is the
    orthogonal projection ``W0ᵀW0 x`` onto a random f-dim subspace. ``W_up`` must not start at 0:
    the gradient of every block parameter is proportional to ``W_up``.
    """

    traits = TransformTraits(commutes_with_mean=True, preserves_norm=False, learnable=True)  # z = W_up H' W0 blockdiag(H) x: linear, not orthogonal

    def __init__(self, dim: int, Htype: str = "ether", nb: int = 2, reduction: int = 60, seed: int = 0,
                 key: str = "") -> None:
        super().__init__()
        if Htype not in HTYPES:
            raise UserError(f"transform.Htype={Htype!r} is unknown: use one of {', '.join(HTYPES)}")
        f = dim // reduction
        if f < 1:
            raise UserError(f"transform.reduction={reduction} leaves f = ⌊{dim}/{reduction}⌋ = 0 dimensions: use reduction ≤ {dim}")
        if dim % nb:
            raise UserError(f"transform.nb={nb} blocks must divide the state width d={dim}")
        if Htype == "etherplusHH" and f % nb:
            raise UserError(
                f"transform.Htype=etherplusHH needs transform.nb={nb} to divide f = ⌊d/reduction⌋ = ⌊{dim}/{reduction}⌋ "
                f"= {f}: pick nb dividing {f} or a smaller reduction"
            )
        generator = torch.Generator().manual_seed(key_seed(seed, key))  # key: the collection key (`build_transform`)
        q, _ = torch.linalg.qr(torch.randn(dim, f, generator=generator))  # [d, f], orthonormal columns
        self.register_buffer("W0", q.T.contiguous())  # [f, d]
        block_type = "etherplus" if Htype == "etherplusHH" else Htype
        self.H = BlockDiagonal(dim, nb, block_type, generator)
        self.H_f = BlockDiagonal(f, nb, block_type, generator) if Htype == "etherplusHH" else nn.Identity()
        self.W_up = nn.Parameter(q.clone())  # [d, f]

    def forward(self, h: Tensor) -> Tensor:
        return self.H_f(self.H(h) @ self.W0.T) @ self.W_up.T
