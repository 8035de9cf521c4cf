"""Tokenisation and batching layout (SPEC §1.4): prompt left-padded/left-truncated, completions
right-padded/right-truncated, masks from lengths, one shared prompt/completion boundary column."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from datasets import Dataset

from reprpo_pl.data.collator import PreferenceCollator
from reprpo_pl.data.tokenize import TokenizeConfig, tokenize_pairs
from reprpo_pl.errors import UserError
from reprpo_pl.models.pair_layouts import concat_pairs

PLAIN = TokenizeConfig(max_length=128, max_prompt_length=64, chat_template=False)


def _one(prompt: str, chosen: str, rejected: str) -> Dataset:
    return Dataset.from_dict({"prompt": [prompt], "chosen": [chosen], "rejected": [rejected]})


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def rows(pairs, tokenizer) -> list[dict]:
    return list(tokenize_pairs(pairs, tokenizer, PLAIN))


@pytest.fixture
def batch(rows, tokenizer) -> dict[str, torch.Tensor]:
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows)


def test_tokenize_plain_ids(pairs, tokenizer, rows):
    """Without a template: prompt as the tokenizer encodes it, completion + eos."""
    assert len(rows) == len(pairs)
    for row, text in zip(rows, pairs):
        assert row["prompt_ids"] == tokenizer(text["prompt"])["input_ids"]
        for role in ("chosen", "rejected"):
            assert row[f"{role}_ids"] == _ids(tokenizer, text[role]) + [tokenizer.eos_token_id]


def test_prompt_left_padded_completions_right_padded(rows, batch):
    B, P = batch["prompt_ids"].shape
    C = batch["chosen_ids"].shape[1]
    assert B == len(rows)
    assert batch["rejected_ids"].shape == (B, C), "chosen and rejected share one width"
    assert C == max(len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids"))
    assert P == max(len(r["prompt_ids"]) for r in rows)
    assert len({len(r["prompt_ids"]) for r in rows}) > 1 and len({len(r["chosen_ids"]) for r in rows}) > 1
    for i, r in enumerate(rows):
        n = len(r["prompt_ids"])
        assert batch["prompt_ids"][i, P - n :].tolist() == r["prompt_ids"]
        assert batch["prompt_mask"][i].tolist() == [False] * (P - n) + [True] * n
        for role in ("chosen", "rejected"):
            m = len(r[f"{role}_ids"])
            assert batch[f"{role}_ids"][i, :m].tolist() == r[f"{role}_ids"]
            assert batch[f"{role}_mask"][i].tolist() == [True] * m + [False] * (C - m)
    assert batch["prompt_mask"].dtype == batch["chosen_mask"].dtype == torch.bool


def test_boundary_column_identical(rows, batch):
    """Every row's last prompt token sits at column P-1 and its first completion token at column P."""
    P = batch["prompt_ids"].shape[1]
    inputs = concat_pairs(batch)
    assert inputs["attention_mask"][:, P - 1].all()
    assert inputs["attention_mask"][:, P].all()  # every completion has ≥ 1 token
    last_prompt = torch.tensor([r["prompt_ids"][-1] for r in rows] * 2)
    first_completion = torch.tensor([r["chosen_ids"][0] for r in rows] + [r["rejected_ids"][0] for r in rows])
    assert torch.equal(inputs["input_ids"][:, P - 1], last_prompt)
    assert torch.equal(inputs["input_ids"][:, P], first_completion)


def test_masks_from_lengths_not_pad_ids(tokenizer, rows, batch):
    """pad == eos here, and each completion ends with eos: that eos must be inside completion_mask,
    which a `ids != pad_id` mask would drop."""
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    for role in ("chosen", "rejected"):
        ids, mask = batch[f"{role}_ids"], batch[f"{role}_mask"]
        lengths = torch.tensor([len(r[f"{role}_ids"]) for r in rows])
        assert torch.equal(mask.sum(-1), lengths)
        last = ids[torch.arange(len(rows)), lengths - 1]
        assert (last == eos).all() and mask[torch.arange(len(rows)), lengths - 1].all()
        assert not torch.equal(mask, ids != tokenizer.pad_token_id)


def test_chat_prompt_containing_pad_id_is_fully_masked(pairs, tokenizer):
    """The chat template puts <|im_end|> (== pad) inside the prompt; the prompt mask still covers it."""
    rows = list(tokenize_pairs(pairs, tokenizer, TokenizeConfig(max_length=256, max_prompt_length=128)))
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    lengths = torch.tensor([len(r["prompt_ids"]) for r in rows])
    assert torch.equal(batch["prompt_mask"].sum(-1), lengths)
    real = batch["prompt_ids"][batch["prompt_mask"]]
    assert (real == tokenizer.pad_token_id).any()


def test_concat_pairs_layout(rows, batch):
    B, P = batch["prompt_ids"].shape
    out = concat_pairs(batch)
    C = batch["chosen_ids"].shape[1]
    assert out["input_ids"].shape == out["attention_mask"].shape == out["position_ids"].shape == (2 * B, P + C)
    assert torch.equal(out["input_ids"][:B, :P], batch["prompt_ids"])
    assert torch.equal(out["input_ids"][B:, :P], batch["prompt_ids"])
    assert torch.equal(out["input_ids"][:B, P:], batch["chosen_ids"])  # rows 0..B-1 chosen
    assert torch.equal(out["input_ids"][B:, P:], batch["rejected_ids"])  # rows B..2B-1 rejected
    assert torch.equal(out["completion_ids"], torch.cat([batch["chosen_ids"], batch["rejected_ids"]]))
    assert torch.equal(out["completion_mask"], torch.cat([batch["chosen_mask"], batch["rejected_mask"]]))
    assert torch.equal(out["attention_mask"][:, :P], batch["prompt_mask"].repeat(2, 1))
    assert torch.equal(out["attention_mask"][:, P:], out["completion_mask"])
    for i in range(2 * B):
        real = out["attention_mask"][i]
        # positions count only real tokens: 0, 1, ..., n-1 across the prompt/completion join
        assert out["position_ids"][i][real].tolist() == list(range(int(real.sum())))
        role = "chosen" if i < B else "rejected"
        assert out["completion_ids"][i][out["completion_mask"][i]].tolist() == rows[i % B][f"{role}_ids"]


def test_index_passes_through(rows, tokenizer):
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)([{**r, "index": 10 + i} for i, r in enumerate(rows)])
    assert batch["index"].tolist() == [10 + i for i in range(len(rows))]


def test_prompt_left_truncation_keeps_end(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(60)) + " the end?"
    full = tokenizer(prompt)["input_ids"]
    cfg = TokenizeConfig(max_length=32, max_prompt_length=10, chat_template=False)
    (row,) = tokenize_pairs(_one(prompt, " Yes.", " No."), tokenizer, cfg)
    assert len(full) > 10
    assert row["prompt_ids"] == full[-10:]
    assert tokenizer.decode(row["prompt_ids"]).endswith("the end?")
    assert row["chosen_ids"] == _ids(tokenizer, " Yes.") + [tokenizer.eos_token_id]  # completions untouched


def test_completion_right_truncation_fits_max_length(tokenizer):
    prompt = "Tell me a story."
    long = " Once upon a time there was a small village by a river, and every morning the baker sang."
    cfg = TokenizeConfig(max_length=16, max_prompt_length=8, chat_template=False)
    (row,) = tokenize_pairs(_one(prompt, long, " No."), tokenizer, cfg)
    n_prompt = len(row["prompt_ids"])
    budget = 16 - n_prompt
    assert n_prompt + len(row["chosen_ids"]) == 16  # truncated exactly to the budget
    assert row["chosen_ids"] == _ids(tokenizer, long)[:budget]  # keeps the start, eos is cut off
    assert row["rejected_ids"] == _ids(tokenizer, " No.") + [tokenizer.eos_token_id]
    assert n_prompt + len(row["rejected_ids"]) <= 16


def test_truncated_count_logged(tokenizer, caplog):
    long = " " + " ".join(f"w{i}" for i in range(40))
    ds = Dataset.from_dict({
        "prompt": ["Short?", "Also short?", "Short again?"],
        "chosen": [long, " Fine.", " Fine too."],
        "rejected": [" Nope.", long, " No."],
    })
    cfg = TokenizeConfig(max_length=24, max_prompt_length=8, chat_template=False)
    with caplog.at_level(logging.INFO, logger="reprpo_pl.data.tokenize"):
        out = tokenize_pairs(ds, tokenizer, cfg, name="trunc")
    assert len(out) == 3
    msg = next(r.getMessage() for r in caplog.records if "truncated" in r.getMessage())
    assert re.search(r"\b2/3 rows truncated", msg), msg
    assert re.search(r"\b0 dropped", msg), msg


def test_rows_identical_after_truncation_dropped(tokenizer, caplog):
    common = " " + " ".join(f"step{i}" for i in range(30))
    ds = Dataset.from_dict({
        "prompt": ["Q1?", "Q2?"],
        "chosen": [common + " then yes.", " Good."],
        "rejected": [common + " then no.", " Bad."],
    })
    cfg = TokenizeConfig(max_length=20, max_prompt_length=6, chat_template=False)
    with caplog.at_level(logging.INFO, logger="reprpo_pl.data.tokenize"):
        out = tokenize_pairs(ds, tokenizer, cfg, name="dup")
    assert out["prompt"] == ["Q2?"]  # row 0's completions differ only after the cut
    msg = next(r.getMessage() for r in caplog.records if "dropped" in r.getMessage())
    assert re.search(r"\b1 dropped", msg), msg


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_length": 64, "max_prompt_length": 64},
        {"max_length": 64, "max_prompt_length": 100},
        {"max_length": 0, "max_prompt_length": 8},
        {"max_length": 64, "max_prompt_length": 0},
        {"max_length": -5, "max_prompt_length": -10},
    ],
)
def test_bad_lengths_raise_user_error(kwargs):
    with pytest.raises(UserError):
        TokenizeConfig(**kwargs)


def test_chat_template_on_off(pairs, tokenizer):
    on = tokenize_pairs(pairs, tokenizer, TokenizeConfig(max_length=256, max_prompt_length=128, chat_template=True))
    off = tokenize_pairs(pairs, tokenizer, TokenizeConfig(max_length=256, max_prompt_length=128, chat_template=False))
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for row_on, row_off, text in zip(on, off, pairs):
        assert row_on["prompt_ids"] != row_off["prompt_ids"]
        decoded_on = tokenizer.decode(row_on["prompt_ids"])
        assert row_on["prompt_ids"][0] == im_start and decoded_on.startswith("<|im_start|>")
        assert f"<|im_start|>user\n{text['prompt']}<|im_end|>" in decoded_on
        assert decoded_on.endswith("<|im_start|>assistant\n")  # generation prompt: the completion is the assistant turn
        assert row_off["prompt_ids"][0] != im_start
        assert tokenizer.decode(row_off["prompt_ids"]) == text["prompt"]
        assert row_on["chosen_ids"] == row_off["chosen_ids"] and row_on["rejected_ids"] == row_off["rejected_ids"]
