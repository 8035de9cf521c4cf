"""Build a method's LightningModule from conf/ on the tiny Llama, for method-level tests."""

from __future__ import annotations

import torch
from conftest import compose_train
from hydra.utils import get_class

from reprpo_pl.methods.base import PreferenceModule


def tiny_method_module(method: str, *overrides: str) -> PreferenceModule:
    """``method``'s module on the tiny Llama, LoRA r=8 with lora_B drawn from N(0, 0.02²) (seed 1), so the
    policy differs from the reference and lora_A gets gradient too; in train mode."""
    cfg = compose_train([f"method={method}", "model=tiny_random", "adapter.r=8", *overrides])
    module = get_class(cfg.method._target_)(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return module.train()
