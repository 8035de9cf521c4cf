"""ProjGrad: DPO whose LoRA gradients keep (mostly) their part along each module's hidden
preference direction (SPEC §3.2).

Per adapter-wrapped module (a peft ``LoraLayer``, output width h): forward hooks pool its output in
the reference pass into ``a_c − a_r`` ``[B, h]``; before each optimiser step (after gradient
accumulation, before clipping) the accumulated gradient of the LoRA factor that carries h is
projected with `project_weight_gradient`, using the direction from every micro-batch of the step.

``weight_dim`` counts axes in the y = x·W layout of the SPEC and the prototype (W ``[in, out]``):
``1`` (default) is the OUTPUT axis, the one of size h: lora_B, stored by torch as ``[h, r]``, so its
dim 0 [decided] — read against torch's ``[out, in]`` storage, "dim 1" would land on lora_A's input
axis, which only has size h in square modules, and would project input-space gradients onto an
output-space direction. ``0`` does exactly that (lora_A, torch dim 1) and requires every adapted
module to be square. The other factor's gradient is left as DPO computed it.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from omegaconf import DictConfig
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from reprpo_pl.errors import UserError
from reprpo_pl.methods.dpo import DPOModule
from reprpo_pl.methods.projection import (
    EPS,
    pair_output_difference,
    preference_direction,
    project_weight_gradient,
)

OutputHook = Callable[[str, nn.Module, Tensor], None]


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The adapter-wrapped modules of ``model`` by name (e.g. ``…layers.3.self_attn.q_proj``)."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    if not layers:
        raise UserError(f"{type(model).__name__} has no LoRA layers to project gradients of: check adapter.target_modules")
    return layers


@contextmanager
def forward_hooks(layers: Mapping[str, nn.Module], hook: OutputHook) -> Iterator[None]:
    """Call ``hook(name, module, output)`` after each forward of each layer while the context is open."""
    handles = [
        module.register_forward_hook(lambda mod, args, output, name=name: hook(name, mod, output))
        for name, module in layers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def projection_settings(method_cfg: DictConfig) -> DictConfig:
    """``method.projection`` (ProjGrad and ProjBP), checked."""
    settings = method_cfg.projection
    if settings.mag_clip is not None and settings.mag_clip <= 0:
        raise UserError(f"method.projection.mag_clip={settings.mag_clip} must be > 0 or null")
    return settings


def completion_masks(batch: Mapping[str, Tensor]) -> Tensor:
    """Completion mask ``[2B, C]`` of the `concat_pairs` rows (chosen then rejected)."""
    return torch.cat([batch["chosen_mask"], batch["rejected_mask"]])


def projection_targets(layers: Mapping[str, LoraLayer], weight_dim: int) -> list[tuple[str, nn.Parameter, int]]:
    """``(layer name, trainable LoRA parameter, its torch axis of size h)`` for each parameter to project.

    weight_dim=1: lora_B's weight ``[h, r]`` (axis 0) and bias ``[h]`` if any; weight_dim=0: lora_A's
    weight ``[r, in]`` (axis 1), square modules only (see the module docstring)."""
    if weight_dim not in (0, 1):
        raise UserError(f"method.projection.weight_dim={weight_dim}: use 1 (output axis, lora_B) or 0 (input axis, lora_A)")
    if weight_dim == 0:
        non_square = [name for name, layer in layers.items() if layer.in_features != layer.out_features]
        if non_square:
            raise UserError(
                f"method.projection.weight_dim=0 projects lora_A's input axis with an output-space direction, which "
                f"needs in == out; {len(non_square)} adapted modules are not square (e.g. {non_square[0]}): use "
                "weight_dim=1 or restrict adapter.target_modules to square projections"
            )
    factor, axis = ("lora_B", 0) if weight_dim == 1 else ("lora_A", 1)
    return [
        (name, param, axis)
        for name, layer in layers.items()
        for linear in getattr(layer, factor).values()
        for param in linear.parameters()
        if param.requires_grad
    ]


class ProjGradModule(DPOModule):
    """DPO loss; LoRA gradients projected onto each module's reference preference direction.
    Options under ``method.projection`` (conf/method/projgrad.yaml)."""

    def __init__(self, cfg: DictConfig | Mapping[str, Any]):
        # its hooks read module outputs of the concatenated layout, in a reference forward every step
        super().__init__(cfg, packed_layout=False, reference_cache=False)
        self.projection = projection_settings(self.method_cfg)
        self._layers = lora_layers(self.model)
        self._targets = projection_targets(self._layers, int(self.projection.weight_dim))
        self._differences: dict[str, list[Tensor]] = defaultdict(list)  # layer → [B, h] per micro-batch of this step

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """DPO's step, caching ``a_c − a_r`` of every LoRA layer from its reference (adapter-disabled) pass."""
        mask = completion_masks(batch)

        def cache(name: str, module: nn.Module, output: Tensor) -> None:
            if module.disable_adapters:
                self._differences[name].append(pair_output_difference(output.detach(), mask))

        with forward_hooks(self._layers, cache):
            return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Lightning calls this once per optimiser step, after accumulation and before clipping."""
        self.log("train/projgrad/grad_norm_kept", self.project_gradients())
        super().on_before_optimizer_step(optimizer)

    @torch.no_grad()
    def project_gradients(self) -> Tensor:
        """Project every target's ``.grad`` in place with the directions cached since the last call,
        then forget them. Returns the fraction of gradient norm kept, ``‖G'‖/‖G‖`` over all targets."""
        opts = self.projection
        kept = torch.zeros((), device=self.device)
        total = torch.zeros((), device=self.device)
        for name, param, axis in self._targets:
            if param.grad is None:
                continue
            if not self._differences[name]:
                raise RuntimeError(f"no reference output of {name} is cached: ProjGrad gradients must come from training_step")
            p = preference_direction(torch.cat(self._differences[name]), opts.per_sample, opts.reverse_pref)
            grad = param.grad.movedim(axis, -1)
            projected = project_weight_gradient(grad, p, opts.beta, opts.neg_slope, opts.scale_orth, opts.mag_clip)
            total += grad.float().square().sum()
            kept += projected.float().square().sum()
            param.grad.copy_(projected.movedim(-1, axis))
        self._differences.clear()
        return (kept / total.clamp_min(EPS)).sqrt()
