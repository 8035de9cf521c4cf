"""One DataModule for every method: the source's training pairs and each shift target's test pairs."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import lightning as L
from datasets import Dataset
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from transformers import PreTrainedTokenizerBase

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.sources import (Target, load_pairs, parse_shift_table, split_target_name, split_train_val,
                                    subset_rows)
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_with_counts
from reprpo_pl.errors import MissingDataError, RunSkipped, UserError

log = logging.getLogger(__name__)

TRAIN_SHIFT = "train"  # the in-sample row: not a shift type of the table (SHIFT_TYPES), added to every run's targets
VAL_SHIFT = "validation"  # data.n_val pairs held out of the source's train split (a run's own rows, like TRAIN_SHIFT)
MISSING_TARGETS = ("error", "skip")  # eval.missing_targets: what a target whose file is not on disk does


def in_sample_target(source: str) -> Target:
    """The in-sample row of ``source``'s results: ``<source>@train`` (the ``<name>@<split>`` spelling), shift ``train``."""
    return Target(name=f"{source}@train", shift=TRAIN_SHIFT)


def validation_target(source: str) -> Target:
    """The held-out row of ``source``'s results (``data.n_val`` > 0): ``<source>@val``, shift ``validation``."""
    return Target(name=f"{source}@val", shift=VAL_SHIFT)


def load_targets(table: list[Target], missing: str, **kwargs: Any) -> tuple[list[Target], dict[str, Dataset]]:
    """The test pairs of each target (``name@split`` reads that split), keyword arguments as `load_pairs`.

    A target whose file is not on disk fails the run with one line naming the path and the fix
    (``missing="error"``), or is left out with a warning naming it (``"skip"``, SPEC §1.3). Under ``skip``, a
    table whose out-of-domain targets are all missing raises `RunSkipped`: the run would measure nothing."""
    found: dict[str, Dataset] = {}
    for target in table:
        try:
            found[target.name] = load_pairs(*split_target_name(target.name), **kwargs)
        except MissingDataError as err:
            if missing == "error":
                raise MissingDataError(f"target {target.name}: {err}; fix the data path, drop it from dataset.targets, "
                                       "or set eval.missing_targets=skip to skip it") from None
            log.warning("skipping target %s (%s; eval.missing_targets=skip): %s", target.name, target.shift, err)
    out_of_domain = [t.name for t in table if t.shift != "in_domain"]
    if out_of_domain and not any(name in found for name in out_of_domain):
        raise RunSkipped(f"run skipped: every out-of-domain target ({', '.join(out_of_domain)}) is missing "
                         "(eval.missing_targets=skip)")
    return [t for t in table if t.name in found], found


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name}={value!r} must be a positive integer, e.g. {name}=4")
    return value


class _TrainLoader(StatefulDataLoader):
    """torchdata's `StatefulDataLoader`, except that a state saved after the last batch of an epoch
    starts the next epoch. Lightning ends an epoch after ``len(loader)`` batches without asking for
    another, so the iterator never raises StopIteration and such a state reads "epoch not finished,
    nothing left": torchdata would resume that empty epoch and the run would skip a whole epoch. The
    shuffle needs nothing else from the state (the sampler's permutation is set by seed and epoch)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # ``_num_yielded``: batches yielded this epoch by the single-process iterator (num_workers=0 here)
        if state_dict.get("_num_yielded", 0) >= len(self):
            state_dict = {}
        super().load_state_dict(state_dict)


class PreferenceDataModule(L.LightningDataModule):
    """Text pairs are read (and validated) at construction, before the model loads; tokenisation
    happens in `setup` once ``tokenizer`` is set."""

    def __init__(self, data: Mapping[str, Any], dataset: Mapping[str, Any], eval: Mapping[str, Any]):
        super().__init__()
        self.batch_size = _positive("data.batch_size", data["batch_size"])
        self.eval_batch_size = _positive("eval.batch_size", eval["batch_size"])
        n_train = _positive("data.n_train", data["n_train"])
        n_eval = _positive("eval.n_samples", eval["n_samples"])
        self.tokenize_cfg = TokenizeConfig(
            max_length=data["max_length"], max_prompt_length=data["max_prompt_length"], chat_template=data["chat_template"]
        )
        roots = {"genies_root": data.get("root"), "ethics_root": data.get("ethics_root")}
        self.source: str = dataset["source"]
        table = parse_shift_table(dataset)
        missing = eval.get("missing_targets", "error")
        if missing not in MISSING_TARGETS:
            raise UserError(f"eval.missing_targets={missing!r} must be one of {', '.join(MISSING_TARGETS)}, "
                            "e.g. eval.missing_targets=skip")
        n_val = data.get("n_val") or 0
        if isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 0:
            raise UserError(f"data.n_val={n_val!r} must be a non-negative integer (0 = no validation slice)")
        try:
            if n_val:  # the same training rows as without a slice; the slice comes from the rows left over
                self.train_text, val_text = split_train_val(
                    load_pairs(self.source, "train", **roots, seed=data.get("seed", 0)), n_train, n_val,
                    seed=data.get("seed", 0), val_seed=eval.get("seed", 0), label=f"{self.source}/train")
            else:
                self.train_text = load_pairs(self.source, "train", n=n_train, seed=data.get("seed", 0), **roots)
        except MissingDataError as err:
            if missing == "skip":  # e.g. a benchmark's target-tuned run on a distribution this copy lacks
                raise RunSkipped(f"run skipped: source {self.source} has no training data ({err}; eval.missing_targets=skip)") from None
            raise
        # evaluation rows are fixed by eval.seed, not the run's seed, so every run scores the same pairs
        table, self.eval_text = load_targets(table, missing, n=n_eval, seed=eval.get("seed", 0), **roots)
        # the in-sample row first (the journal's first column): eval.n_samples of the pairs this run trains on,
        # picked in `setup` among those that survive tokenisation
        self.targets: list[Target] = [in_sample_target(self.source), *table]
        if n_val:  # after the in-sample row: the held-out slice of the same split, then the test targets
            self.targets.insert(1, validation_target(self.source))
            self.eval_text = {validation_target(self.source).name: val_text, **self.eval_text}
        self.n_eval, self.eval_seed = n_eval, eval.get("seed", 0)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._loader_state: dict[str, Any] | None = None  # from a checkpoint, for the next train_dataloader()
        self.train_set: Dataset | None = None
        self.eval_sets: dict[str, Dataset] = {}
        self.eval_counts: dict[str, dict[str, int]] = {}  # target → n_truncated, n_dropped by tokenisation (results.json)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("set datamodule.tokenizer before setup()")
        if self.train_set is not None:
            return
        self.train_set, _ = self._tokenize(self.train_text, f"{self.source}/train")
        train_target = in_sample_target(self.source)
        if train_target in self.targets:
            kept = self.train_set.select(subset_rows(len(self.train_set), self.n_eval, self.eval_seed))["index"]
            self.eval_text = {train_target.name: self.train_text.select(list(kept)), **self.eval_text}
        for name, text in self.eval_text.items():
            self.eval_sets[name], self.eval_counts[name] = self._tokenize(text, name if "@" in name else f"{name}/test")

    def _tokenize(self, pairs: Dataset, name: str) -> tuple[Dataset, dict[str, int]]:
        """Token ids of ``pairs`` and how many rows were truncated (``n_truncated``) and dropped (``n_dropped``)."""
        pairs = pairs.add_column("index", list(range(len(pairs))))
        tokenized, counts = tokenize_with_counts(pairs, self.tokenizer, self.tokenize_cfg, name)
        if len(tokenized) == 0:
            cfg = self.tokenize_cfg
            raise UserError(
                f"{name}: no pairs left after tokenisation: every completion was cut to nothing behind a prompt of up to "
                f"data.max_prompt_length={cfg.max_prompt_length} in data.max_length={cfg.max_length} tokens "
                "(or chosen = rejected); raise data.max_length or lower data.max_prompt_length"
            )
        return tokenized.select_columns(["index", "prompt_ids", "chosen_ids", "rejected_ids"]), counts

    @property
    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled by torchdata's `StatefulDistributedSampler`: torch's `DistributedSampler` (a permutation
        seeded by ``seed + epoch``, one shard per rank; Lightning calls `set_epoch`, and keeps a
        DistributedSampler as it is in DDP instead of wrapping it) that counts the indices it yielded. The
        loader's ``state_dict`` (that count) goes into every checkpoint, so a run resumed mid-epoch
        continues with exactly the batches it had not trained on yet."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # the run's seed (seed_everything exports it), as Lightning's own DistributedSampler uses
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = StatefulDistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        loader = _TrainLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collator)
        if self._loader_state is not None:
            loader.load_state_dict(self._loader_state)
            self._loader_state = None
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, saved in checkpoints. Lightning's fit loop saves it too, but
        restores it only if the loader is built after the checkpoint is loaded; ``configure_optimizers``
        asks for ``trainer.estimated_stepping_batches``, which builds it before (Lightning 2.6, issue
        #20550), and the resumed run would restart the epoch. The data module's state is loaded before
        the strategy setup (DDP and single device), so `train_dataloader` can apply it."""
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        return {"train_loader": loader.state_dict()} if isinstance(loader, StatefulDataLoader) else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loader_state = state_dict.get("train_loader")

    def row_ids(self, target: str) -> list[str]:
        """The ``id`` (``<distribution>/<split>/<index in the file>``) of each pair of ``eval_dataloader(target)``, in order."""
        ids = self.eval_text[target]["id"]
        return [ids[i] for i in self.eval_sets[target]["index"]]

    def eval_dataloader(self, target: str, rank: int = 0, world_size: int = 1) -> DataLoader:
        """``target``'s eval pairs in `eval_batches` (``rank``'s share of them under DDP): length order, so a
        loader's rows are not in eval-set order; ``loader.batch_sampler`` lists each batch's row positions."""
        pairs = self.eval_sets[target]
        return DataLoader(pairs, batch_sampler=eval_batches(pairs, self.eval_batch_size, rank, world_size),
                          collate_fn=self.collator)


def eval_batches(pairs: Dataset, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The batches (lists of row positions in ``pairs``) that score a tokenised eval set, ``rank``'s share.

    Rows go in order of their longer completion's length, then their prompt's (ties in eval-set order), cut
    into ``batch_size`` rows: a packed row is ``[prompt | chosen | rejected]`` padded to the batch's longest of
    each, and grouping similar lengths cuts the padded tokens by 17% and the attention's work by 29% on the
    study's math targets (batch 8). Under DDP the batches are dealt round-robin, so every pair is scored in the
    same batch (same padding, same numbers) as in a single process; a rank may get none."""
    columns = pairs.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
    lengths = [(max(len(c), len(r)), len(p))
               for p, c, r in zip(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"])]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return batches[rank::world_size]
