"""Per-pair scores of one target gathered across ranks: a torchmetrics `Metric` whose ``cat`` states hold each
scored row's index in the eval set with its base and adapter scores, so under DDP every rank scores a shard and
`compute` returns every row, in the eval set's order, on every rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from reprpo_pl.eval.scorer import RowScores


class PairScores(Metric):
    """Collects ``(index, base, adapter)`` per scored pair of an eval set of ``n_rows`` pairs.

    `update` takes a shard's rows in any order (an empty shard too: every rank must take part in the sync);
    `compute` syncs across ranks (torchmetrics' ``dist_reduce_fx="cat"``, when ``sync_on_compute``), sorts the rows
    by index and checks that each of ``0..n_rows-1`` came exactly once, so the per-target metrics and the per-pair
    records equal a single-process run's."""

    full_state_update = False
    index: list[Tensor]
    base: list[Tensor]
    adapter: list[Tensor]

    def __init__(self, n_rows: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.n_rows = n_rows
        self.add_state("index", default=[], dist_reduce_fx="cat")  # [n] long: the row's position in the eval set
        self.add_state("base", default=[], dist_reduce_fx="cat")  # [n, 4]: logp_cho, logp_rej, n_cho, n_rej
        self.add_state("adapter", default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, base: RowScores, adapter: RowScores) -> None:
        """``index``: ``[n]`` positions in the eval set of the rows that ``base`` and ``adapter`` (``[n]`` each) score."""
        self.index.append(index.to(self.device, torch.long))
        self.base.append(base.stack().to(self.device))
        self.adapter.append(adapter.stack().to(self.device))

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(base, adapter)``, ``[n_rows, 4]`` each (`RowScores.stack`'s columns; `rows` makes them RowScores) in
        index order, on the CPU; `RuntimeError` if a row is missing or came twice (a shard plan that does not
        partition the eval set). Tensors, not RowScores: torchmetrics squeezes every one-element tensor that
        `compute` returns, dataclass fields included."""
        index = _cat(self.index).cpu()
        order = torch.argsort(index)
        if not torch.equal(index[order], torch.arange(self.n_rows)):
            raise RuntimeError(f"gathered {index.numel()} scored rows that are not each of the {self.n_rows} rows once")
        return _cat(self.base).cpu()[order], _cat(self.adapter).cpu()[order]

    def rows(self) -> tuple[RowScores, RowScores]:
        """`compute` as ``(base, adapter)`` RowScores, ``[n_rows]`` each."""
        base, adapter = self.compute()
        return RowScores.from_stacked(base), RowScores.from_stacked(adapter)


def _cat(state: Tensor | list[Tensor]) -> Tensor:
    """A ``cat`` state: after a sync torchmetrics leaves one tensor, without one a list of the updates' tensors."""
    return torch.cat(state) if isinstance(state, list) else state

