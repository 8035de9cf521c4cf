"""The columns the field reads (issue 12 item 1): the in-sample ``train`` row, ``acc_delta`` beside
``acc_gain_vs_ref``, ``log_ppl_chosen_delta`` per shift, and results.md marking likely incoherent cells."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TRAIN, compose_train

from reprpo_pl.data.datamodule import PreferenceDataModule
from reprpo_pl.eval.metrics import shift_summary, target_metrics
from reprpo_pl.eval.results import INCOHERENT, render_markdown
from reprpo_pl.eval.scorer import RowScores


def scores(logp_cho: list[float], logp_rej: list[float]) -> RowScores:
    """One token per completion, so per-token means are the sums."""
    ones = torch.ones(len(logp_cho))
    return RowScores(torch.tensor(logp_cho), torch.tensor(logp_rej), ones, ones.clone())


def test_acc_delta_is_accuracy_points_and_shifts_carry_coherence():
    base = scores([-1.0, -3.0, -1.0, -3.0], [-2.0, -2.0, -2.0, -2.0])  # 2 of 4 correct
    adapter = scores([-1.0, -1.0, -1.0, -3.0], [-2.0, -2.0, -2.0, -2.0])  # 3 of 4
    row = target_metrics(base, adapter)
    assert row["acc_delta"] == pytest.approx(0.25) and row["acc_gain_vs_ref"] == pytest.approx(1.5)
    assert row["log_ppl_chosen_delta"] == pytest.approx(-0.5)  # chosen log-perplexity fell by 2/4 nats/token
    targets = [{"target": "a", "shift": "cross_domain", **row},
               {"target": "b", "shift": "cross_domain", **row, "acc_delta": -0.25, "log_ppl_chosen_delta": 1.5}]
    summary = shift_summary(targets)["cross_domain"]
    assert summary["acc_delta"] == pytest.approx(0.0) and summary["log_ppl_chosen_delta"] == pytest.approx(0.5)


def results_doc(log_ppl: dict[str, float], limit: float = 2.0) -> dict:
    targets = [{"target": name, "shift": shift, "n": 4, "acc_base": 0.5, "acc": 0.75, "acc_gain_vs_ref": 1.5, "acc_delta": 0.25,
                "perplexity_reduction_vs_ref": 1.0, "preference_logp_gain_vs_ref": 0.0, "log_ppl_chosen_delta": log_ppl[name]}
               for name, shift in (("math@train", "train"), ("math", "in_domain"), ("cmv", "cross_domain"))]
    return {"label": "dpo", "model": "tiny_random", "dataset": "math", "seed": 1, "n_train": 4, "global_step": 2,
            "targets": targets, "shifts": shift_summary(targets), "config": {"eval": {"coherence_limit": limit}}}


def test_results_md_marks_incoherent_cells_next_to_accuracy():
    md = render_markdown(results_doc({"math@train": -0.5, "math": 0.3, "cmv": 2.5}))
    lines = md.splitlines()
    assert "| adapter | train | in_domain | cross_domain |" in lines  # the in-sample column first
    assert f"| dpo | 0.750 (n=4) | 0.750 (n=4) | 0.750 (n=4) {INCOHERENT} |" in lines
    assert "| acc_delta | 0.250 | 0.250 | 0.250 |" in lines
    assert "| log_ppl_chosen_delta | -0.500 | 0.300 | 2.500 |" in lines
    cmv = next(line for line in lines if line.startswith("| cmv | cross_domain |"))
    math_row = next(line for line in lines if line.startswith("| math | in_domain |"))
    assert INCOHERENT in cmv and INCOHERENT not in math_row
    assert "eval.coherence_limit=2 nats/token" in md
    # the run's own limit decides
    assert INCOHERENT + " |" not in render_markdown(results_doc({"math@train": -0.5, "math": 0.3, "cmv": 2.5}, limit=3.0))


def in_sample(tokenizer, *overrides: str) -> PreferenceDataModule:
    cfg = compose_train([*TINY_TRAIN, *overrides])
    datamodule = PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)
    datamodule.tokenizer = tokenizer
    datamodule.setup("fit")
    return datamodule


def test_in_sample_row_is_training_pairs(tokenizer):
    datamodule = in_sample(tokenizer, "data.n_train=12", "eval.n_samples=4", "data.max_length=512")
    first = datamodule.targets[0]
    assert (first.name, first.shift) == ("math@train", "train")
    assert [t.name for t in datamodule.targets[1:]] == [t["name"] for t in compose_train(TINY_TRAIN).dataset.targets]
    ids = datamodule.row_ids("math@train")
    trained = [datamodule.train_text["id"][i] for i in datamodule.train_set["index"]]
    assert len(ids) == 4 and set(ids) <= set(trained) and all(i.startswith("math/train/") for i in ids)
    assert len(in_sample(tokenizer, "data.n_train=3", "eval.n_samples=4", "data.max_length=512").row_ids("math@train")) == 3


def test_in_sample_row_takes_pairs_that_survive_tokenisation(tokenizer):
    """At max_length 64 most math training pairs are cut to nothing; the in-sample row takes the survivors."""
    datamodule = in_sample(tokenizer, "data.n_train=16", "eval.n_samples=2", "data.max_length=64", "data.max_prompt_length=48")
    survivors = [datamodule.train_text["id"][i] for i in datamodule.train_set["index"]]
    assert 0 < len(survivors) < 16, "the setting no longer drops training pairs: pick a shorter max_length"
    ids = datamodule.row_ids("math@train")
    assert len(ids) == min(2, len(survivors)) and set(ids) <= set(survivors)
    assert datamodule.eval_counts["math@train"]["n_dropped"] == 0
