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
from conftest import compose_config
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

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
SEARCHED = {
    "dpo": {"method.lr", "method.beta"},
    "innerdpo": {"method.lr", "loss.alpha", "loss.beta", "loss.align_method", "transform.Htype"},
    "projgrad": {"method.lr", "method.projection.beta"},
}


@pytest.mark.parametrize("name", sorted(SEARCHED))
def test_hparams_search_config(name, tmp_path, monkeypatch):
    if not (METHOD_CONF / f"{name}.yaml").is_file():
        pytest.skip(f"conf/method/{name}.yaml is not there yet")
    monkeypatch.chdir(tmp_path)  # ${ensure_dir:} creates the sweep dir
    cfg = compose_train(f"hparams_search={name}", "model=tiny_random", hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.optimized_metric == "objective"
    assert sweeper.direction == "maximize" and sweeper.n_jobs == 1 and 0 < sweeper.max_failure_rate <= 1
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 1234
    assert sweeper.study_name == f"{name}_tiny_random_math"
    assert cfg.hydra.sweep.dir == f"multirun/optuna/{name}_tiny_random_math"
    assert sweeper.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db" and Path(cfg.hydra.sweep.dir).is_dir()
    assert cfg.method.name == name
    assert set(sweeper.params) == SEARCHED[name]
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    for override in parsed:
        key = override.get_key_element()
        assert override.is_sweep_override(), key
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not a key of the {name} config"
        if override.is_choice_sweep():  # every option is accepted by the code that reads it
            options = list(override.sweep_string_iterator())
            if key == "loss.align_method":
                from reprpo_pl.reprs.losses.innerdpo import ALIGN_METHODS

                assert set(options) <= set(ALIGN_METHODS)
            if key == "transform.Htype":
                from reprpo_pl.reprs.transforms.ether import HTYPES

                assert set(options) <= set(HTYPES)
    assert "method.lr" in sweeper.params and "log" in sweeper.params["method.lr"]


def test_optuna_sweep_writes_study_and_resumes(tmp_path):
    import optuna

    command = ["hparams_search=dpo", "hydra.sweeper.n_trials=2", *FAST]
    train_cli(*command, cwd=tmp_path)
    sweep = tmp_path / "multirun" / "optuna" / "dpo_tiny_random_math"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) == {"method.lr", "method.beta"}
    assert (sweep / "optuna.db").is_file()
    train_cli(*command, cwd=tmp_path)  # the same command again resumes the study
    study = optuna.load_study(study_name="dpo_tiny_random_math", storage=f"sqlite:///{sweep / 'optuna.db'}")
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
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
