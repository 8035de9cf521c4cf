"""Evaluate preference accuracy on every shift target at epoch end (and, on a subset, every N steps as curves);
write results at the end of training."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import Dataset
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from reprpo_pl.data.datamodule import PreferenceDataModule, eval_batches
from reprpo_pl.data.sources import subset_rows
from reprpo_pl.errors import NonFiniteError, UserError
from reprpo_pl.eval.base_cache import BaseScoreCache, open_base_cache
from reprpo_pl.eval.metrics import SUMMARY_KEYS, objective, shift_summary, target_metrics
from reprpo_pl.eval.pair_scores import PairScores
from reprpo_pl.eval.results import non_finite, per_row_records, run_label, write_curves, write_per_row, write_results
from reprpo_pl.eval.scorer import RowScores, score_pairs

log = logging.getLogger(__name__)


def evaluate_targets(model: Any, datamodule: PreferenceDataModule, base_cache: dict[str, RowScores] | None = None,
                     disk_cache: BaseScoreCache | None = None, eval_sets: dict[str, Dataset] | None = None,
                     rank: int = 0, world_size: int = 1, keep_scores: dict[str, tuple[RowScores, RowScores]] | None = None,
                     ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Score base and adapter on each target's eval set (``eval_sets``, default the datamodule's; `eval_subsets`
    gives the cheap ones of the step-level curves). ``base_cache`` (target → base scores of those rows) skips
    the base pass for targets already scored: the base model never changes during training. ``disk_cache``
    does the same across runs: a target's base scores are read from it when present, written to it (by rank 0)
    when not.

    Distributed (``world_size`` > 1, every rank calling this): rank ``rank`` scores its `eval_batches` of each
    target and `PairScores` gathers every rank's rows, so every rank returns what a single process would.

    Returns the per-target metric rows and, per target, the per-pair records (`per_row_records`); ``keep_scores``, when
    given, receives each target's ``(base, adapter)`` `RowScores` (``[N]`` each, in eval-set order)."""
    base_cache = {} if base_cache is None else base_cache
    eval_sets = datamodule.eval_sets if eval_sets is None else eval_sets
    device = next(model.parameters()).device
    rows, per_row = [], {}
    for target in datamodule.targets:
        pairs = eval_sets[target.name]
        base_known, key = base_cache.get(target.name), None
        if base_known is None and disk_cache is not None:
            key = disk_cache.key(pairs)
            base_known = disk_cache.load(key, len(pairs))
            if base_known is not None:
                log.info("eval %s: base scores from cache (%s)", target.name, disk_cache.path(key))
        shard = eval_batches(pairs, datamodule.eval_batch_size, rank, world_size)
        loader = DataLoader(pairs, batch_sampler=shard, collate_fn=datamodule.collator)
        scores = score_pairs(model, loader, with_base=base_known is None, desc=f"eval {target.name}")
        index = torch.tensor([i for batch in shard for i in batch], dtype=torch.long)
        gathered = PairScores(len(pairs), sync_on_compute=world_size > 1).to(device)
        gathered.update(index, scores["base"] if base_known is None else base_known.select(index), scores["adapter"])
        base, adapter = gathered.rows()
        if key is not None and base_known is None and rank == 0:
            disk_cache.save(key, base)
        base_cache[target.name] = base
        if keep_scores is not None:
            keep_scores[target.name] = (base, adapter)
        rows.append({"target": target.name, "shift": target.shift, **target_metrics(base, adapter),
                     **datamodule.eval_counts[target.name]})  # n_truncated, n_dropped by tokenisation
        ids = datamodule.eval_text[target.name]["id"]
        per_row[target.name] = per_row_records([ids[i] for i in pairs["index"]], base, adapter)
    return rows, per_row


def eval_subsets(datamodule: PreferenceDataModule, n: int, seed: int) -> dict[str, Dataset]:
    """Each target's eval set cut to ``n`` pairs (all if fewer) for the step-level curves: drawn by ``seed``
    (``eval.seed``, so every run and every step scores the same pairs), kept in the eval set's order."""
    out = {}
    for name, pairs in datamodule.eval_sets.items():
        keep = subset_rows(len(pairs), n, seed)
        out[name] = pairs if len(keep) == len(pairs) else pairs.select(keep)
    return out


def build_results(cfg: Any, targets: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The results.json document (schema in the README)."""
    shifts = shift_summary(targets)
    value, floored_because = objective(shifts, targets, cfg.eval.objective_shifts, cfg.eval.coherence_limit,
                                       cfg.eval.objective_floor)
    return {
        "label": run_label(cfg),
        "method": cfg.method.name,
        "transform": cfg.transform.name if cfg.get("transform") is not None else None,
        "loss": cfg.loss.name if cfg.get("loss") is not None else None,
        "model": cfg.model.name,
        "dataset": cfg.dataset.source,
        "seed": int(cfg.seed),
        "n_train": int(cfg.data.n_train),
        **extra,
        "objective": value,
        "objective_floored_because": floored_because,  # null unless the objective is eval.objective_floor
        "targets": targets,
        "shifts": shifts,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


TARGET_COLUMNS = ["target", "shift", "n", *SUMMARY_KEYS]
SHIFT_COLUMNS = ["shift", "n_targets", "n", *SUMMARY_KEYS]


def log_results_tables(loggers: list[Any], results: dict[str, Any]) -> None:
    """Log the per-target and per-shift tables (``results/targets``, ``results/shifts``) and the
    objective to every WandbLogger among ``loggers``; other loggers get the scalars from `_evaluate`."""
    from lightning.pytorch.loggers import (
        WandbLogger,  # no wandb import unless that logger is in use
    )

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table("results/targets", columns=TARGET_COLUMNS,
                             data=[[t.get(c) for c in TARGET_COLUMNS] for t in results["targets"]])
            logger.log_table("results/shifts", columns=SHIFT_COLUMNS,
                             data=[[name, *(s.get(c) for c in SHIFT_COLUMNS[1:])] for name, s in results["shifts"].items()])
            logger.experiment.summary["objective"] = results["objective"]


class ShiftEvalCallback(L.Callback):
    """At each epoch end (every ``every_n_epochs``) evaluate all targets of the source's shift table
    and log ``eval/<shift>/<target>/<metric>``; at the end of training evaluate once more if the
    weights changed since, then write results.json/results.md into the trainer's root dir, and before them the
    per-pair records ``eval/<target>.jsonl``.

    With ``every_n_steps``, every that many optimizer steps (and at the last step) also score ``n_samples_during``
    pairs per target (`eval_subsets`), log them as ``curve/<shift>[/<target>]/<metric>`` and write the points to
    ``curves.jsonl`` (`write_curves`) before results.json: one run then gives a whole in-domain vs out-of-domain
    accuracy curve for the report.

    Under DDP every rank runs these hooks: each scores its shard of every target (`evaluate_targets`), the
    rows are gathered to every rank, and rank 0 alone logs and writes."""

    def __init__(self, every_n_epochs: int = 1, write: bool = True, every_n_steps: int | None = None,
                 n_samples_during: int = 8):
        for name, value, nullable in (("every_n_steps", every_n_steps, True), ("n_samples_during", n_samples_during, False)):
            if (value is None and not nullable) or (value is not None and (type(value) is not int or value < 1)):
                raise UserError(f"{name}={value!r} must be a positive integer{' or null (no curves)' if nullable else ''}, "
                                f"e.g. callbacks.shift_eval.every_n_steps=10 eval.n_samples_during=8")
        self.every_n_epochs = every_n_epochs
        self.write = write
        self.every_n_steps, self.n_samples_during = every_n_steps, n_samples_during
        self.base_cache: dict[str, RowScores] = {}
        self.curve_base_cache: dict[str, RowScores] = {}  # base scores of the curves' subsets
        self.curve: list[dict[str, Any]] = []  # the curves' points so far (`curve_point`), checkpointed
        self.disk_cache: BaseScoreCache | None = None  # base scores of earlier runs ($REPRPO_SCORE_CACHE)
        self.last: tuple[int, list[dict[str, Any]]] | None = None  # (global_step, targets)
        self.last_scores: dict[str, tuple[RowScores, RowScores]] = {}  # target → (base, adapter) of that evaluation
        self.per_row: dict[str, list[dict[str, Any]]] = {}  # target → per-pair records of the last evaluation
        self.results: dict[str, Any] | None = None
        self.started: float | None = None  # perf_counter at train start
        self.eval_s = 0.0  # seconds spent scoring targets
        self.earlier = {"train_s": 0.0, "eval_s": 0.0}  # seconds of a resumed run's earlier processes (checkpointed)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.started, self.eval_s = time.perf_counter(), 0.0

    def timing(self) -> dict[str, float]:
        """Wall seconds of training and of scoring so far, over every process of a resumed run (work
        redone after a kill counts; the time between a kill and the resume does not)."""
        fit_s = time.perf_counter() - self.started if self.started is not None else self.eval_s  # fit skipped: eval only
        return {"train_s": self.earlier["train_s"] + fit_s - self.eval_s, "eval_s": self.earlier["eval_s"] + self.eval_s}

    def state_dict(self) -> dict[str, Any]:
        return {**self.timing(), "curve": self.curve}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.earlier = {k: float(state_dict.get(k, 0.0)) for k in self.earlier}
        self.curve = list(state_dict.get("curve", []))

    def _open_disk_cache(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Before the first base pass: the base scores of earlier runs."""
        if self.disk_cache is None:
            self.disk_cache = open_base_cache(pl_module.model, pl_module.cfg.trainer.precision,
                                              trainer.datamodule.eval_batch_size, trainer.datamodule.tokenizer.pad_token_id)

    def _evaluate(self, trainer: L.Trainer, pl_module: Any) -> list[dict[str, Any]]:
        if self.last is not None and self.last[0] == trainer.global_step:
            return self.last[1]
        started = time.perf_counter()
        self._open_disk_cache(trainer, pl_module)
        with trainer.precision_plugin.forward_context():  # the training steps' precision (bf16 autocast under bf16-mixed)
            self.last_scores = {}
            targets, self.per_row = evaluate_targets(pl_module.model, trainer.datamodule, self.base_cache, self.disk_cache,
                                                     rank=trainer.global_rank, world_size=trainer.world_size,
                                                     keep_scores=self.last_scores)
        self.eval_s += time.perf_counter() - started
        metrics = {f"eval/{t['shift']}/{t['target']}/{k}": v for t in targets
                   for k, v in t.items() if isinstance(v, float)}
        for name, summary in shift_summary(targets).items():
            metrics.update({f"eval/{name}/{k}": v for k, v in summary.items() if isinstance(v, float)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.last = (trainer.global_step, targets)
        return targets

    def curve_point(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Score the curves' subsets (`eval_subsets`) at this step, log them as ``curve/...`` and keep the point
        ``{step, epoch, n_samples_during, targets, shifts}`` (the rows and summaries of results.json) in `curve`.
        When every target was fully evaluated at this step (the last step, after the epoch-end evaluation), the
        point is those scores on the subsets' rows: no second pass."""
        started = time.perf_counter()
        seed = int(pl_module.cfg.eval.get("seed", 0))
        datamodule = trainer.datamodule
        if self.last is not None and self.last[0] == trainer.global_step and set(self.last_scores) >= {t.name for t in datamodule.targets}:
            targets = []
            for target in datamodule.targets:
                base, adapter = self.last_scores[target.name]
                keep = torch.tensor(subset_rows(len(base.logp_cho), self.n_samples_during, seed), dtype=torch.long)
                targets.append({"target": target.name, "shift": target.shift, **target_metrics(base.select(keep), adapter.select(keep)),
                                **datamodule.eval_counts[target.name]})
        else:
            self._open_disk_cache(trainer, pl_module)
            subsets = eval_subsets(datamodule, self.n_samples_during, seed)
            with trainer.precision_plugin.forward_context():
                targets, _ = evaluate_targets(pl_module.model, datamodule, self.curve_base_cache, self.disk_cache, subsets,
                                              rank=trainer.global_rank, world_size=trainer.world_size)
        self.eval_s += time.perf_counter() - started
        shifts = shift_summary(targets)
        metrics = {f"curve/{t['shift']}/{t['target']}/{k}": v for t in targets for k, v in t.items() if isinstance(v, float)}
        for name, summary in shifts.items():
            metrics.update({f"curve/{name}/{k}": v for k, v in summary.items() if isinstance(v, float)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.curve.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                           "n_samples_during": self.n_samples_during, "targets": targets, "shifts": shifts})

    def _curve_due(self, trainer: L.Trainer, last: bool = False) -> bool:
        """Whether this step gets a curve point: every ``every_n_steps`` steps and the last one, once per step."""
        step = trainer.global_step
        return (self.every_n_steps is not None and step > 0
                and (last or step % self.every_n_steps == 0) and not (self.curve and self.curve[-1]["step"] == step))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if self._curve_due(trainer):  # after each optimizer step (a micro-batch of an accumulated step: same step, skipped)
            self.curve_point(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = trainer.global_step - 1  # the last optimizer step; its update is checked by no later loss
        bad = [n for n, p in pl_module.named_parameters() if p.requires_grad and not bool(p.detach().isfinite().all())]
        if bad:
            raise NonFiniteError(f"diverged at step {step}: non-finite parameter {bad[0]} after the last optimizer step; lower method.lr")
        targets = self._evaluate(trainer, pl_module)
        if self._curve_due(trainer, last=True):  # after the evaluation, whose scores it reuses
            self.curve_point(trainer, pl_module)
        timing = {k: round(v, 1) for k, v in self.timing().items()}  # wall seconds
        results = build_results(pl_module.cfg, targets, global_step=trainer.global_step, epoch=trainer.current_epoch,
                                timing=timing)
        if bad := non_finite({"targets": results["targets"], "shifts": results["shifts"]}):
            raise NonFiniteError(f"diverged at step {step}: non-finite eval scores ({', '.join(bad[:3])}); lower method.lr")
        self.results = results
        if trainer.is_global_zero:
            log_results_tables(trainer.loggers, self.results)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        """results.json last: after every ``on_train_end`` (Lightning runs ModelCheckpoint's, which
        writes the final last.ckpt, after all other callbacks'; AdapterExport's writes adapter/)."""
        if trainer.is_global_zero and self.results is not None and self.write:
            write_per_row(Path(trainer.default_root_dir), self.per_row)
            if self.curve:
                write_curves(Path(trainer.default_root_dir), self.curve)
            markdown = write_results(Path(trainer.default_root_dir), self.results)
            log.info("results written to %s", trainer.default_root_dir)
            print("\n" + markdown)
