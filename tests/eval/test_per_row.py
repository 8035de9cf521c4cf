"""Per-row results (issue 12 item 3): one JSON line per pair with its identity and both models' summed
log-probs and token counts, written atomically to ``<run dir>/eval/<target>.jsonl``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from reprpo_pl.errors import NonFiniteError
from reprpo_pl.eval.results import per_row_records, write_per_row
from reprpo_pl.eval.scorer import RowScores


def scores(offset: float) -> RowScores:
    return RowScores(torch.tensor([-3.0, -5.0]) + offset, torch.tensor([-4.0, -4.5]) + offset,
                     torch.tensor([2.0, 3.0]), torch.tensor([2.0, 4.0]))


def test_records_carry_identity_and_both_models():
    records = per_row_records(["ethics/justice/test/17", "math/train/3"], scores(0.0), scores(-1.0))
    assert records[0] == {"distribution": "ethics/justice", "split": "test", "index": 17,
                          "base_logp_chosen": -3.0, "base_logp_rejected": -4.0, "base_n_chosen": 2, "base_n_rejected": 2,
                          "adapter_logp_chosen": -4.0, "adapter_logp_rejected": -5.0, "adapter_n_chosen": 2,
                          "adapter_n_rejected": 2}
    assert (records[1]["distribution"], records[1]["split"], records[1]["index"]) == ("math", "train", 3)
    assert records[1]["adapter_n_rejected"] == 4 and isinstance(records[1]["adapter_n_rejected"], int)


def test_write_per_row_one_file_per_target(tmp_path):
    records = per_row_records(["ethics/justice/test/17", "ethics/justice/test/20"], scores(0.0), scores(0.5))
    write_per_row(tmp_path, {"ethics/justice": records, "math@train": records[:1]})
    lines = (tmp_path / "eval" / "ethics" / "justice.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert len((tmp_path / "eval" / "math@train.jsonl").read_text().splitlines()) == 1
    assert not list(tmp_path.rglob("*.tmp"))  # written through a temporary file, renamed into place


def test_write_per_row_refuses_non_finite(tmp_path):
    bad = scores(0.0)
    bad.logp_cho[0] = -math.inf
    with pytest.raises(NonFiniteError, match="per-row scores of math hold non-finite numbers"):
        write_per_row(tmp_path, {"math": per_row_records(["math/test/0", "math/test/1"], bad, scores(0.0))})
    assert not (tmp_path / "eval" / "math.jsonl").exists()
