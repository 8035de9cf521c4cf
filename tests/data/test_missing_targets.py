"""Targets' splits and missing files (issue 12 item 7): ``name@split`` targets (ETHICS' test_hard),
``eval.missing_targets: error | skip``, a run skipped when nothing is left to measure, and the
tokenisation counts (``n_truncated``, ``n_dropped``) that reach results.json per target."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cli_runner import TINY, run_inprocess
from conftest import TINY_TRAIN, compose_train

from reprpo_pl.data.datamodule import PreferenceDataModule
from reprpo_pl.errors import MissingDataError, RunSkipped, UserError

FIXTURES = Path(__file__).parent / "fixtures"
ETHICS = f"data.ethics_root={FIXTURES / 'ethics'}"
# the embedded source math, ETHICS justice's hard test split from the fixtures, and a GENIES target no copy has
TARGETS = "dataset.targets=[{name:math,shift:in_domain},{name:ethics/justice@test_hard,shift:moral_transfer},{name:nope,shift:cross_domain}]"


def datamodule(*overrides: str) -> PreferenceDataModule:
    cfg = compose_train([*TINY_TRAIN, ETHICS, *overrides])
    return PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)


def test_missing_target_fails_by_default_naming_path_and_fix():
    with pytest.raises(MissingDataError) as err:
        datamodule(TARGETS)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("target nope: nope (test) is not in the embedded subset")
    assert "genies/nope/test.json does not exist" in message and message.endswith("or set eval.missing_targets=skip to skip it")


def test_skip_leaves_the_missing_target_out_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="reprpo_pl.data.datamodule"):
        dm = datamodule(TARGETS, "eval.missing_targets=skip")
    assert [t.name for t in dm.targets] == ["math@train", "math", "ethics/justice@test_hard"]
    assert set(dm.eval_text) == {"math", "ethics/justice@test_hard"}  # the in-sample rows join at setup, after tokenising
    assert dm.eval_text["ethics/justice@test_hard"]["id"][0] == "ethics/justice/test_hard/0"
    assert "skipping target nope (cross_domain; eval.missing_targets=skip)" in caplog.text
    assert "genies/nope/test.json does not exist" in caplog.text


def test_skip_skips_a_run_with_nothing_left_out_of_domain():
    only_missing = "dataset.targets=[{name:math,shift:in_domain},{name:nope,shift:cross_domain}]"
    with pytest.raises(RunSkipped, match=r"every out-of-domain target \(nope\) is missing"):
        datamodule(only_missing, "eval.missing_targets=skip")
    # an in-domain-only table (a target-tuned run) measures in-domain accuracy: not skipped
    assert [t.name for t in datamodule("dataset.targets=[{name:math,shift:in_domain}]", "eval.missing_targets=skip").targets] == [
        "math@train", "math"]


def test_skip_skips_a_run_whose_source_is_missing():
    missing_source = ["dataset.source=nope", "dataset.targets=[{name:nope,shift:in_domain}]"]
    with pytest.raises(RunSkipped, match=r"source nope has no training data .*genies/nope/train.json does not exist"):
        datamodule(*missing_source, "eval.missing_targets=skip")
    with pytest.raises(MissingDataError, match=r"nope \(train\) is not in the embedded subset"):
        datamodule(*missing_source)


def test_bad_missing_targets_value():
    with pytest.raises(UserError, match=r"eval.missing_targets='maybe' must be one of error, skip, e.g. eval.missing_targets=skip"):
        datamodule("eval.missing_targets=maybe")


def test_results_json_records_splits_skips_and_tokenisation_counts(tmp_path):
    """A tiny run: the test_hard target is scored, the missing target skipped, and every target's row says how
    many of its pairs were truncated or dropped (max_prompt_length=32 cuts every chat-templated math prompt)."""
    result = run_inprocess([*TINY, "trainer.max_steps=1", ETHICS, TARGETS, "eval.missing_targets=skip",
                            "data.max_prompt_length=32"], tmp_path / "run")
    assert result.code == 0, result.stderr[-3000:]
    targets = {t["target"]: t for t in json.loads((tmp_path / "run" / "results.json").read_text())["targets"]}
    assert list(targets) == ["math@train", "math", "ethics/justice@test_hard"]
    assert all(isinstance(t["n_truncated"], int) and isinstance(t["n_dropped"], int) for t in targets.values())
    assert targets["math"]["n_truncated"] == targets["math"]["n"] == 2 and targets["math"]["n_dropped"] == 0
    assert targets["ethics/justice@test_hard"]["n"] == 2 and targets["ethics/justice@test_hard"]["n_dropped"] == 0
