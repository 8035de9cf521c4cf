"""Tokenise preference pairs per SPEC §1.4: prompt and completion separately, prompt left-truncated,
completions right-truncated so prompt + completion ≤ max_length."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from datasets import Dataset
from datasets.utils.logging import disable_progress_bar
from transformers import PreTrainedTokenizerBase

from reprpo_pl.errors import UserError

log = logging.getLogger(__name__)
disable_progress_bar()  # a bar per tiny map/filter is noise; the log line below says what happened


@dataclass(frozen=True)
class TokenizeConfig:
    max_length: int = 256
    max_prompt_length: int = 128
    chat_template: bool = True  # GENIES prompt → user turn, completion → assistant turn
    add_eos: bool = True  # end each completion with eos, as TRL does

    def __post_init__(self) -> None:
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"data.{name}={value!r} must be a positive number of tokens, e.g. data.{name}=256")
        if not isinstance(self.chat_template, bool):
            raise UserError(f"data.chat_template={self.chat_template!r} must be true or false")
        if self.max_prompt_length >= self.max_length:
            raise UserError(
                f"data.max_prompt_length={self.max_prompt_length} must be < data.max_length={self.max_length}: "
                "lower max_prompt_length or raise max_length"
            )


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool) -> str:
    """The prompt text the model sees: the chat user turn plus generation prompt, or the raw text."""
    if chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return prompt


def tokenize_pairs(pairs: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: TokenizeConfig, name: str = "") -> Dataset:
    """Map ``prompt/chosen/rejected`` text columns to ``prompt_ids/chosen_ids/rejected_ids`` token lists
    (`tokenize_with_counts` without the counts)."""
    return tokenize_with_counts(pairs, tokenizer, cfg, name)[0]


def tokenize_with_counts(pairs: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: TokenizeConfig, name: str = ""
                         ) -> tuple[Dataset, dict[str, int]]:
    """`tokenize_pairs`'s dataset and ``{"n_truncated", "n_dropped"}``: rows cut to fit ``max_prompt_length`` /
    ``max_length``, and rows dropped because their completions are empty or identical after truncation (both
    logged). An empty prompt becomes the tokenizer's BOS (EOS where it has none)."""
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    use_special = not (cfg.chat_template and tokenizer.chat_template)
    # an empty prompt (an ETHICS utilitarianism pair without a shared prefix, chat template off) gets a
    # one-token context: else the first completion token is "predicted" from a padding column of the
    # batch (left padding), so its score would depend on the other rows
    context = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def encode(row: dict) -> dict:
        prompt = tokenizer(format_prompt(tokenizer, row["prompt"], cfg.chat_template), add_special_tokens=use_special)["input_ids"]
        if not prompt:
            if context is None:
                raise UserError(f"{name or 'data'}: a row has an empty prompt and the tokenizer has neither a BOS nor an "
                                "EOS token to give it a context; use a tokenizer with one, or data.chat_template=true")
            prompt = [context]
        truncated = len(prompt) > cfg.max_prompt_length
        prompt = prompt[-cfg.max_prompt_length :]
        budget = cfg.max_length - len(prompt)
        out = {"prompt_ids": prompt}
        for role in ("chosen", "rejected"):
            ids = tokenizer(row[role], add_special_tokens=False)["input_ids"]
            ids = ids + eos if ids else ids
            truncated |= len(ids) > budget
            out[f"{role}_ids"] = ids[:budget]
        out["truncated"] = truncated
        out["keep"] = len(out["chosen_ids"]) > 0 and len(out["rejected_ids"]) > 0 and out["chosen_ids"] != out["rejected_ids"]
        return out

    if len(pairs) == 0:  # map() on an empty dataset adds no columns
        empty = pairs.add_column("prompt_ids", []).add_column("chosen_ids", []).add_column("rejected_ids", [])
        return empty, {"n_truncated": 0, "n_dropped": 0}
    tokenized = pairs.map(encode)
    n_truncated = sum(tokenized["truncated"])
    kept = tokenized.filter(lambda keep: keep, input_columns="keep")
    dropped = len(tokenized) - len(kept)
    if n_truncated or dropped:
        log.info("%s: %d/%d rows truncated to max_length=%d; %d dropped (empty or identical completions after truncation)",
                 name, n_truncated, len(tokenized), cfg.max_length, dropped)
    return kept.remove_columns(["truncated", "keep"]), {"n_truncated": n_truncated, "n_dropped": dropped}
