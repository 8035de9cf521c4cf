"""Optuna pruning for the searches of conf/hparams_search/ (hydra-optuna-sweeper 1.3 has no pruner: its
``create_study`` takes none; facebookresearch/hydra#1710, #1954).

The sweeper asks its study for a trial, launches the trial's job with the trial's parameters as overrides
and tells the study COMPLETE (the job's return value) or FAIL; nothing in between. Pruning therefore runs
inside the job, as Optuna intends it in an objective function (``trial.report`` / ``trial.should_prune``):

- `OptunaPruning` (a Lightning callback) finds the job's trial in the study's storage (the RUNNING trial
  whose parameters are this job's overrides), reports ``monitor`` averaged over every ``every_n_steps``
  optimizer steps, and asks ``pruner`` (e.g. PatientPruner(MedianPruner)) whether to stop. If so it marks
  the trial and raises `TrialPruned`: training stops without the final evaluation, so a pruned run writes
  no results.json (report.py never mistakes it for a finished one), and the job returns the last value.
- `pruned_trial_storage` is the study's storage (``hydra.sweeper.storage``, which the sweeper passes to
  ``optuna.create_study``): it records the sweeper's tell of a marked trial as PRUNED (with the job's
  intermediate values) instead of COMPLETE, so TPE sees the trial as pruned at the step where it stopped.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig

from reprpo_pl.errors import UserError

log = logging.getLogger(__name__)

PRUNED_ATTR = "reprpo_pl:pruned_at_step"  # trial system attr set by the job, read by the sweeper's storage


class TrialPruned(Exception):
    """Raised by `OptunaPruning` to stop an Optuna trial's training; ``value`` is its last intermediate value."""

    def __init__(self, message: str, value: float) -> None:
        super().__init__(message)
        self.value = value


class OptunaPruning(L.Callback):
    """Report ``monitor`` (a metric the module logs every training step, e.g. ``train/rewards/accuracies``,
    averaged over the last ``every_n_steps`` optimizer steps) to this job's Optuna trial, and stop the run
    when ``pruner`` prunes it. Only in a job of an Optuna sweep (conf/hparams_search/); ``every_n_steps`` is
    checked with the other numbers (validation.py)."""

    def __init__(self, storage: str, study_name: str, pruner: Any, monitor: str = "train/rewards/accuracies",
                 every_n_steps: int = 10) -> None:
        self.storage, self.study_name, self.pruner = storage, study_name, pruner
        self.monitor, self.every_n_steps = monitor, every_n_steps
        self.trial: Any = None
        self._values: list[float] = []
        self._reported_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        import optuna

        if trainer.is_global_zero:  # rank 0 reports and decides; the other ranks follow its decision
            study = optuna.load_study(study_name=self.study_name, storage=self.storage, pruner=self.pruner)
            self.trial = optuna.trial.Trial(study, job_trial(study, list(HydraConfig.get().overrides.task))._trial_id)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise UserError(f"callbacks.optuna_pruning.monitor={self.monitor} is not a logged training metric; use one "
                            f"of: {', '.join(sorted(trainer.callback_metrics))}")
        self._values.append(float(value))
        step = trainer.global_step
        if step % self.every_n_steps or step == self._reported_step:  # mid-window, or a batch of an accumulated step
            return
        self._reported_step = step
        mean = sum(self._values) / len(self._values)
        self._values.clear()
        prune = False
        if trainer.is_global_zero:
            self.trial.report(mean, step)
            prune = self.trial.should_prune()
            if prune:
                self.trial.set_system_attr(PRUNED_ATTR, step)
        if trainer.strategy.broadcast(prune, src=0):
            number = self.trial.number if self.trial is not None else "?"
            raise TrialPruned(f"pruned: Optuna trial {number} of study {self.study_name} stopped at step {step} "
                              f"({self.monitor} {mean:.4g}; no final evaluation)", mean)


def job_trial(study: Any, overrides: list[str]) -> Any:
    """The RUNNING trial of ``study`` whose parameters are all among this job's ``overrides`` (the sweeper
    passes each as ``name=value``); the latest if several match."""
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    mine = [t for t in running if t.params and {f"{k}={v}" for k, v in t.params.items()} <= set(overrides)]
    if not mine:
        raise UserError(f"no RUNNING trial of Optuna study {study.study_name} has this job's parameters "
                        f"({' '.join(overrides)}); callbacks.optuna_pruning works only in hparams_search sweeps")
    return max(mine, key=lambda t: t.number)


def pruned_trial_storage(url: str) -> Any:
    """Optuna's storage for ``url`` (a cached RDB storage, as ``optuna.create_study(storage=url)`` builds),
    except that the sweeper's tell (COMPLETE or FAIL) of a trial whose job set `PRUNED_ATTR` is recorded
    as PRUNED, and that a told trial's cached copy gets the intermediate values its job reported. A subclass
    of optuna's ``_CachedStorage``, whose in-process cache is what the sampler reads (the sweeper pins
    optuna < 3). ``hydra.sweeper.storage`` in conf/hparams_search/_optuna.yaml; Hydra builds it with the sweeper."""
    from optuna.storages import RDBStorage, _CachedStorage
    from optuna.trial import TrialState

    class PrunedTrialStorage(_CachedStorage):
        def __repr__(self) -> str:  # the sweeper logs "Storage: <this>"
            return f"PrunedTrialStorage({url})"

        def set_trial_state(self, trial_id: int, state: TrialState) -> bool:
            if state.is_finished():
                job = self._backend.get_trial(trial_id)  # what the job wrote past this process's cache
                for step, value in job.intermediate_values.items():  # into the cache the sampler reads
                    self.set_trial_intermediate_value(trial_id, step, value)
                if PRUNED_ATTR in job.system_attrs:
                    state = TrialState.PRUNED
            return super().set_trial_state(trial_id, state)

    return PrunedTrialStorage(RDBStorage(url))
