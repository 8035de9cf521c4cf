"""GENIES pair building (SPEC §1.1) and its one-line errors, on hand-written fixtures."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from reprpo_pl.data.genies import read_genies_pairs
from reprpo_pl.errors import MissingDataError, UserError

FIXTURES = Path(__file__).parent / "fixtures" / "genies"


def _by_prompt(root: Path, seed: int = 0) -> dict[str, dict[str, str]]:
    return {row["prompt"]: row for row in read_genies_pairs(root, "toy", "train", seed=seed)}


def _write(root: Path, rows: object, name: str = "toy", split: str = "train") -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    path = root / name / f"{split}.json"
    path.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return path


def test_columns_and_ids():
    pairs = read_genies_pairs(FIXTURES, "toy", "train")
    assert pairs.column_names == ["id", "prompt", "chosen", "rejected"]
    assert pairs["id"] == ["toy/train/0", "toy/train/2", "toy/train/4"]


def test_chosen_is_highest_and_rejected_strictly_lower():
    pairs = _by_prompt(FIXTURES)
    assert pairs["P0 ### Response:\n"]["chosen"] == "best"
    assert pairs["P0 ### Response:\n"]["rejected"] in {"mid", "low", "lowest"}
    assert (pairs["P2 integer scores"]["chosen"], pairs["P2 integer scores"]["rejected"]) == ("good", "bad")
    assert (pairs["P4 tie at the top"]["chosen"], pairs["P4 tie at the top"]["rejected"]) == ("top1", "low")


def test_all_equal_and_empty_completion_rows_are_skipped_and_counted(caplog):
    with caplog.at_level(logging.INFO, logger="reprpo_pl.data.genies"):
        pairs = _by_prompt(FIXTURES)
    assert "P1 all equal" not in pairs and "P3 empty completion" not in pairs
    assert "skipped 1 of 5 rows whose scores are all equal" in caplog.text
    assert "skipped 1 of 5 rows with an empty completion" in caplog.text


def test_reproducible_and_seed_dependent():
    assert read_genies_pairs(FIXTURES, "toy", "train", seed=3)[:] == read_genies_pairs(FIXTURES, "toy", "train", seed=3)[:]
    rejected = {_by_prompt(FIXTURES, seed)["P0 ### Response:\n"]["rejected"] for seed in range(12)}
    assert len(rejected) > 1


def test_pair_does_not_depend_on_other_rows(tmp_path):
    rows = json.loads((FIXTURES / "toy" / "train.json").read_text())
    for seed in range(5):
        _write(tmp_path, rows[:1])
        alone = read_genies_pairs(tmp_path, "toy", "train", seed=seed)[0]
        assert alone == read_genies_pairs(FIXTURES, "toy", "train", seed=seed)[0]


def test_missing_root():
    with pytest.raises(UserError, match=r"data.root=/no/such/dir does not exist.*embedded subset"):
        read_genies_pairs("/no/such/dir", "toy", "train")


def test_unknown_distribution_suggests_close_names(tmp_path):
    shutil.copytree(FIXTURES / "toy", tmp_path / "toy_hard")
    shutil.copytree(FIXTURES / "toy", tmp_path / "toy")
    with pytest.raises(MissingDataError, match=re.escape(f"'tooy': {tmp_path / 'tooy' / 'train.json'} does not exist (did you mean toy, toy_hard")):
        read_genies_pairs(tmp_path, "tooy", "train")


def test_missing_split_file(tmp_path):
    _write(tmp_path, [], split="train")
    with pytest.raises(MissingDataError, match=r"no test split: .*toy/test.json does not exist"):
        read_genies_pairs(tmp_path, "toy", "test")


def test_bad_split_name():
    with pytest.raises(UserError, match=r"split='validation'"):
        read_genies_pairs(FIXTURES, "toy", "validation")


def test_malformed_json_names_file_and_position(tmp_path):
    path = _write(tmp_path, '[{"prompt": "p", "responses": {"a": 1.0,}}]')
    with pytest.raises(UserError, match=re.escape(f"malformed JSON in {path}: ") + r".*line 1 column \d+"):
        read_genies_pairs(tmp_path, "toy", "train")


def test_top_level_must_be_a_list(tmp_path):
    path = _write(tmp_path, {"prompt": "p"})
    with pytest.raises(UserError, match=re.escape(f"{path} must hold a JSON list")):
        read_genies_pairs(tmp_path, "toy", "train")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"responses": {"a": 1.0, "b": 0.0}}, "has no 'prompt'"),
        ({"prompt": "p"}, "has no 'responses'"),
        ({"prompt": "p", "responses": {"a": "high", "b": 0.0}}, "has a non-numeric score 'high'"),
        ({"prompt": "p", "responses": {"a": True, "b": 0.0}}, "has a non-numeric score True"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, row, message):
    path = _write(tmp_path, [{"prompt": "ok", "responses": {"a": 1.0, "b": 0.0}}, row])
    with pytest.raises(UserError, match=re.escape(f"{path} row 1 {message}")):
        read_genies_pairs(tmp_path, "toy", "train")
