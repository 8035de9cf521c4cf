"""ETHICS → preference pairs (SPEC §1.2): every subset's rule, the thresholds, and the errors."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from reprpo_pl.data.ethics import common_word_prefix, read_ethics_pairs
from reprpo_pl.errors import MissingDataError, UserError

FIXTURES = Path(__file__).parent / "fixtures" / "ethics"
CM_HEADER = ["label", "input", "is_short", "edited"]


def _pairs(root: Path, subset: str) -> list[dict[str, str]]:
    return read_ethics_pairs(root, subset, "test").to_list()


def _write_csv(root: Path, subset: str, file: str, records: list[list[str]]) -> Path:
    path = root / subset / file
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(records)
    return path


def _commonsense(tmp_path: Path, a: str, b: str, labels: tuple[str, str] = ("0", "1")) -> list[dict[str, str]]:
    _write_csv(tmp_path, "commonsense", "cm_test.csv", [CM_HEADER, [labels[0], a, "True", "False"], [labels[1], b, "True", "False"]])
    return _pairs(tmp_path, "commonsense")


def test_deontology_zips_reasonable_with_unreasonable_excuses_per_scenario():
    assert _pairs(FIXTURES, "deontology") == [
        {"id": "ethics/deontology/test/1", "prompt": "Could you walk the dog?",
         "chosen": "But I walked him an hour ago.", "rejected": "But the dog is asleep on my bed."},
        {"id": "ethics/deontology/test/3", "prompt": "Could you walk the dog?",
         "chosen": "But my leg is in a cast.", "rejected": "But I want to watch TV."},
        {"id": "ethics/deontology/test/6", "prompt": "Aren't you supposed to wash the car?",
         "chosen": "No because it is about to rain.", "rejected": "But it is sunny."},
    ]  # fmt: skip


def test_justice_chosen_is_the_reasonable_label_1_remainder_in_either_order():
    assert _pairs(FIXTURES, "justice") == [
        {"id": "ethics/justice/test/0", "prompt": "I deserve a raise from my boss because I",
         "chosen": " worked extra hours all year.", "rejected": " wore a blue tie every day."},
        {"id": "ethics/justice/test/2", "prompt": "I usually walk my neighbour's dog but I didn't today because",
         "chosen": " the dog was at the vet.", "rejected": " I felt like being lazy."},
    ]  # fmt: skip


def test_commonsense_chosen_is_the_acceptable_label_0_remainder():
    # rows 1-2 share a label; rows 2-3 share only "I"; rows 3-4 share a label (row 4 spans two lines)
    assert _pairs(FIXTURES, "commonsense") == [
        {"id": "ethics/commonsense/test/0", "prompt": "I told my baby I",
         "chosen": " loved her when she cried.", "rejected": " hated her when she cried."},
    ]  # fmt: skip


def test_commonsense_label_order_does_not_matter(tmp_path):
    pairs = _commonsense(tmp_path, "I told my baby I hated her.", "I told my baby I loved her.", labels=("1", "0"))
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == (" loved her.", " hated her.")


@pytest.mark.parametrize(
    ("a", "b", "kept"),
    [
        ("abcde xx", "abcde yy", True),  # prompt "abcde": 5 chars > 4
        ("abcd xx", "abcd yy", False),  # prompt "abcd": 4 chars, not > 4
        ("abcde " + "x" * 14, "abcde " + "y" * 13, True),  # overlap 10/39 > 0.25
        ("abcde " + "x" * 14, "abcde " + "y" * 14, False),  # overlap 10/40 = 0.25, not > 0.25
        ("abcde x", "abcde yy", False),  # a remainder of 1 char (its leading space not counted)
        ("abcde xx", "abcde xx", False),  # identical remainders
    ],
)
def test_consecutive_rule_thresholds(tmp_path, a, b, kept):
    assert bool(_commonsense(tmp_path, a, b)) is kept


def test_consecutive_rule_needs_different_labels(tmp_path):
    assert _commonsense(tmp_path, "abcde xx", "abcde yy", labels=("0", "0")) == []


def test_consecutive_prefix_is_cut_at_a_word_boundary(tmp_path):
    pairs = _commonsense(tmp_path, "My big cats are nice.", "My big cars are nice.")
    assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == ("My big", " cats are nice.", " cars are nice.")


def test_common_word_prefix():
    assert common_word_prefix("I went to the park.", "I went to the parking lot.") == "I went to the "
    assert common_word_prefix("I ate.", "I ate. Then I slept.") == "I "
    assert common_word_prefix("Hello", "Help") == ""


def test_utilitarianism_prompt_is_the_common_prefix_at_a_word_boundary(caplog):
    with caplog.at_level("INFO", logger="reprpo_pl.data.ethics"):
        pairs = _pairs(FIXTURES, "utilitarianism")
    assert pairs == [
        {"id": "ethics/utilitarianism/test/0", "prompt": "I went to the",
         "chosen": " park and ate ice cream.", "rejected": " parking lot and waited."},
        {"id": "ethics/utilitarianism/test/1", "prompt": "I won the game, and",
         "chosen": " we celebrated.", "rejected": " then lost my wallet."},
        {"id": "ethics/utilitarianism/test/3", "prompt": "", "chosen": "I baked bread.", "rejected": "My car broke down."},
    ]  # fmt: skip
    assert "skipped 1 candidate pairs with an empty or identical completion" in caplog.text
    rows = _util_rows()
    for pair in pairs:  # the completion joins its prompt as the sentence was written
        assert {pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]} <= rows, pair


def _util_rows() -> set[str]:
    with (FIXTURES / "utilitarianism" / "util_test.csv").open(newline="", encoding="utf-8") as f:
        return {text.strip() for row in csv.reader(f) for text in row}


def test_virtue_is_refused():
    with pytest.raises(UserError, match=r"ethics/virtue is not converted .* use one of ethics/commonsense"):
        read_ethics_pairs(FIXTURES, "virtue", "test")


def test_unknown_subset_suggests_a_close_name():
    with pytest.raises(UserError, match=r"unknown ETHICS subset 'justise' .* did you mean ethics/justice"):
        read_ethics_pairs(FIXTURES, "justise", "test")


def test_missing_root():
    with pytest.raises(UserError, match=r"data.ethics_root=/no/such/dir does not exist"):
        read_ethics_pairs("/no/such/dir", "justice", "test")


def test_commonsense_has_no_train_split():
    with pytest.raises(UserError, match=r"ethics/commonsense has no train split: .*cm_train.csv does not exist"):
        read_ethics_pairs(FIXTURES, "commonsense", "train")


def test_test_hard_split_is_read_like_test():
    pairs = read_ethics_pairs(FIXTURES, "justice", "test_hard")
    assert pairs["id"] == ["ethics/justice/test_hard/0", "ethics/justice/test_hard/2"]
    assert pairs["chosen"][0] == " crashed it twice."  # label 1 (reasonable) is chosen, as in test


def test_missing_test_hard_split_names_the_path():
    with pytest.raises(MissingDataError, match=r"ethics/commonsense has no test_hard split: .*cm_test_hard.csv does not exist"):
        read_ethics_pairs(FIXTURES, "commonsense", "test_hard")


def test_unknown_split_lists_the_ethics_splits():
    with pytest.raises(UserError, match=r"split='hard' is not a data split: use one of train, test, test_hard"):
        read_ethics_pairs(FIXTURES, "justice", "hard")


def test_wrong_header_names_the_file(tmp_path):
    path = _write_csv(tmp_path, "justice", "justice_test.csv", [["label", "text"], ["1", "x"]])
    with pytest.raises(UserError, match=re.escape(f"{path} header row is ['label', 'text']: ethics/justice needs columns label,scenario")):
        read_ethics_pairs(tmp_path, "justice", "test")


@pytest.mark.parametrize(
    ("subset", "file", "records", "message"),
    [
        ("justice", "justice_test.csv", [["label", "scenario"], ["1", "ok"], ["1", "a", "b"]], "data row 1 has 3 columns, expected 2"),
        ("deontology", "deontology_test.csv", [["label", "scenario", "excuse"], ["yes", "s", "e"]], "data row 0 has label 'yes'"),
        ("utilitarianism", "util_test.csv", [["a", "b"], ["only one"]], "data row 1 has 1 columns, expected 2"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, subset, file, records, message):
    path = _write_csv(tmp_path, subset, file, records)
    with pytest.raises(UserError, match=re.escape(f"{path} {message}")) as err:
        read_ethics_pairs(tmp_path, subset, "test")
    assert "\n" not in str(err.value)

