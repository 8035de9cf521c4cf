"""Distributed evaluation's pieces (issue 12 item 8) in one process: the shard plan deals the single-process
batches to the ranks, and `PairScores` puts the rows of shards updated in any order back in the eval set's
order and refuses an incomplete set (the DDP run itself is tests/test_ddp.py)."""

from __future__ import annotations

import pytest
import torch

from reprpo_pl.eval.pair_scores import PairScores, shard_batches
from reprpo_pl.eval.scorer import RowScores


def scores_of(index: list[int], offset: float = 0.0) -> RowScores:
    """Distinct scores per row: logp_cho = -row - offset, logp_rej = -2·row, counts row + 1 and row + 2."""
    rows = torch.tensor(index, dtype=torch.float32)
    return RowScores(-rows - offset, -2 * rows, rows + 1, rows + 2)


def test_shards_are_the_single_process_batches_dealt_round_robin():
    assert shard_batches(7, 2, 0, 1) == [[0, 1], [2, 3], [4, 5], [6]]
    assert shard_batches(7, 2, 0, 2) == [[0, 1], [4, 5]]
    assert shard_batches(7, 2, 1, 2) == [[2, 3], [6]]
    assert shard_batches(2, 2, 1, 2) == []  # fewer batches than ranks: this rank scores nothing


def test_rows_come_back_in_eval_set_order_whatever_the_shard_order():
    metric = PairScores(7)
    for rank in (1, 0):  # rank 1's rows first, as a gather may deliver them
        index = [i for batch in shard_batches(7, 2, rank, 2) for i in batch]
        metric.update(torch.tensor(index), scores_of(index), scores_of(index, offset=0.5))
    metric.update(torch.tensor([], dtype=torch.long), scores_of([]), scores_of([]))  # an empty shard adds nothing
    base, adapter = metric.rows()
    expected = list(range(7))
    assert torch.equal(base.stack(), scores_of(expected).stack())
    assert torch.equal(adapter.stack(), scores_of(expected, offset=0.5).stack())


def test_a_single_row_keeps_its_shape():
    """torchmetrics squeezes one-element tensors that `compute` returns: a one-pair target must still give ``[1]``."""
    metric = PairScores(1)
    metric.update(torch.tensor([0]), scores_of([0]), scores_of([0]))
    base, adapter = metric.rows()
    assert base.n_cho.shape == adapter.logp_cho.shape == (1,)


@pytest.mark.parametrize("index", [[0, 1, 2], [0, 1, 2, 3, 3]], ids=["missing", "twice"])
def test_an_incomplete_or_repeated_row_set_is_refused(index):
    metric = PairScores(4)
    metric.update(torch.tensor(index), scores_of(index), scores_of(index))
    with pytest.raises(RuntimeError, match="not each of the 4 rows once"):
        metric.compute()
