"""Train one method on one source and evaluate it on every shift target.

    python -m reprpo_pl.train [method=innerdpo] [transform=ether] [model=smollm2_135m] [dataset=math] ...
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from reprpo_pl.checkpoint_io import ResumableCheckpoint
from reprpo_pl.config import CONF_PATH, run_cli
from reprpo_pl.data.datamodule import PreferenceDataModule
from reprpo_pl.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted, RunSkipped, UserError
from reprpo_pl.eval.callback import ShiftEvalCallback
from reprpo_pl.hparams import TrialPruned
from reprpo_pl.progress import quiet_third_party
from reprpo_pl.run_dirs import plan_run
from reprpo_pl.validation import check_benchmark_run, validate_train_config

log = logging.getLogger(__name__)


def _ensure_dir(path: str) -> str:
    """``${ensure_dir:...}``: create the folder and return its path (the Optuna sweeper opens its sqlite
    storage in the sweep dir before Hydra's launcher creates that dir)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def _optuna_seed(seed: int, storage: str, study_name: str) -> int:
    """``${optuna_seed:...}``: ``seed`` plus the number of trials already in the study, so a resumed
    study draws new start-up trials instead of replaying the first run's (same command → same seeds)."""
    import optuna

    try:
        return int(seed) + len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:  # no such study yet
        return int(seed)


@functools.cache
def _launch_time(pattern: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """``${launch_time:}``: when this process first asked, fixed for all of its jobs (Hydra's ``${now:}`` is
    re-evaluated for every job of a multirun)."""
    return datetime.now().strftime(pattern)


for _name, _fn in (("ensure_dir", _ensure_dir), ("optuna_seed", _optuna_seed), ("launch_time", _launch_time)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Fit ``cfg.method`` and return the results document (also written to ``run_dir``)."""
    validate_train_config(cfg)  # numbers, combinations and optional-group names, before data or model load
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    quiet_third_party()
    datamodule = PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)  # validates data before the model loads
    try:
        module_cls = get_class(cfg.method._target_)
    except ImportError:
        raise UserError(f"method._target_={cfg.method._target_} cannot be imported; pick a method from conf/method/") from None
    module = module_cls(cfg)
    datamodule.tokenizer = module.tokenizer
    datamodule.setup("fit")  # tokenisation errors surface before Lightning's banner
    callbacks = []
    progress_bar = bool(cfg.trainer.get("enable_progress_bar", True))
    for name, cb_cfg in cfg.callbacks.items():
        kwargs = {"dirpath": run_dir / "checkpoints"} if name == "checkpoint" else {}
        callback = instantiate(cb_cfg, **kwargs)
        if progress_bar or not isinstance(callback, ProgressBar):  # Lightning refuses a bar with enable_progress_bar=false
            callbacks.append(callback)
    loggers = [instantiate(lg, save_dir=str(run_dir)) for lg in cfg.logger.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers,
                                     detect_anomaly=bool(cfg.debug.detect_anomaly))
    failed = True
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        evaluator = next((cb for cb in callbacks if isinstance(cb, ShiftEvalCallback)), None)
        if evaluator is None:  # `~callbacks.shift_eval`: train only
            log.warning("callbacks.shift_eval is off: trained without evaluation, no results.json; evaluate with "
                        "python -m reprpo_pl.eval ckpt_path=%s", run_dir)
        elif evaluator.results is None:  # fit returned without training (its loop was done); every rank: the final evaluation is sharded
            finish_trained_run(cfg, trainer, module)
        failed = False
    except TrialPruned:  # an Optuna trial that callbacks.optuna_pruning stopped: not a failure, no results
        failed = False
        raise
    except SIGTERMException:  # Lightning stops fit after the step in progress and exits 0 by default
        checkpoint = next((cb for cb in callbacks if isinstance(cb, ResumableCheckpoint)), None)
        stopped_by = (checkpoint.stopped_by if checkpoint is not None else None) or "SIGTERM"
        what = "interrupted (Ctrl-C)" if stopped_by == "SIGINT" else "preempted (SIGTERM)"
        raise Preempted(f"{what} at step {trainer.global_step}; resume with ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                        EXIT_INTERRUPTED if stopped_by == "SIGINT" else EXIT_PREEMPTED) from None
    finally:
        finish_wandb(failed)
    return (evaluator.results if evaluator is not None else None) or {}


def finish_trained_run(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule) -> None:
    """``ckpt_path`` holds the final step (fit had nothing left to train): if that run's results were
    never written (killed during its final evaluation), run the end-of-training hooks now — final
    evaluation, adapter export, results.json — else there is nothing to do."""
    ckpt = Path(str(cfg.ckpt_path)) if cfg.ckpt_path else None
    if ckpt is None or (ckpt.parent.parent / "results.json").is_file():
        raise UserError(nothing_to_do(cfg, trainer.global_step))
    log.info("%s is the final step of a run whose results were never written: evaluating it", ckpt)
    for hook in ("on_train_end", "on_fit_end"):  # in Lightning's callback order (ModelCheckpoint last)
        for callback in trainer.callbacks:
            getattr(callback, hook)(trainer, module)


def nothing_to_do(cfg: DictConfig, step: int) -> str:
    """Why a fit that returned without training wrote no results."""
    limits = f"trainer.max_epochs={cfg.trainer.max_epochs} trainer.max_steps={cfg.trainer.max_steps}"
    if cfg.ckpt_path:
        return (f"nothing to do: ckpt_path={cfg.ckpt_path} is a finished run (step {step}, {limits} reached); its "
                "results.json is in its run dir, or raise trainer.max_epochs to train further")
    return f"nothing to do: {limits} trains no step; use a positive limit (-1 for none)"


def finish_wandb(failed: bool = False) -> None:
    """Close the wandb run, if one is open, so the next job of a multirun starts its own (WandbLogger
    would silently reuse it); a failed job is marked failed. lightning-hydra-template's task_wrapper."""
    wandb = sys.modules.get("wandb")  # only if a WandbLogger imported it
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return run_cli(lambda: run_job(cfg, run_dir, multirun), run_dir=run_dir, multirun=multirun)


def run_job(cfg: DictConfig, run_dir: Path, multirun: bool) -> float:
    """Train in ``run_dir`` as `plan_run` says (a single run and a grid's jobs were already checked
    before Hydra wrote there, by `RunDirGuard`): skip a finished run of the same settings, resume a
    killed one, refuse another's."""
    check_benchmark_run(cfg)  # before plan_run resolves the dataset it interpolates
    plan = plan_run(run_dir, OmegaConf.to_container(cfg, resolve=True), bool(cfg.skip_finished), sweep=multirun)
    if plan.action == "skip":
        log.info(f"skipped: finished ({run_dir / 'results.json'})")
        return optimized_value(plan.results or {}, cfg.optimized_metric)
    if plan.action == "resume" and plan.ckpt_path != cfg.ckpt_path:
        log.info(f"resuming from {plan.ckpt_path} (skip_finished=true)")
        cfg.ckpt_path = plan.ckpt_path
    try:
        return optimized_value(train(cfg, run_dir), cfg.optimized_metric)
    except TrialPruned as pruned:  # the sweeper records the trial as PRUNED (reprpo_pl.hparams)
        log.info(str(pruned))
        return pruned.value
    except RunSkipped as skipped:  # eval.missing_targets=skip and its data is missing: not a failure, no results
        log.warning(str(skipped))
        return float("nan")
    finally:
        release_job_memory()


def release_job_memory() -> None:
    """Free the finished job's model, optimizer and trainer before a multirun's next job starts. They sit in
    reference cycles (trainer ↔ module ↔ callbacks) that only Python's full collection frees, which may not come
    for several jobs: a grid of SmolLM2 runs held 9 GB after three jobs and its steps slowed from 6 to 9 s."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def optimized_value(results: dict[str, Any], key: str) -> float:
    """``results[key]`` as the float a sweeper optimises (``objective`` is always finite); NaN when
    training stopped before writing results (Optuna records that trial as failed)."""
    if not results:
        return float("nan")
    value = results.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        numeric = ", ".join(k for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise UserError(f"optimized_metric={key} is not a number in results.json ({value!r}); use one of: {numeric}")
    return float(value)


if __name__ == "__main__":
    main()
