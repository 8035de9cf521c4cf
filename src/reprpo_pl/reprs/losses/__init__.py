"""Representation losses (SPEC §3.4): one class per file, built by Hydra from ``conf/loss/<name>.yaml``."""

from __future__ import annotations

from typing import ClassVar, Protocol

from torch import Tensor

from reprpo_pl.reprs.pooling import PoolingKind
from reprpo_pl.reprs.types import ReprBatch


class ReprLoss(Protocol):
    """What the ReprPO module needs from a loss."""

    pooling: ClassVar[PoolingKind]  # how the module must pool hidden states for this loss
    needs_token_deviation: bool  # True when the loss reads batch.token_dev_*

    def __call__(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss and diagnostics (detached scalars, e.g. ``loss/out``, ``hidden/theta``)."""
        ...
