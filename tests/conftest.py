"""Shared fixtures: the SmolLM2 tokenizer, a tiny random Llama with the same vocabulary (bare and
with a LoRA adapter), and a handful of hand-written preference pairs."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from reprpo_pl.models.loading import SMOLLM2_GGUF, add_lora, convert_gguf
from reprpo_pl.models.tiny import tiny_llama

# Tiny-model ops are dominated by threading overhead on a 2-core box: one thread is ~10x faster.
# Tests that run the real model in-process raise this themselves; CLI subprocesses are unaffected.
torch.set_num_threads(1)

# r=8 keeps the tiny adapter small; the rest matches conf/adapter/lora.yaml (SPEC §4)
TINY_LORA = {"r": 8, "lora_alpha": 16, "use_rslora": True, "lora_dropout": 0.0, "target_modules": "all-linear"}


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
