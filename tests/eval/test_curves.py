"""Step-level evaluation (issue 12 item 6): ``callbacks.shift_eval.every_n_steps`` scores ``eval.n_samples_during``
pairs per target every N optimizer steps, logs them as ``curve/...`` and writes ``curves.jsonl`` beside results.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cli_runner import TINY, run_inprocess
from reprpo_pl.data.sources import subset_rows
from reprpo_pl.errors import UserError
from reprpo_pl.eval.callback import ShiftEvalCallback


def test_every_n_steps_writes_a_curve_point_per_step(tmp_path: Path):
    # 4 pairs, batch 2, 2 epochs: steps 1..4; every 3 steps gives step 3, and the last step 4 closes the curve
    run = run_inprocess(["method=dpo", *TINY, "eval.n_samples=3", "trainer.max_epochs=2", "callbacks.shift_eval.every_n_steps=3",
                         "eval.n_samples_during=2"], tmp_path / "run")
    assert run.code == 0, run.stderr[-3000:]
    points = [json.loads(line) for line in (tmp_path / "run" / "curves.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [p["step"] for p in points] == [3, 4] and results["global_step"] == 4
    full = {t["target"]: t["n"] for t in results["targets"]}
    assert max(full.values()) == 3 and all(t["n"] == min(2, full[t["target"]]) for p in points for t in p["targets"])  # the subset
    assert [t["target"] for t in points[-1]["targets"]] == [t["target"] for t in results["targets"]]
    assert set(points[-1]["shifts"]) == set(results["shifts"]) and "acc" in points[-1]["shifts"]["in_domain"]
    logged = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    assert [row["step"] for row in logged if row.get("curve/in_domain/acc")] == ["3", "4"]


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"every_n_steps": 2.5}, {"n_samples_during": None}])
def test_bad_curve_settings_are_one_line(kwargs):
    with pytest.raises(UserError, match="must be a positive integer"):
        ShiftEvalCallback(**kwargs)


def test_curve_points_survive_a_checkpoint():
    """The points are in the callback's checkpoint state, so a resumed run writes the whole curve; an older
    checkpoint without them loads as no points."""
    callback = ShiftEvalCallback(every_n_steps=2)
    callback.curve = [{"step": 2, "shifts": {}}]
    resumed = ShiftEvalCallback(every_n_steps=2)
    resumed.load_state_dict(callback.state_dict())
    assert resumed.curve == callback.curve and resumed.earlier["eval_s"] == callback.state_dict()["eval_s"]
    older = ShiftEvalCallback(every_n_steps=2)
    older.load_state_dict({"train_s": 1.0, "eval_s": 2.0})
    assert older.curve == [] and older.earlier == {"train_s": 1.0, "eval_s": 2.0}


def test_the_last_point_is_the_final_evaluation_on_the_subsets_rows(tmp_path: Path, monkeypatch):
    """At the last step every target was just scored in full: the curve's last point takes those scores on its
    subset's rows (`subset_rows`) instead of a second pass, so it agrees with the per-pair files exactly."""
    from reprpo_pl.eval import callback

    passes = []  # eval_sets of each scoring pass: None = the full eval sets, else the curve's subsets
    real = callback.evaluate_targets
    monkeypatch.setattr(callback, "evaluate_targets", lambda *a, **k: passes.append(a[4] if len(a) > 4 else k.get("eval_sets")) or real(*a, **k))
    run = run_inprocess(["method=dpo", *TINY, "eval.n_samples=4", "trainer.max_epochs=2", "callbacks.shift_eval.every_n_steps=3",
                         "eval.n_samples_during=2", "method.lr=1e-2"], tmp_path / "run")
    assert run.code == 0, run.stderr[-3000:]
    last = [json.loads(line) for line in (tmp_path / "run" / "curves.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 4
    assert [p is None for p in passes] == [True, False, True]  # epoch 1 (step 2), step 3 (subsets), epoch 2: no 4th pass
    for target in last["targets"]:
        rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / f"{target['target']}.jsonl").read_text().splitlines()]
        kept = [rows[i] for i in subset_rows(len(rows), 2, 0)]

        def correct(row: dict, role: str) -> bool:
            return row[f"{role}_logp_chosen"] / row[f"{role}_n_chosen"] > row[f"{role}_logp_rejected"] / row[f"{role}_n_rejected"]

        assert target["n"] == len(kept)
        assert target["acc"] == sum(correct(r, "adapter") for r in kept) / len(kept)
        assert target["acc_base"] == sum(correct(r, "base") for r in kept) / len(kept)
        delta = sum(r["base_logp_chosen"] / r["base_n_chosen"] - r["adapter_logp_chosen"] / r["adapter_n_chosen"] for r in kept)
        assert abs(target["log_ppl_chosen_delta"] - delta / len(kept)) < 1e-5
