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


def test_eval_into_another_runs_out_dir_is_refused_and_touches_nothing(tmp_path):
    """``out_dir=`` naming a folder with an earlier evaluation's results is refused before Hydra writes there."""
    import contextlib
    import io
    import sys

    from reprpo_pl.eval.from_checkpoint import main

    out_dir = tmp_path / "eval"
    out_dir.mkdir()
    (out_dir / "results.json").write_text('{"objective": 1.0}')
    err, argv = io.StringIO(), sys.argv
    sys.argv = ["reprpo_pl.eval", f"ckpt_path={tmp_path / 'run'}", f"out_dir={out_dir}"]
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2
    assert err.getvalue().splitlines() == [f"error: out_dir={out_dir} holds results.json of another run; use a new "
                                           "out_dir (the default, <run dir>/eval/<date>_<time>, is new for each evaluation)"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["results.json"]


def test_a_preempted_grid_job_stops_the_sweep_with_the_resume_command(capsys):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from reprpo_pl.errors import EXIT_INTERRUPTED, Preempted
    from reprpo_pl.run_dirs import RunDirGuard

    guard = RunDirGuard()
    guard.multirun, guard.jobs = True, [["method=dpo", "seed=1"], ["method=dpo", "seed=2"], ["method=dpo", "seed=3"]]
    config = OmegaConf.create({"hydra": {"job": {"num": 1}, "sweep": {"dir": "multirun/x"}}})
    stopped = JobReturn(overrides=guard.jobs[1], status=JobStatus.FAILED,
                        _return_value=Preempted("interrupted (Ctrl-C) at step 3; resume with ckpt_path=…", EXIT_INTERRUPTED))
    with pytest.raises(SystemExit) as exit_info:
        guard.on_job_end(config, stopped)
    assert exit_info.value.code == EXIT_INTERRUPTED
    assert capsys.readouterr().err.splitlines() == [
        "error: job 1 failed (seed=2): interrupted (Ctrl-C) at step 3; resume with ckpt_path=…",
        "error: the sweep stopped at job 1; rerun with hydra.sweep.dir=multirun/x skip_finished=true to skip the "
        "finished jobs and run (or resume) the rest"]
