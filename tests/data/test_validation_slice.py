"""The validation slice (``data.n_val``): pairs held out of the source's train split, never trained on,
scored as ``<source>@val`` (shift ``validation``) — what the study picks its learning rate on (issue 15)."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_inprocess
from conftest import TINY_TRAIN, compose_train

from reprpo_pl.data.datamodule import PreferenceDataModule
from reprpo_pl.data.sources import load_pairs, split_train_val
from reprpo_pl.errors import UserError
from reprpo_pl.eval.metrics import objective


def datamodule(*overrides: str) -> PreferenceDataModule:
    cfg = compose_train([*TINY_TRAIN, *overrides])
    return PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)


def test_the_slice_is_disjoint_from_training_and_leaves_the_training_rows_unchanged():
    pairs = load_pairs("math", "train", genies_root=None, ethics_root=None)
    train, val = split_train_val(pairs, 40, 30, seed=0, val_seed=0, label="math/train")
    assert len(train) == 40 and len(val) == 30
    assert not set(train["id"]) & set(val["id"])
    # the same training rows as a run without a slice: a run with data.n_val trains on exactly what it would have
    assert train["id"] == load_pairs("math", "train", genies_root=None, ethics_root=None, n=40)["id"]
    # fixed by val_seed alone, not the training seed's picks only
    assert split_train_val(pairs, 40, 30, seed=0, val_seed=1, label="")[1]["id"] != val["id"]


def test_the_datamodule_scores_it_second_as_shift_validation():
    dm = datamodule("data.n_train=16", "data.n_val=8")
    assert [(t.name, t.shift) for t in dm.targets][:3] == [("math@train", "train"), ("math@val", "validation"),
                                                          ("math", "in_domain")]
    assert len(dm.eval_text["math@val"]) == 8
    assert not set(dm.eval_text["math@val"]["id"]) & set(dm.train_text["id"])
    assert "math@val" not in [t.name for t in datamodule("data.n_train=16").targets]  # off by default


@pytest.mark.parametrize("value", ["-1", "1.5", "true"])
def test_a_bad_n_val_is_one_line(value):
    with pytest.raises(UserError, match=rf"^data.n_val={value if value != 'true' else 'True'} must be a non-negative integer"):
        datamodule(f"data.n_val={value}")


def test_too_big_a_slice_names_the_sizes_and_the_fix():
    with pytest.raises(UserError) as err:
        datamodule("data.n_train=100", "data.n_val=29")  # the embedded math train split has 128 pairs
    assert str(err.value) == ("data.n_val=29 pairs cannot be held out of math/train: it has 128 pairs and "
                              "data.n_train=100 of them train; lower data.n_val or data.n_train")


def test_validation_is_left_out_of_the_default_objective_and_can_be_the_objective():
    targets = [{"target": "math@val", "shift": "validation", "log_ppl_chosen_delta": 0.1},
               {"target": "cmv", "shift": "cross_domain", "log_ppl_chosen_delta": 0.1}]
    shifts = {"validation": {"acc_gain_vs_ref": 1.5}, "cross_domain": {"acc_gain_vs_ref": 0.9}}
    assert objective(shifts, targets) == (0.9, None)
    assert objective(shifts, targets, ["validation"]) == (1.5, None)
    # the coherence gate still looks at every target, the validation row included
    targets[0]["log_ppl_chosen_delta"] = 3.0
    assert objective(shifts, targets, ["validation"])[0] == 0.0


def test_a_run_writes_the_validation_row(tmp_path):
    result = run_inprocess([*TINY_TRAIN, "data.n_train=8", "data.n_val=4", "eval.objective_shifts=[validation]"], tmp_path)
    assert result.code == 0, result.err
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {t["target"]: t for t in results["targets"]}
    assert rows["math@val"]["shift"] == "validation", rows["math@val"]
    assert rows["math@val"]["n"] > 0 and rows["math@val"]["n"] + rows["math@val"]["n_dropped"] == 4, rows["math@val"]
    assert results["objective"] == results["shifts"]["validation"]["acc_gain_vs_ref"]
