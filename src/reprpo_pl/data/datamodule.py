"""One DataModule for every method: the source's training pairs and each shift target's test pairs."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.sources import Target, load_pairs, parse_shift_table
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.errors import UserError


def _positive(name: str, value: Any) -> int:
    if value is None or int(value) <= 0:
        raise UserError(f"{name}={value} must be a positive integer")
    return int(value)


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
            raise UserError(f"{name}: no pairs left after tokenisation; raise data.max_length")
        return tokenized.select_columns(["index", "prompt_ids", "chosen_ids", "rejected_ids"])

    @property
    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=self.collator)

    def eval_dataloader(self, target: str) -> DataLoader:
        return DataLoader(self.eval_sets[target], batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collator)
