"""Shared fixtures: composed configs (`compose_train`, `cfg_train`), the SmolLM2 tokenizer, a tiny
random Llama with the same vocabulary (bare and with a LoRA adapter), and a handful of hand-written
preference pairs."""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import pytest
import torch
from datasets import Dataset
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

import reprpo_pl.config  # noqa: F401  (registers the resolvers the configs use, e.g. ${precision:})
from reprpo_pl.models.loading import SMOLLM2_GGUF, add_lora, convert_gguf
from reprpo_pl.models.tiny import tiny_llama

# base-model scores cached by the tests stay in a temporary folder of this session (and reach the CLI subprocesses),
# not in the user's ~/.cache; a test that needs its own cache sets REPRPO_SCORE_CACHE itself
os.environ.setdefault("REPRPO_SCORE_CACHE", tempfile.mkdtemp(prefix="reprpo-score-cache-"))

# Tiny-model ops are dominated by threading overhead on a 2-core box: one thread is ~10x faster.
# Tests that run the real model in-process raise this themselves; CLI subprocesses are unaffected.
torch.set_num_threads(1)

# r=8 keeps the tiny adapter small; the rest matches conf/adapter/lora.yaml (SPEC §4)
TINY_LORA = {"r": 8, "lora_alpha": 16, "use_rslora": True, "lora_dropout": 0.0, "target_modules": "all-linear"}

CONF_MODULE = "reprpo_pl.conf"
# train.yaml on the tiny random Llama, on CPU, for two optimiser steps of two pairs
TINY_TRAIN = ["model=tiny_random", "adapter.r=8", "trainer.accelerator=cpu", "trainer.max_steps=2", "data.n_train=4",
              "data.batch_size=2", "eval.n_samples=2", "callbacks.generations.enabled=false"]


def compose_config(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """``config_name`` (train, eval) with ``overrides``, composed as the CLI composes it: from the
    installed package ``reprpo_pl.conf`` (Hydra's ``pkg://`` search path), not from a file path."""
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def compose_train(overrides: Sequence[str] = (), precision: str | None = "32-true") -> DictConfig:
    """train.yaml with ``overrides`` (pass `TINY_TRAIN` for the tiny CPU run). Modules built from it run outside
    Lightning's autocast, so ``trainer.precision`` is 32-true unless an override or ``precision`` (None = the
    machine's default, `${precision:}`) sets it: under bf16-mixed the frozen base is stored in bf16
    (`cast_frozen_linears`), and these tests check fp32 identities (layouts, pool-first, TRL)."""
    if precision is not None and not any(o.startswith("trainer.precision=") for o in overrides):
        overrides = [*overrides, f"trainer.precision={precision}"]
    return compose_config("train", overrides)


@pytest.fixture
def cfg_train() -> DictConfig:
    """train.yaml composed with `TINY_TRAIN` (the default method, innerdpo, on the tiny model, 2 CPU steps);
    a fresh copy per test, so a test may edit it."""
    return compose_train(TINY_TRAIN)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (pad == eos == <|im_end|>, with a chat template).

    Session-scoped: tests must not mutate it (deep-copy it first if a library would)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(convert_gguf(SMOLLM2_GGUF))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh, deterministic tiny random Llama (fp32, eval mode) with SmolLM2's vocabulary."""
    return tiny_llama(vocab_size=len(tokenizer)).eval()


@pytest.fixture
def tiny_peft(tiny_model):
    """`tiny_model` wrapped in LoRA (r=8, all-linear) with lora_B drawn from N(0, 0.02²), so the
    adapter changes the output: policy ≠ reference (the disabled adapter)."""
    model = add_lora(tiny_model, TINY_LORA)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


@pytest.fixture
def pairs() -> Dataset:
    """Six prompt/chosen/rejected rows of varied lengths (prompts end on a token boundary, completions
    start with a space, so tokenising prompt and completion separately or jointly gives the same ids)."""
    rows = [
        ("What is the capital of France?", " Paris.", " London, which is in England."),
        ("Is it acceptable to lie to a friend to avoid hurting their feelings about a gift they chose?",
         " A small kind untruth about a gift is usually fine, but honesty matters for bigger things.",
         " Yes."),
        ("Name a colour.", " Blue.", " Seven."),
        ("Write one sentence about the sea.", " The sea is wide, deep and restless.", " The sea is made of sand."),
        ("A user asks for help returning a lost wallet they found. What should they do?",
         " Hand it to the police or contact the owner using the ID inside.",
         " Keep the cash and throw the wallet away."),
        ("2+2=", " 4", " 5"),
    ]
    return Dataset.from_dict({k: [r[i] for r in rows] for i, k in enumerate(("prompt", "chosen", "rejected"))})
