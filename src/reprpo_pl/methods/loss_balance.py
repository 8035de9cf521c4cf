"""Loss balance (SPEC-recipes §6): the gradient norm each loss term induces on the trainable parameters, so a
user sees when one term dominates, and the experimental ``loss.auto_alpha``, which weights the hidden term so
that its gradient norm matches the DPO term's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from reprpo_pl.errors import UserError

MIN_GRAD_NORM = 1e-12  # below this the hidden term has no gradient to match: α is left as it is


def term_gradient_norms(metrics: Mapping[str, Any], params: list[torch.nn.Parameter]) -> dict[str, Tensor]:
    """``‖∇_θ term‖₂`` over ``params`` for every ``loss/<term>`` in ``metrics`` that carries a graph (each term as the
    loss logs it: its batch mean before its weight), as detached fp32 scalars. The graph is kept for the step's own
    backward; one extra backward pass per term."""
    norms: dict[str, Tensor] = {}
    for name, term in metrics.items():
        if not (name.startswith("loss/") and isinstance(term, Tensor) and term.requires_grad):
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms[name] = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    return norms


@dataclass
class LossBalance:
    """When to measure the terms' gradient norms (``every_n_steps`` optimiser steps, None = never) and whether
    ``auto_alpha`` replaces the loss's configured ``initial_alpha`` with ``‖∇ loss/out‖ / ‖∇ loss/in‖``."""

    every_n_steps: int | None
    auto_alpha: bool
    initial_alpha: float
    _measured_at: int = -1

    def due(self, global_step: int) -> bool:
        """True once per optimiser step that is a multiple of ``every_n_steps`` (its first micro-batch)."""
        if self.every_n_steps is None or global_step % self.every_n_steps or global_step == self._measured_at:
            return False
        self._measured_at = global_step
        return True

    @staticmethod
    def matched_alpha(norms: Mapping[str, Tensor], current: float) -> float:
        """α with ``α‖∇ loss/in‖ = ‖∇ loss/out‖``; ``current`` while the hidden term has no gradient."""
        inner, outer = float(norms["loss/in"]), float(norms["loss/out"])
        return current if inner < MIN_GRAD_NORM else outer / inner


def check_auto_alpha(loss_cfg: Mapping[str, Any], every_n_steps: int | None) -> None:
    """Refuse ``loss.auto_alpha=true`` where it cannot do what it says, in one line. Only the losses whose per-pair
    loss is ``loss/out + α·loss/in`` (innerdpo, innerpo) have the option."""
    if loss_cfg.get("use_policy_weights"):
        raise UserError("loss.auto_alpha=true with loss.use_policy_weights=true: the policy weights multiply the whole "
                        "loss, so α cannot be replaced afterwards; set loss.use_policy_weights=false")
    if every_n_steps is None:
        raise UserError("loss.auto_alpha=true needs method.gradnorm_every_n_steps (how often α is re-measured), "
                        "e.g. method.gradnorm_every_n_steps=10")
