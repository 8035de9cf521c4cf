"""GenerationCallback: greedy completions with the adapter disabled (base) and enabled, on a schedule."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import Precision
from omegaconf import OmegaConf

from reprpo_pl.config import CONF_DIR
from reprpo_pl.eval.generations import GenerationCallback
from reprpo_pl.models.loading import add_lora, load_base_model

PROMPTS = ["hello", "The capital of France is"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.set_num_threads(1)
    model, tokenizer = load_base_model({"name_or_path": "tiny-random-llama"})
    return model, tokenizer


def greedy(model, tokenizer, prompt: str, n: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_base_is_the_bare_model_and_adapter_differs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    bare = [greedy(model.eval(), tokenizer, p, 6) for p in PROMPTS]
    peft = add_lora(model, {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a large adapter, so its greedy text differs from the base model's
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    peft.train()
    try:
        samples = GenerationCallback(PROMPTS, max_new_tokens=6).generate(peft, tokenizer, chat_template=False)
        assert peft.training  # mode restored
        assert [s[0] for s in samples] == PROMPTS
        assert [s[1] for s in samples] == bare and all(bare)
        assert [s[2] for s in samples] == [greedy(peft.eval(), tokenizer, p, 6) for p in PROMPTS]
        assert [s[2] for s in samples] != bare
    finally:
        peft.unload()  # give the module-scoped base model back without LoRA layers


def test_schedule_file_and_cache(model_and_tokenizer, tmp_path, capsys):
    model, tokenizer = model_and_tokenizer
    peft = add_lora(model, {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
    try:
        module = SimpleNamespace(model=peft, tokenizer=tokenizer, cfg=OmegaConf.create({"data": {"chat_template": True}}))
        trainer = SimpleNamespace(global_step=0, is_global_zero=True, default_root_dir=str(tmp_path), loggers=[],
                                  precision_plugin=Precision())  # Lightning's 32-true plugin
        callback = GenerationCallback(PROMPTS, max_new_tokens=3, every_n_steps=2)
        calls = []
        original = callback.generate
        callback.generate = lambda *a, **k: calls.append(trainer.global_step) or original(*a, **k)
        for step in range(1, 6):
            trainer.global_step = step
            callback.on_train_batch_end(trainer, module, None, None, 0)
        callback.on_train_end(trainer, module)
        callback.on_train_end(trainer, module)  # nothing new at the same step
        assert calls == [2, 4, 5]
        text = (tmp_path / "generations.md").read_text()
        assert [line for line in text.splitlines() if line.startswith("## ")] == ["## step 2", "## step 4", "## step 5"]
        assert text.count("**prompt:** hello") == 3 and text.count("- **base:**") == 6
        assert [row[:2] for row in callback.rows] == [[s, p] for s in (2, 4, 5) for p in PROMPTS]
        assert set(callback.base_cache) == set(PROMPTS)  # the base model is generated once per prompt
        assert "## step 5" in capsys.readouterr().out
    finally:
        peft.unload()


def test_disabled_writes_nothing(tmp_path):
    callback = GenerationCallback(PROMPTS, enabled=False)
    trainer = SimpleNamespace(global_step=3, is_global_zero=True, default_root_dir=str(tmp_path), loggers=[])
    callback.on_train_end(trainer, None)
    assert not (tmp_path / "generations.md").exists()


def test_default_config_is_small():
    cfg = OmegaConf.load(Path(CONF_DIR) / "callbacks" / "default.yaml").generations
    callback = instantiate(cfg)
    assert isinstance(callback, GenerationCallback) and callback.enabled
    assert len(callback.prompts) == 2 and callback.max_new_tokens == 32 and callback.every_n_steps is None
