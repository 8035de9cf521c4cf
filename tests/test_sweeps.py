"""Grids (`-m method=… seed=…`), the cpu_comparison experiment, and Optuna searches (hparams_search=…)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runner import TINY, assert_same_results, run_inprocess
from conftest import compose_config

import reprpo_pl.train  # noqa: F401  (registers the ensure_dir / optuna_seed / launch_time resolvers)
from reprpo_pl.config import CONF_DIR
from reprpo_pl.report import report

FAST = ["model=tiny_random", "data.n_train=4", "data.max_length=128", "data.max_prompt_length=64",
        "eval.n_samples=3", "eval.batch_size=4", "callbacks.generations.max_new_tokens=4",
        "dataset.targets=[{name:math,shift:in_domain},{name:us_history_textbook,shift:orthogonal}]"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
METHOD_CONF = Path(CONF_DIR) / "method"


def train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "reprpo_pl.train", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def compose_train(*overrides: str, hydra: bool = False):
    return compose_config("train", overrides, return_hydra_config=hydra)


# ---- grids --------------------------------------------------------------------------------------
def test_grid_writes_one_results_json_per_job(tmp_path):
    train_cli("-m", "method=dpo,innerdpo", "seed=1,2", *FAST, cwd=tmp_path)
    [date] = (tmp_path / "multirun").iterdir()  # multirun/<date>/<time>/<n>/
    [time] = date.iterdir()
    assert (time / "multirun.yaml").is_file()
    jobs = sorted((p for p in time.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    done = {(json.loads((j / "results.json").read_text())["method"], json.loads((j / "results.json").read_text())["seed"])
            for j in jobs}
    assert done == {("dpo", 1), ("dpo", 2), ("innerdpo", 1), ("innerdpo", 2)}
    assert all((j / "checkpoints" / "last.ckpt").is_file() and (j / "results.md").is_file() for j in jobs)
    md = report([time]).read_text()
    assert "| dpo | " in md and "| innerdpo/ether | " in md and "(n=2)" in md


def test_a_grid_job_starts_with_no_earlier_job_alive(tmp_path, monkeypatch):
    """A finished job's trainer, module and model sit in reference cycles; without a full collection after each job
    a grid kept several jobs' models in memory (9 GB after three SmolLM2 runs, steps 50 % slower)."""
    import gc

    import lightning as L

    from reprpo_pl import train

    alive = []  # LightningModules and Trainers in memory (collected or not) when each job starts
    real = train.train
    monkeypatch.setattr(train, "train", lambda cfg, run_dir: alive.append(
        sum(isinstance(o, (L.LightningModule, L.Trainer)) for o in gc.get_objects())) or real(cfg, run_dir))
    result = run_inprocess(["-m", *TINY, "method=dpo", "seed=1,2,3", f"hydra.sweep.dir={tmp_path / 'grid'}"], tmp_path / "unused")
    assert result.code == 0, result.stderr[-3000:]
    assert alive == [0, 0, 0]


def test_grid_failed_job_is_one_line_and_the_others_run(tmp_path):
    """A job that fails is one log line when it fails; the grid goes on, then exits with one line per failed job."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "reprpo_pl.train", "-m", "method=dpo", "method.lr=-1,1e-4", *TINY,
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    failed = "job 0 failed (method.lr=-1): UserError: method.lr=-1 must be > 0, e.g. method.lr=5e-5 (a finite number)"
    log = proc.stdout.splitlines()
    assert sum(failed in line for line in log) == 1
    assert next(i for i, line in enumerate(log) if failed in line) < next(i for i, line in enumerate(log) if "#1 :" in line)
    assert json.loads((sweep / "1" / "results.json").read_text())["config"]["method"]["lr"] == 1e-4
    assert not (sweep / "0").exists()  # it held only Hydra's bookkeeping
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        "error: job 0 failed (method.lr=-1): method.lr=-1 must be > 0, e.g. method.lr=5e-5 (a finite number)",
        f"error: 1 of 2 jobs failed; rerun with hydra.sweep.dir={sweep} skip_finished=true to skip the finished jobs "
        "and run (or resume) the rest"]
    assert "Traceback" not in proc.stderr


def test_grid_rerun_is_refused_whole_or_skips_finished_jobs_and_resumes_the_rest(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    sweep = tmp_path / "sweep"
    grid = ["-m", "method=dpo", "method.lr=1e-4,2e-4", *TINY, f"hydra.sweep.dir={sweep}"]
    first = run_inprocess(grid, sweep)
    assert first.code == 0, first.stderr[-3000:]
    results = [json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1")]
    (sweep / "1" / "results.json").unlink()  # job 1 as if killed after its final checkpoint; last.ckpt stays
    before = files(sweep)
    refused = run_inprocess(grid, sweep)  # the same grid again, without skip_finished: nothing is written
    assert refused.code == 2
    assert refused.error_lines == [
        f"error: {sweep}/0 holds results.json of another run; use a new hydra.sweep.dir, or skip_finished=true to "
        "skip its finished jobs and resume the rest",
        f"error: {sweep}/1 holds a checkpoint of another run; use a new hydra.sweep.dir, or skip_finished=true to "
        "skip its finished jobs and resume the rest"]
    assert files(sweep) == before
    again = run_inprocess([*grid, "skip_finished=true"], sweep)
    assert again.code == 0, again.stderr[-3000:]
    assert "skipped: finished" in (sweep / "0" / "train.log").read_text()
    assert (sweep / "0" / "results.json").read_bytes() == before["0/results.json"]
    assert f"resuming from {sweep}/1/checkpoints/last.ckpt (skip_finished=true)" in (sweep / "1" / "train.log").read_text()
    assert_same_results(results[1], json.loads((sweep / "1" / "results.json").read_text()))


def test_cpu_comparison_experiment():
    text = (Path(CONF_DIR) / "experiment" / "cpu_comparison.yaml").read_text()
    assert "python -m reprpo_pl.train -m experiment=cpu_comparison" in text
    cfg = compose_train("experiment=cpu_comparison", hydra=True)
    params = cfg.hydra.sweeper.params
    methods = params.method.split(",")
    assert methods == ["dpo", "innerdpo", "projgrad"] and params.seed.split(",") == ["1", "2", "3"]
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    assert cfg.model.name == "smollm2_135m" and cfg.dataset.source == "math"  # defaults untouched
    for method in methods:
        if not (METHOD_CONF / f"{method}.yaml").is_file():
            pytest.skip(f"conf/method/{method}.yaml is not there yet")
        composed = compose_train("experiment=cpu_comparison", f"method={method}")
        assert composed.method.name == method and composed.method.lr == 3e-4  # one lr, over each method's default


# ---- Optuna --------------------------------------------------------------------------------------
# every search's config, and the runs with pruning: tests/test_hparams_search.py


def test_optuna_sweep_writes_study_and_resumes(tmp_path):
    import optuna

    command = ["hparams_search=dpo", "hydra.sweeper.n_trials=2", *FAST]
    train_cli(*command, cwd=tmp_path)
    sweep = tmp_path / "multirun" / "optuna" / "dpo_tiny_random_math"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) == {"method.lr", "method.beta"}
    assert (sweep / "optuna.db").is_file()
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    optuna.load_study(study_name="dpo_tiny_random_math", storage=storage).ask()  # as if its sweep were killed
    resumed = train_cli(*command, cwd=tmp_path)  # the same command again resumes the study
    assert "marked 1 trial(s) of study dpo_tiny_random_math failed that a killed sweep left RUNNING: 2" in resumed.stdout
    study = optuna.load_study(study_name="dpo_tiny_random_math", storage=storage)
    assert [(t.number, t.state.name) for t in study.trials] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "FAIL"),
                                                                (3, "COMPLETE"), (4, "COMPLETE")]
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({t.params["method.lr"] for t in trials}) == 4  # the resumed run drew new trials
    # a folder per invocation, each with its jobs; the trial values are the runs' objectives
    invocations = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(invocations) == 2 and all(sorted(q.name for q in p.iterdir()) == ["0", "1"] for p in invocations)
    runs = [json.loads((inv / job / "results.json").read_text()) for inv in invocations for job in ("0", "1")]
    assert [t.value for t in trials] == [r["objective"] for r in runs]
    assert [t.params["method.lr"] for t in trials] == [r["config"]["method"]["lr"] for r in runs]


def test_optimized_value():
    from reprpo_pl.errors import UserError
    from reprpo_pl.train import optimized_value

    assert optimized_value({"objective": 1.25, "seed": 1}, "objective") == 1.25
    assert math.isnan(optimized_value({}, "objective"))  # training stopped before results: Optuna marks FAIL
    with pytest.raises(UserError, match="optimized_metric=acc is not a number.*use one of: objective"):
        optimized_value({"objective": 1.0, "method": "dpo", "shifts": {}}, "acc")
