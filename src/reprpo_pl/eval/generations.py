"""Greedy sample completions, base vs adapter: a quick look at what training did to the model's text."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from transformers import GenerationConfig

from reprpo_pl.data.tokenize import format_prompt

log = logging.getLogger(__name__)

COLUMNS = ["step", "prompt", "base", "adapter"]


class GenerationCallback(L.Callback):
    """At the end of training (and every ``every_n_steps`` optimizer steps if set) greedily complete
    each of ``prompts`` — chat-templated like the training prompts — with the adapter disabled (base)
    and enabled. Prints them, appends them to ``<run dir>/generations.md`` and, when a WandbLogger is
    attached, logs a ``generations`` table (step, prompt, base, adapter)."""

    def __init__(self, prompts: Sequence[str], max_new_tokens: int = 32, every_n_steps: int | None = None,
                 enabled: bool = True, filename: str = "generations.md"):
        self.prompts = [str(p) for p in prompts]
        self.max_new_tokens = int(max_new_tokens)
        self.every_n_steps = every_n_steps
        self.enabled = enabled and bool(self.prompts) and self.max_new_tokens > 0
        self.filename = filename
        self.base_cache: dict[str, str] = {}  # the base model never changes during training
        self.rows: list[list[Any]] = []
        self.last_step: int | None = None

    @torch.no_grad()
    def generate(self, model: Any, tokenizer: Any, chat_template: bool) -> list[tuple[str, str, str]]:
        """``[(prompt, base completion, adapter completion)]``, greedy, special tokens stripped."""
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        device = next(model.parameters()).device
        add_special = not (chat_template and tokenizer.chat_template)  # as in data/tokenize.py

        def complete(inputs: dict[str, torch.Tensor]) -> str:
            out = model.generate(**inputs, generation_config=config)
            return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

        was_training = model.training
        model.eval()
        out = []
        try:
            for prompt in self.prompts:
                text = format_prompt(tokenizer, prompt, chat_template)
                inputs = dict(tokenizer(text, add_special_tokens=add_special, return_tensors="pt").to(device))
                if prompt not in self.base_cache:
                    with model.disable_adapter():
                        self.base_cache[prompt] = complete(inputs)
                out.append((prompt, self.base_cache[prompt], complete(inputs)))
        finally:
            model.train(was_training)
        return out

    def _run(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self.enabled or not trainer.is_global_zero or self.last_step == trainer.global_step:
            return
        step = trainer.global_step
        self.last_step = step
        with trainer.precision_plugin.forward_context():  # the training steps' precision
            samples = self.generate(pl_module.model, pl_module.tokenizer, bool(pl_module.cfg.data.chat_template))
        self.rows += [[step, *sample] for sample in samples]
        lines = [f"## step {step}", ""]
        for prompt, base, adapter in samples:
            lines += [f"**prompt:** {prompt}", "", f"- **base:** {base}", f"- **adapter:** {adapter}", ""]
        text = "\n".join(lines)
        print("\n" + text)
        path = Path(trainer.default_root_dir) / self.filename
        with path.open("a") as f:
            f.write(text + "\n")
        log.info("generations at step %d appended to %s", step, path)
        from lightning.pytorch.loggers import (
            WandbLogger,  # no wandb import unless that logger is in use
        )

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("generations", columns=COLUMNS, data=self.rows, step=step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._run(trainer, pl_module)
