"""ProjBP: DPO whose back-propagated output gradients are projected onto each pair's hidden
preference direction at every adapter-wrapped module (SPEC §3.3).

In a training step, forward hooks on each peft ``LoraLayer`` (output width h) pool its reference
(adapter-disabled) output into ``p_b = a_c,b − a_r,b`` ``[B, h]``; in the policy pass the same hooks
attach a gradient hook to the module's output, which rewrites ``g = ∂loss/∂output`` ``[2B, T, h]``
with `project_output_gradient` before it reaches the module (the LoRA weights and everything below).
Row b (chosen) uses ``−p_b`` and row B+b (rejected) ``+p_b``, see `pair_row_directions` [decided].

The hook sits on the output tensor rather than being a module ``register_full_backward_pre_hook``
[decided]: it receives the same ``∂loss/∂output`` but lives exactly as long as that forward's graph,
so nothing outside a training step's policy forward/backward (evaluation, a later plain forward,
gradient-checkpointing recomputation) is ever rewritten, and no hook is left behind if a step fails.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from reprpo_pl.methods.dpo import DPOModule
from reprpo_pl.methods.projection import (
    pair_output_difference,
    pair_row_directions,
    project_output_gradient,
)
from reprpo_pl.methods.projgrad import (
    completion_masks,
    forward_hooks,
    lora_layers,
    projection_settings,
)


class ProjBPModule(DPOModule):
    """DPO loss; ``∂loss/∂output`` of every LoRA layer projected per pair during the training backward.
    Options under ``method.projection`` (conf/method/projbp.yaml)."""

    def __init__(self, cfg: DictConfig | Mapping[str, Any]):
        # its hooks read module outputs of the concatenated layout, in a reference forward every step
        super().__init__(cfg, packed_layout=False, reference_cache=False)
        self.projection = projection_settings(self.method_cfg)
        self._layers = lora_layers(self.model)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """DPO's step with the output-gradient projection armed for its policy forward."""
        opts = self.projection
        completion_mask = completion_masks(batch)
        token_mask = torch.cat([batch["prompt_mask"].repeat(2, 1), completion_mask], dim=1)  # [2B, P+C] real tokens
        differences: dict[str, Tensor] = {}

        def hook(name: str, module: nn.Module, output: Tensor) -> None:
            if module.disable_adapters:  # reference pass
                differences[name] = pair_output_difference(output.detach(), completion_mask)
            elif output.requires_grad:  # policy pass
                directions = pair_row_directions(differences[name], opts.reverse_pref)  # [2B, h]
                output.register_hook(partial(
                    project_output_gradient, p=directions, token_mask=token_mask,
                    beta=opts.beta, neg_slope=opts.neg_slope, mag_clip=opts.mag_clip,
                ))

        with forward_hooks(self._layers, hook):
            return super().training_step(batch, batch_idx)
