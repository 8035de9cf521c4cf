"""The Optuna searches of conf/hparams_search/ (one per method) and their pruning (src/reprpo_pl/hparams.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import run_inprocess
from conftest import compose_config
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

import reprpo_pl.train  # noqa: F401  (registers the ensure_dir / optuna_seed / launch_time resolvers)
from reprpo_pl.config import CONF_DIR
from reprpo_pl.validation import validate_train_config

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # PatientPruner's

METHODS = ["dpo", "projgrad", "projbp", "innerdpo", "innerpo", "prefvec", "mse", "rank", "topk"]
SEARCHES = sorted(p.stem for p in (Path(CONF_DIR) / "hparams_search").glob("*.yaml") if not p.stem.startswith("_"))
# two pairs, one optimizer step per epoch, two epochs (two pruning reports), two eval targets of one pair each
TINY_SWEEP = ["model=tiny_random", "data.n_train=2", "data.batch_size=2", "trainer.max_epochs=2",
              "eval.n_samples=1", "callbacks.generations.enabled=false",
              "dataset.targets=[{name:math,shift:in_domain},{name:change_my_view,shift:cross_domain}]",
              "hydra.sweeper.n_trials=2", "callbacks.optuna_pruning.every_n_steps=1"]


class PruneFromSecondTrial(optuna.pruners.BasePruner):
    """Prunes every trial but the first at its first report: a deterministic stand-in for the configured
    PatientPruner(MedianPruner), whose options it takes and ignores."""

    def __init__(self, **ignored) -> None:
        pass

    def prune(self, study, trial) -> bool:
        return trial.number >= 1


def test_every_method_has_a_search():
    assert SEARCHES == sorted(METHODS)


@pytest.mark.parametrize("name", SEARCHES)
def test_search_composes_with_its_method(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ${ensure_dir:} creates the sweep dir
    cfg = compose_config("train", [f"hparams_search={name}", "model=tiny_random"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.optimized_metric == "objective" and cfg.method.name == name
    assert sweeper.direction == "maximize" and sweeper.n_jobs == 1 and sweeper.max_failure_rate == 1.0
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 42
    assert sweeper.study_name == f"{name}_tiny_random_math" and cfg.hydra.sweep.dir == f"multirun/optuna/{name}_tiny_random_math"
    assert sweeper.storage._target_ == "reprpo_pl.hparams.pruned_trial_storage"
    assert sweeper.storage.url == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db" and Path(cfg.hydra.sweep.dir).is_dir()
    assert cfg.hydra.callbacks.fail_stale_trials.storage == sweeper.storage.url
    pruner = instantiate(cfg.callbacks.optuna_pruning.pruner)  # the prototype's PatientPruner(5, Median)
    assert isinstance(pruner, optuna.pruners.PatientPruner) and pruner._patience == 5
    assert isinstance(pruner._wrapped_pruner, optuna.pruners.MedianPruner)
    assert "log" in sweeper.params["method.lr"]
    # every searched key is a key of this method's config, and every end of its range or choice is accepted
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    for override in parsed:
        key = override.get_key_element()
        assert override.is_sweep_override(), key
        assert OmegaConf.select(task, key, default="missing") not in ("missing", None), f"{key} is not a key of {name}"
        if override.is_choice_sweep():
            values = list(override.value().list)
        else:
            values = [override.value().start, override.value().end]
            assert values[0] < values[1]
        for value in values:
            trial = task.copy()
            OmegaConf.update(trial, key, value)
            validate_train_config(trial)
            if "loss" in trial:  # a loss checks its own options when built (as methods/reprpo.py builds it)
                instantiate({k: v for k, v in trial.loss.items() if k != "name"})
            if key == "transform.Htype":
                from reprpo_pl.reprs.transforms.ether import HTYPES

                assert value in HTYPES
            if key == "loss.align_method":
                from reprpo_pl.reprs.losses.innerdpo import ALIGN_METHODS

                assert value in ALIGN_METHODS


def test_every_search_runs_two_trials_and_prunes_the_second(tmp_path):
    """Each method's search through the sweeper: trial 0 trains and is evaluated (its value is results.json's
    objective); trial 1 is pruned at its first report (a stand-in pruner): no results.json, recorded PRUNED with
    the reported reward accuracy, and the sweep exits 0."""
    failures = []
    for name in METHODS:
        sweep = tmp_path / name
        result = run_inprocess([f"hparams_search={name}", *TINY_SWEEP, f"hydra.sweep.dir={sweep}",
                                f"callbacks.optuna_pruning.pruner._target_={__name__}.PruneFromSecondTrial"], sweep)
        if result.code != 0:
            failures.append(f"{name}: exit {result.code}: {result.stderr[-2000:]}")
            continue
        study = optuna.load_study(study_name=f"{name}_tiny_random_math", storage=f"sqlite:///{sweep / 'optuna.db'}")
        complete, pruned = study.trials
        assert (complete.state.name, pruned.state.name) == ("COMPLETE", "PRUNED"), name
        [job0, job1] = [next(sweep.glob(f"*/{n}")) for n in (0, 1)]
        results = json.loads((job0 / "results.json").read_text())
        assert complete.value == results["objective"] and complete.intermediate_values.keys() == {1, 2}, name
        assert complete.params == {k: OmegaConf.select(OmegaConf.create(results["config"]), k) for k in complete.params}
        assert not (job1 / "results.json").exists(), name
        assert list(pruned.intermediate_values) == [1] and pruned.value == pruned.intermediate_values[1], name
        assert 0.0 <= pruned.value <= 1.0  # a reward accuracy
        log = (job1 / "train.log").read_text()
        assert f"pruned: Optuna trial 1 of study {name}_tiny_random_math stopped at step 1 (train/rewards/accuracies" in log
        assert "Failed experiment" not in result.stdout + result.stderr
    assert not failures, "\n".join(failures)


class RecordingTrial:
    number = 0

    def __init__(self) -> None:
        self.reports: list[tuple[float, int]] = []

    def report(self, value: float, step: int) -> None:
        self.reports.append((value, step))

    def should_prune(self) -> bool:
        return False


def test_pruning_reports_the_mean_of_each_window_of_steps():
    """every_n_steps=2 with 2 micro-batches per optimizer step: one report per 2 steps, the mean of its 4 batches."""
    from types import SimpleNamespace

    from reprpo_pl.hparams import OptunaPruning

    callback = OptunaPruning(storage="sqlite://", study_name="s", pruner=None, monitor="train/acc", every_n_steps=2)
    callback.trial = RecordingTrial()
    values = [0.0, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0, 0.0]  # as if optimizer steps ended batches 1, 3, 5 and 7
    for b, value in enumerate(values):
        trainer = SimpleNamespace(callback_metrics={"train/acc": value}, global_step=(b + 1) // 2, is_global_zero=True,
                                  strategy=SimpleNamespace(broadcast=lambda obj, src: obj))
        callback.on_train_batch_end(trainer, None, None, None, b)
    assert callback.trial.reports == [(0.5, 2), (0.75, 4)]  # batches 0-3 (steps 1-2), then 4-7 (steps 3-4)


def test_pruning_options_are_checked():
    from reprpo_pl.errors import UserError

    cfg = compose_config("train", ["model=tiny_random"])
    OmegaConf.update(cfg, "callbacks.optuna_pruning", {"every_n_steps": 0}, force_add=True)
    with pytest.raises(UserError, match=r"callbacks.optuna_pruning.every_n_steps=0 must be a positive integer"):
        validate_train_config(cfg)
    from reprpo_pl.validation import check_group_choices

    with pytest.raises(UserError, match=r"hparams_search=_optuna matches no config file .*use one of dpo, innerdpo, "):
        check_group_choices({"hparams_search": "_optuna"})  # the shared part is not a search


def test_storage_records_the_sweepers_tell_of_a_pruned_trial_as_pruned(tmp_path):
    """As the sweeper drives it: ask, the job (another storage instance) reports and marks the trial, the sweeper
    tells COMPLETE with the job's return value. The sweeper's own study (whose cache TPE reads) sees it PRUNED."""
    from reprpo_pl.hparams import PRUNED_ATTR, pruned_trial_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=pruned_trial_storage(url), direction="maximize")
    kept, pruned = study.ask(), study.ask()
    job = optuna.load_study(study_name="s", storage=url)
    for trial, value in ((kept, 0.25), (pruned, 0.5)):
        job_trial = optuna.trial.Trial(job, trial._trial_id)
        job_trial.report(value, 3)
        if trial is pruned:
            job_trial.set_system_attr(PRUNED_ATTR, 3)
    study.tell(kept, 1.5)
    study.tell(pruned, 0.5)
    for trials in (study.trials, optuna.load_study(study_name="s", storage=url).trials):  # the cache, then the database
        assert [(t.state.name, t.value, t.intermediate_values) for t in trials] == [
            ("COMPLETE", 1.5, {3: 0.25}), ("PRUNED", 0.5, {3: 0.5})]


def test_configured_pruner_stops_a_falling_trial_below_the_median():
    """PatientPruner(MedianPruner, patience 5) of _optuna.yaml on a maximised study, after 5 trials at 0.5: a trial
    whose last 6 reports are all below an earlier best, and whose best is below the median, is pruned at its 7th
    report; one whose best is above the median, one that is still improving, and one flat (no fall), are not."""
    cfg = compose_config("train", ["hparams_search=dpo", "model=tiny_random"], return_hydra_config=True)
    study = optuna.create_study(direction="maximize", pruner=instantiate(cfg.callbacks.optuna_pruning.pruner))
    for _ in range(5):
        trial = study.ask()
        for step in range(1, 11):
            trial.report(0.5, step)
        study.tell(trial, 0.0)

    def first_pruned_step(values: list[float]) -> int | None:
        trial = study.ask()
        for step, value in enumerate(values, start=1):
            trial.report(value, step)
            if trial.should_prune():
                return step
        return None

    assert first_pruned_step([0.3] + [0.2] * 9) == 7
    assert first_pruned_step([0.9] + [0.8] * 9) is None
    assert first_pruned_step([0.2 + 0.02 * s for s in range(10)]) is None
    assert first_pruned_step([0.2] * 10) is None
