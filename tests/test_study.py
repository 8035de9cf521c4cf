"""The study's grids (issue 15; conf/experiment/study_*.yaml, docs/study/README.md): what each composes to, the job
dirs named by method, lr and seed, and a grid part rerun skipping the jobs it already finished."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from cli_runner import TINY, run_inprocess
from conftest import compose_config, compose_train

STUDIES = {"study_math": "math", "study_unhelpful_alpaca": "unhelpful_alpaca", "study_math_easy": "math_easy"}


@pytest.mark.parametrize("name", STUDIES)
def test_each_study_composes_to_the_protocol(name):
    cfg = compose_config("train", [f"experiment={name}", "method=dpo", "method.lr=1e-4"], return_hydra_config=True)
    assert cfg.dataset.source == STUDIES[name]
    assert (cfg.data.n_train, cfg.data.batch_size, cfg.eval.n_samples) == (256, 4, 100)
    assert cfg.data.root == "../shared/data/genies" and cfg.data.ethics_root == "../shared/data/ethics"
    assert cfg.callbacks.shift_eval.every_n_steps == 16 and cfg.eval.n_samples_during == 16
    assert cfg.trainer.precision == "bf16-mixed" and cfg.skip_finished
    assert cfg.hydra.sweeper.params == {"method": "dpo,projgrad,innerdpo,prefvec,prefvec_v3", "seed": "1,2,3"}
    # only math holds out a validation slice: the learning rates are picked on it
    assert cfg.data.n_val == (100 if name == "study_math" else 0)
    assert list(cfg.eval.objective_shifts or []) == (["validation"] if name == "study_math" else [])


def test_the_difficulty_pairs_target_tuned_runs_train_and_score_on_math_hard_alone():
    cfg = compose_config("train", ["experiment=study_math_hard", "method=dpo", "study.lr.dpo=1e-4"], return_hydra_config=True)
    assert cfg.dataset.source == "math_hard" and list(cfg.dataset.targets) == [{"name": "math_hard", "shift": "in_domain"}]
    assert cfg.hydra.sweeper.params == {"method": "dpo,projgrad,innerdpo,prefvec,prefvec_v3", "seed": "1"}
    assert (cfg.data.n_train, cfg.eval.n_samples, cfg.method.lr, cfg.hydra.sweep.dir) == (256, 100, 1e-4, "study/math_hard")


def test_the_learning_rate_comes_from_the_studys_table_per_method():
    picked = ["study.lr.dpo=3e-5", "study.lr.prefvec_v3=3e-4"]
    assert compose_train(["experiment=study_math", "method=dpo", *picked], precision=None).method.lr == 3e-5
    assert compose_train(["experiment=study_math", "method=prefvec_v3", *picked], precision=None).method.lr == 3e-4


def test_the_prefvec_v3_preset_is_the_journal_runs_loss():
    preset = compose_train(["method=prefvec_v3"], precision=None)
    journal = compose_train(["experiment=journal-hs-ether-prefvec-v3"], precision=None)
    assert preset.method.name == "prefvec_v3" and preset.loss == journal.loss and preset.transform == journal.transform
    assert (preset.method.agg, preset.collection.sink_k) == (journal.method.agg, journal.collection.sink_k)
    assert preset.loss.prototype_compat == "v3" and preset.loss.use_proj_abs_loss


def test_a_grid_part_skips_the_jobs_it_finished(tmp_path):
    """The lr selection's seed-1 job and the grid's seed-1 job at the picked lr share a dir: the second run skips it."""
    sweep = tmp_path / "study"
    tiny = [*TINY, "data.root=null", "data.ethics_root=null", "data.n_train=4", "data.n_val=2", "eval.n_samples=2",
            "eval.n_samples_during=2", "callbacks.shift_eval.every_n_steps=1", "trainer.precision=32-true"]
    first = run_inprocess(["-m", "experiment=study_math", *tiny, "method=dpo", "seed=1", "method.lr=1e-4,3e-4",
                           f"hydra.sweep.dir={sweep}"], tmp_path / "unused")
    assert first.code == 0, first.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["dpo_lr0.0001_s1", "dpo_lr0.0003_s1"]
    results = json.loads((sweep / "dpo_lr0.0001_s1" / "results.json").read_text())
    assert [t["target"] for t in results["targets"]][:3] == ["math@train", "math@val", "math"]
    stamp = (sweep / "dpo_lr0.0001_s1" / "results.json").stat().st_mtime_ns
    second = run_inprocess(["-m", "experiment=study_math", *tiny, "method=dpo", "seed=1,2", "study.lr.dpo=1e-4",
                            f"hydra.sweep.dir={sweep}"], tmp_path / "unused")
    assert second.code == 0, second.stderr[-3000:]
    assert (sweep / "dpo_lr0.0001_s1" / "results.json").stat().st_mtime_ns == stamp  # skipped, not retrained
    assert (sweep / "dpo_lr0.0001_s2" / "results.json").is_file()


def _script(name: str):
    """A module of scripts/ (not a package), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_committed_job_reruns_from_its_overrides_and_is_compared_to_its_seed_spread(tmp_path, capsys):
    """scripts/study_reproduce.py: a synced job rerun from its .hydra/overrides.yaml gives the same accuracies (spread
    over its 2 seeds as tolerance); a rerun accuracy beyond that spread fails the check, naming the target."""
    sweep, docs = tmp_path / "study" / "math", tmp_path / "docs"
    tiny = [*TINY, "data.root=null", "data.ethics_root=null", "data.n_train=4", "data.n_val=2", "eval.n_samples=2",
            "eval.n_samples_during=2", "trainer.precision=32-true"]
    grid = run_inprocess(["-m", "experiment=study_math", *tiny, "method=dpo", "seed=1,2", "study.lr.dpo=1e-2",
                          f"hydra.sweep.dir={sweep}"], tmp_path / "unused")
    assert grid.code == 0, grid.stderr[-3000:]
    _script("study_sync").sync(sweep.parent, docs)
    job = docs / "math" / "dpo_lr0.01_s2"
    reproduce = _script("study_reproduce")
    assert reproduce.main([str(job), "--out", str(tmp_path / "rerun")]) == 0
    assert "reproduced: dpo_lr0.01_s2" in capsys.readouterr().out
    rerun = json.loads((tmp_path / "rerun" / "results.json").read_text())
    spread = reproduce.seed_spread(job, json.loads((job / "results.json").read_text()))
    moved = rerun["targets"][2]
    moved["acc"] += spread[moved["target"]] + 0.25
    (tmp_path / "rerun" / "results.json").write_text(json.dumps(rerun))
    assert reproduce.main([str(job), "--out", str(tmp_path / "rerun")]) == 1  # compared again, not retrained
    out = capsys.readouterr().out
    assert "NOT reproduced" in out and f"| {moved['target']} |" in out and "| no |" in out


RUNS = Path(__file__).parents[1] / "docs" / "study" / "runs"
REPORTS = {"lr_selection": ["lr_selection", "math/*_s1"], "math": ["math"], "unhelpful_alpaca": ["unhelpful_alpaca"],
           "math_easy": ["math_easy", "math_hard"]}  # docs/study/README.md's report commands: report.md's folder → its inputs


@pytest.mark.parametrize("name", [name for name in REPORTS if (RUNS / name / "report.md").is_file()])
def test_the_committed_study_reports_regenerate_exactly(name, tmp_path):
    """``python -m reprpo_pl.report docs/study/runs/<source>`` rewrites the committed report.md from the committed
    results, byte for byte (issue 15's done-when)."""
    from reprpo_pl.report import report

    inputs = [path for pattern in REPORTS[name] for path in sorted(RUNS.glob(pattern))]
    written = report(inputs, tmp_path)
    assert written.read_text() == (RUNS / name / "report.md").read_text()


def test_the_lr_pick_sets_the_other_lrs_jobs_aside(tmp_path, capsys):
    """scripts/study_pick_lr.py: not ready (exit 2) until a method has its 3 lrs; then it prints the pick as an override
    and ``--set-aside`` leaves the grid's folder holding the picked lr's job alone."""
    sweep = tmp_path / "study" / "math"
    tiny = [*TINY, "data.root=null", "data.ethics_root=null", "data.n_train=4", "data.n_val=2", "eval.n_samples=2",
            "eval.n_samples_during=2", "trainer.precision=32-true", "method=dpo", "seed=1", f"hydra.sweep.dir={sweep}"]
    pick_lr = _script("study_pick_lr")
    assert run_inprocess(["-m", "experiment=study_math", *tiny, "method.lr=1e-5,2e-5"], tmp_path / "unused").code == 0
    assert pick_lr.main([str(sweep), "--set-aside", str(tmp_path / "aside")]) == 2
    assert "dpo: 2 of 3 lrs finished" in capsys.readouterr().err and not (tmp_path / "aside").exists()
    assert run_inprocess(["-m", "experiment=study_math", *tiny, "method.lr=3e-5"], tmp_path / "unused").code == 0
    assert pick_lr.main([str(sweep), "--set-aside", str(tmp_path / "aside")]) == 0
    override = capsys.readouterr().out.strip()
    assert override.startswith("study.lr.dpo=")
    picked = f"dpo_lr{float(override.split('=')[1])}_s1"
    jobs = {"dpo_lr1e-05_s1", "dpo_lr2e-05_s1", "dpo_lr3e-05_s1"}
    assert picked in jobs and [p.name for p in sweep.iterdir() if p.is_dir()] == [picked]
    assert {p.name for p in (tmp_path / "aside").iterdir()} == jobs - {picked}
