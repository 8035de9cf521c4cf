"""What every preference method shares: the model with its LoRA adapter, the reference pass,
the optimiser and schedule, trainable-only checkpoints, and the non-finite guard."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from reprpo_pl.errors import UserError
from reprpo_pl.methods.dpo_loss import LOSS_TYPES
from reprpo_pl.methods.logprobs import AGGS, aggregate, completion_logps
from reprpo_pl.models.loading import add_lora, load_base_model


class NonFiniteError(RuntimeError):
    """A loss, gradient or hidden state became NaN/inf; the message says where."""


class PreferenceModule(L.LightningModule):
    """Base LightningModule. ``cfg`` is the whole composed run config (saved in checkpoints, so
    ``load_from_checkpoint`` rebuilds the same model); subclasses implement `compute_loss`."""

    def __init__(self, cfg: DictConfig | Mapping[str, Any]):
        super().__init__()
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = cfg
        self.method_cfg = cfg.method
        if self.method_cfg.lr <= 0:
            raise UserError(f"method.lr={self.method_cfg.lr} must be > 0, e.g. method.lr=5e-5")
        if self.method_cfg.agg not in AGGS:
            raise UserError(f"method.agg={self.method_cfg.agg!r}: use one of {', '.join(AGGS)}")
        if self.method_cfg.get("loss_type", "sigmoid") not in LOSS_TYPES:
            raise UserError(f"method.loss_type={self.method_cfg.loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
        base, self.tokenizer = load_base_model(cfg.model)
        self.model = add_lora(base, cfg.adapter)
        self.model.train()  # from_pretrained leaves eval mode; dropout is 0 by default, the reference pass sets eval itself
        self.strict_loading = False  # checkpoints hold only the trainable state

    # ---- forward passes -------------------------------------------------------------------
    @contextmanager
    def reference(self) -> Iterator[None]:
        """The reference model: adapter disabled, eval mode, no grad."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                yield
        finally:
            self.model.train(was_training)

    def pair_logps(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """For a `concat_pairs` batch: aggregated log-probs of chosen and rejected (``[B]`` each, by
        ``method.agg``) and the per-token-mean NLL of chosen ``[B]`` (a coherence signal)."""
        per_token = completion_logps(self.model, inputs)
        mask = inputs["completion_mask"]
        cho, rej = aggregate(per_token, mask, self.method_cfg.agg).chunk(2)
        nll_cho = -aggregate(per_token, mask, "mean").chunk(2)[0]
        return cho, rej, nll_cho

    # ---- training -------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self.compute_loss(batch)
        self.check_finite({"loss": loss, **{k: v for k, v in metrics.items() if k.startswith("loss")}})
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["prompt_ids"].shape[0])
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=batch["prompt_ids"].shape[0])
        return loss

    def check_finite(self, terms: Mapping[str, Tensor], where: str = "loss term") -> None:
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                raise NonFiniteError(
                    f"non-finite {where} {name!r} at global step {self.global_step} (epoch {self.current_epoch}); "
                    "lower method.lr or set debug.detect_anomaly=true to find the operation"
                )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for name, p in self.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise NonFiniteError(f"non-finite gradient of {name} at global step {self.global_step}; lower method.lr")

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.method_cfg.lr, weight_decay=self.method_cfg.get("weight_decay", 0.0))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.method_cfg.get("warmup_ratio", 0.1) * total))

        def schedule(step: int) -> float:  # linear warmup then cosine to zero
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints: trainable state only ------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
