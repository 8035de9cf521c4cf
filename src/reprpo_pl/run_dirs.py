"""A run directory belongs to one run, and sweeps survive their failures (issue 14 classes 3 and 9).

A start is refused in a directory that holds another run's files (anything beyond Hydra's bookkeeping),
unless ``ckpt_path=`` points into it (resume; the checkpoint's config is compared in
``methods/base.py``). With ``skip_finished=true`` (grid resume) a directory whose results.json was
trained with the same settings is skipped, one with a last.ckpt of the same settings and no
results.json resumes from it, and one with neither restarts. A grid is checked whole before its first
job; a failed job is one line when it fails and the grid goes on; an Optuna study's trials left
RUNNING by a killed sweep are marked failed when the next sweep starts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from reprpo_pl.errors import EXIT_NON_FINITE, EXIT_USER_ERROR, NonFiniteError, Preempted, UserError
from reprpo_pl.validation import check_benchmark_run

log = logging.getLogger(__name__)
BOOKKEEPING = {".hydra", "train.log", "eval.log"}


def holds_only_bookkeeping(run_dir: Path) -> bool:
    """True when ``run_dir`` holds nothing but Hydra's bookkeeping and empty folders (a logger's)."""
    return all(p.name in BOOKKEEPING or (p.is_dir() and not any(f.is_file() for f in p.rglob("*")))
               for p in run_dir.iterdir())


@dataclass(frozen=True)
class Plan:
    """What a start in a run directory does: ``fresh`` (train), ``resume`` (from ``ckpt_path``) or
    ``skip`` (a finished run of the same settings; ``results`` is its results.json)."""

    action: Literal["fresh", "resume", "skip"]
    ckpt_path: str | None = None
    results: dict[str, Any] | None = None


def plan_run(run_dir: Path, cfg: dict[str, Any], skip_finished: bool, sweep: bool = False) -> Plan:
    """The `Plan` for starting the resolved task config ``cfg`` in ``run_dir``; `UserError` when the
    directory holds another run. Reads only: it never writes into ``run_dir``. A DDP worker (``LOCAL_RANK`` > 0)
    comes to rank 0's plan: it sees the same results.json and checkpoint, and rank 0's new logs are not refused."""
    from reprpo_pl.methods.base import training_config_difference

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or holds_only_bookkeeping(run_dir):
        return Plan("fresh", cfg.get("ckpt_path"))
    ckpt = cfg.get("ckpt_path")
    if ckpt and Path(ckpt).resolve().is_relative_to(run_dir.resolve()):
        return Plan("resume", ckpt)  # methods/base.py refuses a checkpoint trained with other settings
    results_path, last = run_dir / "results.json", run_dir / "checkpoints" / "last.ckpt"
    new_dir = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    if skip_finished:
        if results_path.is_file():
            results = json.loads(results_path.read_text())
            if difference := training_config_difference(results.get("config") or {}, cfg):
                raise UserError(f"{run_dir} holds another run ({difference.replace('the checkpoint', 'its results.json')}); "
                                f"use a new {new_dir}")
            return Plan("skip", results=results)
        if last.is_file():
            import torch

            stored = (torch.load(last, map_location="cpu", weights_only=False).get("hyper_parameters") or {}).get("cfg")
            if difference := training_config_difference(stored or {}, cfg):
                raise UserError(f"{run_dir} holds another run's checkpoint ({difference}); use a new {new_dir}")
            return Plan("resume", str(last))
        return Plan("fresh")  # killed before its first checkpoint: nothing of it to keep
    if os.environ.get("LOCAL_RANK", "0") != "0":
        # a DDP worker that Lightning relaunched into rank 0's run dir: rank 0 checked it, then wrote its logs
        return Plan("fresh", ckpt)
    held = "results.json" if results_path.is_file() else "a checkpoint" if last.is_file() else "files"
    resume = f", or ckpt_path={last} to resume that run" if last.is_file() and not sweep else ""
    grid = ", or skip_finished=true to skip its finished jobs and resume the rest" if sweep else ""
    raise UserError(f"{run_dir} holds {held} of another run; use a new {new_dir}{resume}{grid}")


def task_config(config: DictConfig) -> dict[str, Any]:
    """The resolved sections of a composed Hydra config that `plan_run` compares (the rest, e.g. a
    logger's ``${hydra:runtime.output_dir}``, cannot resolve before the job starts)."""
    from reprpo_pl.methods.base import TRAINING_SECTIONS

    keys = (*TRAINING_SECTIONS, "trainer", "ckpt_path")
    return {k: (OmegaConf.to_container(config[k], resolve=True) if isinstance(config[k], DictConfig) else config[k])
            for k in keys if k in config}


def grid_jobs(config: DictConfig) -> list[list[str]]:
    """The override lists of a BasicSweeper grid's jobs, in job-number order, built as
    ``BasicSweeper.sweep`` builds them (its params, then the command line's overrides)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # Hydra's grid sweeper lives there
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    arguments = [*params, *OmegaConf.to_container(config.hydra.overrides.task)]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    return [job for batch in BasicSweeper.split_arguments(parser.parse_overrides(arguments), None) for job in batch]


def exit_code(error: BaseException) -> int:
    """The exit status the CLI gives ``error`` (config.run_cli's mapping); 1 for a bug."""
    if isinstance(error, Preempted):
        return error.exit_code
    return EXIT_NON_FINITE if isinstance(error, NonFiniteError) else EXIT_USER_ERROR if isinstance(error, UserError) else 1


class RunDirGuard(Callback):
    """Hydra callback (conf/train.yaml ``hydra.callbacks``) that keeps runs out of each other's directories
    and reports a grid's failures.

    - A single run in another run's directory is refused in ``on_run_start``, before Hydra writes
      ``.hydra/`` and train.log there (``on_job_start`` comes after those writes): one ``error:`` line, exit 2.
    - A BasicSweeper grid whose ``hydra.sweep.dir`` exists is checked job by job in ``on_multirun_start``,
      before anything of the sweep is written (Hydra rewrites ``multirun.yaml`` and each job's ``.hydra/``
      when the job starts): any refused job refuses the whole grid, one ``error:`` line per job, exit 2.
    - A failed job is one line in the sweep's log when it ends; the grid goes on with its other jobs, and
      after the last one prints one ``error:`` line per failed job and exits with the first one's code.
      A preempted or interrupted job (SIGTERM, Ctrl-C) stops the sweep at once with the resume command.
      Grids run as one batch (Hydra's ``max_batch_size: null``), so the last job number is the grid's size − 1.
    """

    def __init__(self) -> None:
        self.multirun = False
        self.jobs: list[list[str]] | None = None  # the grid's overrides per job; None but in a BasicSweeper multirun
        self.failures: list[tuple[int, str, BaseException]] = []  # (job number, its swept overrides, its error)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir))  # ${now:} is cached: the dir run_job will use
        try:
            check_benchmark_run(config)  # else plan_run fails resolving the dataset that benchmark.run picks
            plan_run(run_dir, task_config(config), bool(config.get("skip_finished")))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        self.multirun = True
        if not str(config.hydra.sweeper._target_).endswith(".BasicSweeper"):
            return  # an Optuna trial gets a new folder per invocation; run_job checks it
        self.jobs = grid_jobs(config)
        sweep_dir = Path(str(config.hydra.sweep.dir))  # resolves (and caches) ${now:} for every job, as the sweeper will
        if not sweep_dir.is_dir():
            return
        refused = []
        for num, overrides in enumerate(self.jobs):
            job = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
            with open_dict(job):
                job.hydra.job.num = job.hydra.job.id = num
            try:
                plan_run(sweep_dir / str(job.hydra.sweep.subdir), task_config(job), bool(job.get("skip_finished")), sweep=True)
            except UserError as e:
                refused.append(f"error: {e}")
        if refused:
            print("\n".join(refused), file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not self.multirun:
            return
        num = int(config.hydra.job.num)
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # `return_value` re-raises it
            overrides = " ".join(self.swept(num) if self.jobs else job_return.overrides)
            message = str(error).splitlines()[0] if str(error) else ""
            log.error(f"job {num} failed ({overrides}): {type(error).__name__}: {message}",
                      exc_info=error if exit_code(error) == 1 else None)  # a bug keeps its traceback
            self.failures.append((num, overrides, error))
            if isinstance(error, Preempted):  # the next job would be stopped too, or killed mid-way
                self.exit(config, f"the sweep stopped at job {num}")
        if self.jobs and num == len(self.jobs) - 1 and self.failures:
            self.exit(config, f"{len(self.failures)} of {len(self.jobs)} jobs failed")

    def swept(self, num: int) -> list[str]:
        """Job ``num``'s overrides of the keys that vary across the grid (all of them for a one-job grid)."""
        assert self.jobs is not None
        varying = [o for o in self.jobs[num] if any(o not in other for other in self.jobs)]
        return varying or self.jobs[num]

    def exit(self, config: DictConfig, summary: str) -> None:
        """One ``error:`` line per failed job, the command that retries them, and the first failure's exit code."""
        lines = [f"error: job {num} failed ({overrides}): {str(error).splitlines()[0] if str(error) else type(error).__name__}"
                 for num, overrides, error in self.failures]
        lines.append(f"error: {summary}; rerun with hydra.sweep.dir={config.hydra.sweep.dir} skip_finished=true to "
                     "skip the finished jobs and run (or resume) the rest")
        print("\n".join(lines), file=sys.stderr)
        sys.exit(exit_code(self.failures[0][2]))


class FailStaleTrials(Callback):
    """Hydra callback (conf/hparams_search/*.yaml): when an Optuna sweep starts, mark the study's trials
    still RUNNING as FAIL. The hydra-optuna-sweeper drives trials with ``study.ask``/``study.tell``, so
    Optuna's heartbeat never beats and a trial whose process was killed stays RUNNING forever. Assumes
    one sweep process per study (a second, concurrent sweep's trials would be marked too)."""

    def __init__(self, storage: str, study_name: str) -> None:
        self.storage, self.study_name = storage, study_name

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import optuna
        from optuna.trial import TrialState

        try:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        except KeyError:  # a new study
            return
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in stale:
            study.tell(trial.number, state=TrialState.FAIL)
        if stale:
            log.warning(f"marked {len(stale)} trial(s) of study {self.study_name} failed that a killed sweep left "
                        f"RUNNING: {', '.join(str(t.number) for t in stale)}")


class EvalDirGuard(Callback):
    """Hydra callback (conf/eval.yaml): refuse an ``out_dir`` that holds another run's files (an earlier
    evaluation's results.json, or a training run), in ``on_run_start``, before Hydra writes there."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        out_dir = Path(str(config.hydra.run.dir))  # = out_dir, ${now:} cached
        if out_dir.is_dir() and not holds_only_bookkeeping(out_dir):
            held = "results.json" if (out_dir / "results.json").is_file() else "files"
            print(f"error: out_dir={out_dir} holds {held} of another run; use a new out_dir (the default, "
                  "<run dir>/eval/<date>_<time>, is new for each evaluation)", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
