"""Distributed evaluation's pieces (issue 12 item 8) in one process: `eval_batches` orders a target's rows by
length and deals the single-process batches to the ranks, and `PairScores` puts the rows of shards updated in any order back in the eval set's
order and refuses an incomplete set (the DDP run itself is tests/test_ddp.py)."""

from __future__ import annotations

import pytest
import torch

from datasets import Dataset

from reprpo_pl.data.datamodule import eval_batches
from reprpo_pl.eval.pair_scores import PairScores
from reprpo_pl.eval.scorer import RowScores


def scores_of(index: list[int], offset: float = 0.0) -> RowScores:
    """Distinct scores per row: logp_cho = -row - offset, logp_rej = -2·row, counts row + 1 and row + 2."""
    rows = torch.tensor(index, dtype=torch.float32)
    return RowScores(-rows - offset, -2 * rows, rows + 1, rows + 2)


def pairs_of(lengths: list[tuple[int, int, int]]) -> Dataset:
    """Tokenised pairs with (prompt, chosen, rejected) lengths ``lengths`` (token ids are the row's position)."""
    return Dataset.from_dict({f"{role}_ids": [[i] * n[k] for i, n in enumerate(lengths)]
                              for k, role in enumerate(("prompt", "chosen", "rejected"))})


def padded_tokens(pairs: Dataset, batches: list[list[int]]) -> int:
    """Tokens of the packed batches ``[B, P + 2C]``: B rows padded to the batch's longest prompt and completion."""
    total = 0
    for batch in batches:
        rows = pairs.select(batch)
        prompt = max(map(len, rows["prompt_ids"]))
        completion = max(max(map(len, rows["chosen_ids"])), max(map(len, rows["rejected_ids"])))
        total += len(batch) * (prompt + 2 * completion)
    return total


def test_eval_batches_go_by_completion_then_prompt_length_and_deal_round_robin():
    # row: (prompt, chosen, rejected) lengths
    pairs = pairs_of([(5, 9, 2), (3, 1, 2), (8, 2, 1), (1, 4, 4), (2, 2, 1), (9, 1, 1), (4, 2, 2)])
    # (longer completion, prompt) per row: (9,5) (2,3) (2,8) (4,1) (2,2) (1,9) (2,4) → rows 5, 4, 1, 6, 2, 3, 0
    assert eval_batches(pairs, 2) == [[5, 4], [1, 6], [2, 3], [0]]
    assert eval_batches(pairs, 2, rank=0, world_size=2) == [[5, 4], [2, 3]]
    assert eval_batches(pairs, 2, rank=1, world_size=2) == [[1, 6], [0]]
    assert eval_batches(pairs_of([(1, 1, 1)] * 2), 2, rank=1, world_size=2) == []  # fewer batches than ranks
    assert eval_batches(pairs_of([(1, 1, 1)] * 3), 2) == [[0, 1], [2]]  # ties keep eval-set order
    every_row = sorted(i for rank in range(3) for batch in eval_batches(pairs, 2, rank, 3) for i in batch)
    assert every_row == list(range(7))


def test_eval_batches_pad_less_than_eval_set_order():
    """Long and short completions alternate (as in a shuffled target): in eval-set order every batch pads to a
    long one; in length order only one batch does."""
    pairs = pairs_of([(10, 100 if i % 2 else 5, 5) for i in range(16)])
    in_order = [list(range(start, start + 4)) for start in range(0, 16, 4)]
    assert padded_tokens(pairs, eval_batches(pairs, 4)) < 0.6 * padded_tokens(pairs, in_order)


def test_rows_come_back_in_eval_set_order_whatever_the_shard_order():
    metric = PairScores(7)
    for index in ([5, 1, 2, 3], [4, 6, 0]):  # rank 1's rows first, as a gather may deliver them
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
