"""A run directory belongs to one run (issue 14 class 3) and grid resume (class 9): src/reprpo_pl/run_dirs.py."""

from __future__ import annotations

import json

import pytest
from cli_runner import TINY, run_inprocess

from reprpo_pl.errors import UserError
from reprpo_pl.run_dirs import plan_run


def snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_new_run_in_a_finished_runs_dir_is_refused_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    first = run_inprocess(["method=dpo", *TINY], run_dir)
    assert first.code == 0, first.stderr[-2000:]
    before = snapshot(run_dir)
    second = run_inprocess(["method=projgrad", *TINY], run_dir)
    assert second.code == 2
    assert second.error_lines == [f"error: {run_dir} holds results.json of another run; use a new hydra.run.dir, "
                                  f"or ckpt_path={run_dir}/checkpoints/last.ckpt to resume that run"]
    assert snapshot(run_dir) == before
    # grid resume: the same settings are skipped, other settings refused, a checkpoint without results resumed
    cfg = json.loads((run_dir / "results.json").read_text())["config"]
    assert plan_run(run_dir, cfg, skip_finished=True).action == "skip"
    with pytest.raises(UserError, match=r"holds another run \(method.lr=.* in its results.json"):
        plan_run(run_dir, {**cfg, "method": {**cfg["method"], "lr": 1.0}}, skip_finished=True, sweep=True)
    (run_dir / "results.json").unlink()
    plan = plan_run(run_dir, cfg, skip_finished=True)
    assert (plan.action, plan.ckpt_path) == ("resume", str(run_dir / "checkpoints" / "last.ckpt"))
