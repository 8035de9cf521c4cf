"""One DataModule for every method: the source's training pairs and each shift target's test pairs."""

from __future__ import annotations

import math
import os
from typing import Any, Iterator, Mapping

import lightning as L
from datasets import Dataset
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.sources import Target, load_pairs, parse_shift_table
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.errors import UserError


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name}={value!r} must be a positive integer, e.g. {name}=4")
    return value


class ResumableShuffleSampler(DistributedSampler):
    """Torch's `DistributedSampler` (a permutation seeded by ``seed + epoch``, a shard per rank; Lightning
    calls `set_epoch`, and keeps it in DDP instead of wrapping it) that can skip the first indices of its
    next pass: a run resumed mid-epoch then sees exactly the rows the interrupted run had not reached.
    ``len`` stays the full shard, so Lightning's step counts (and the LR schedule) match an uninterrupted run."""

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._skip = 0

    def skip_once(self, n_indices: int) -> None:
        self._skip = n_indices

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


class _ResumableDataLoader(DataLoader):
    """Tells Lightning the loader resumes mid-epoch (it checks for ``state_dict``/``load_state_dict`` and
    otherwise warns that a mid-epoch resume is unreliable). The position itself is saved by
    `PreferenceDataModule.state_dict` and applied to the sampler when the loader is built."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


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
        self.targets: list[Target] = parse_shift_table(dataset)
        self.train_text = load_pairs(self.source, "train", n=n_train, seed=data.get("seed", 0), **roots)
        # evaluation rows are fixed by eval.seed, not the run's seed, so every run scores the same pairs
        self.eval_text = {t.name: load_pairs(t.name, "test", n=n_eval, seed=eval.get("seed", 0), **roots) for t in self.targets}
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._train_sampler: ResumableShuffleSampler | None = None
        self._epoch_seen: tuple[int, int] = (0, 0)  # (shuffle epoch, batches of it trained on)
        self._resume_state: dict[str, Any] | None = None
        self.train_set: Dataset | None = None
        self.eval_sets: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("set datamodule.tokenizer before setup()")
        if self.train_set is not None:
            return
        self.train_set = self._tokenize(self.train_text, f"{self.source}/train")
        self.eval_sets = {name: self._tokenize(text, f"{name}/test") for name, text in self.eval_text.items()}

    def _tokenize(self, pairs: Dataset, name: str) -> Dataset:
        pairs = pairs.add_column("index", list(range(len(pairs))))
        tokenized = tokenize_pairs(pairs, self.tokenizer, self.tokenize_cfg, name)
        if len(tokenized) == 0:
            cfg = self.tokenize_cfg
            raise UserError(
                f"{name}: no pairs left after tokenisation: every completion was cut to nothing behind a prompt of up to "
                f"data.max_prompt_length={cfg.max_prompt_length} in data.max_length={cfg.max_length} tokens "
                "(or chosen = rejected); raise data.max_length or lower data.max_prompt_length"
            )
        return tokenized.select_columns(["index", "prompt_ids", "chosen_ids", "rejected_ids"])

    @property
    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by `ResumableShuffleSampler`: the order depends only on (seed, epoch), and a run
        resumed from a mid-epoch checkpoint continues with the batches it had not trained on yet."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # the run's seed (seed_everything exports it), as Lightning's own DistributedSampler uses
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self._train_sampler = ResumableShuffleSampler(self.train_set, num_replicas=world, rank=rank, seed=seed)
        if self._resume_state is not None:
            epoch, seen = self._resume_state["epoch"], self._resume_state["batches_seen"]
            per_epoch = math.ceil(self._train_sampler.num_samples / self.batch_size)
            if seen >= per_epoch:  # saved at the end of an epoch: start the next one
                epoch, seen = epoch + 1, 0
            self._train_sampler.set_epoch(epoch)
            self._train_sampler.skip_once(seen * self.batch_size)
            self._epoch_seen = (epoch, seen)
            self._resume_state = None
        return _ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=self._train_sampler, collate_fn=self.collator)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches taken in the current epoch (not the ones prefetched)."""
        if self.trainer is not None and self.trainer.training and self._train_sampler is not None:
            epoch, seen = self._epoch_seen
            epoch_now = self._train_sampler.epoch
            self._epoch_seen = (epoch_now, seen + 1 if epoch_now == epoch else 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the epoch of the shuffle and how many of its batches were trained on."""
        epoch, seen = self._epoch_seen
        return {"epoch": epoch, "batches_seen": seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = dict(state_dict)

    def eval_dataloader(self, target: str) -> DataLoader:
        return DataLoader(self.eval_sets[target], batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collator)
