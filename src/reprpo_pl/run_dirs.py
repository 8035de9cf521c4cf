"""A run directory belongs to one run (issue 14 classes 3 and 9).

A start is refused in a directory that holds another run's files (anything beyond Hydra's bookkeeping),
unless ``ckpt_path=`` points into it (resume; the checkpoint's config is compared in
``methods/base.py``). With ``skip_finished=true`` (grid resume) a directory whose results.json was
trained with the same settings is skipped, one with a last.ckpt of the same settings and no
results.json resumes from it, and one with neither restarts.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from reprpo_pl.errors import UserError

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
    directory holds another run. Reads only: it never writes into ``run_dir``."""
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
    held = "results.json" if results_path.is_file() else "a checkpoint" if last.is_file() else "another run's files"
    resume = f", or ckpt_path={last} to resume that run" if last.is_file() else ""
    grid = ", or skip_finished=true to skip its finished jobs and resume the rest" if sweep else ""
    raise UserError(f"{run_dir} holds {held} of another run; use a new {new_dir}{resume}{grid}")


def task_config(config: DictConfig) -> dict[str, Any]:
    """The resolved sections of a composed Hydra config that `plan_run` compares (the rest, e.g. a
    logger's ``${hydra:runtime.output_dir}``, cannot resolve before the job starts)."""
    from reprpo_pl.methods.base import TRAINING_SECTIONS

    keys = (*TRAINING_SECTIONS, "trainer", "ckpt_path")
    return {k: (OmegaConf.to_container(config[k], resolve=True) if isinstance(config[k], DictConfig) else config[k])
            for k in keys if k in config}


class RunDirGuard(Callback):
    """Hydra callback (conf/train.yaml ``hydra.callbacks``): refuse a single run in another run's
    directory in ``on_run_start``, before Hydra writes ``.hydra/`` and train.log there (``on_job_start``
    comes after those writes); one ``error:`` line, exit 2. A failed job of a multirun is logged as one
    line when it ends."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from reprpo_pl.config import EXIT_USER_ERROR

        run_dir = Path(str(config.hydra.run.dir))  # ${now:} is cached: the dir run_job will use
        try:
            plan_run(run_dir, task_config(config), bool(config.get("skip_finished")))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.FAILED and config.hydra.mode is not None and str(config.hydra.mode).endswith("MULTIRUN"):
            error = job_return._return_value
            log.error(f"job {config.hydra.job.num} failed ({' '.join(job_return.overrides)}): "
                      f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
