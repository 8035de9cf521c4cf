"""Representation losses (SPEC §3.4): one class per file, built by Hydra from ``conf/loss/<name>.yaml``.

A loss class has no defaults for its hyper-parameters: its yaml is the one place that sets them.
A new loss is its file here, its yaml and its test (tests/reprs/test_losses.py finds every yaml).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol

from torch import Tensor

from reprpo_pl.reprs.pooling import PoolingKind
from reprpo_pl.reprs.types import ReprBatch

LogprobTerm = Literal["none", "smooth", "hinge"]  # see ReprLoss.logprob_term


class ReprLoss(Protocol):
    """What the ReprPO module needs from a loss."""

    pooling: ClassVar[PoolingKind]  # how the module must pool hidden states for this loss
    needs_token_deviation: bool  # True when the loss reads batch.token_dev_*
    needs_token_logps: bool  # True when the loss reads batch.pi_token_logp_cho / ref_token_logp_cho (no ref cache then)
    # its log-prob term: "none" (only hidden states move it: the adapter after the last collected layer gets no
    # gradient), "smooth" (a DPO term, with gradient at init) or "hinge" (relu terms: no gradient at ρ = 0)
    logprob_term: LogprobTerm

    def __call__(self, batch: ReprBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss and diagnostics: scalars, e.g. ``hidden/theta`` (detached) and the loss terms ``loss/out``,
        ``loss/in`` (with their graph, so the module can measure each term's gradient norm)."""
        ...
