"""What every preference method shares: the model with its LoRA adapter, the reference pass,
the optimiser and schedule, checkpoints without the frozen base, and the non-finite guard."""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, Mapping

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from reprpo_pl.errors import NonFiniteError, UserError
from reprpo_pl.methods.ref_cache import RefCache, reference_fingerprint
from reprpo_pl.models.loading import add_lora, cast_frozen_linears, load_base_model, share_input_casts
from reprpo_pl.models.logprobs import (
    AGGS,
    aggregate,
    completion_logps,
    completion_logps_and_log_sum_sq,
    pair_model_inputs,
)
from reprpo_pl.objectives.dpo import LOSS_TYPES
from reprpo_pl.objectives.wpo import WPO_MODES, wpo_log_weight, wpo_weights
from reprpo_pl.validation import SCHEDULES, check_optimizer


class PreferenceModule(L.LightningModule):
    """Base LightningModule. ``cfg`` is the whole composed run config (saved in checkpoints, so
    ``load_from_checkpoint`` rebuilds the same model); subclasses implement `compute_loss`.

    Each method states what it can do when it calls ``__init__``:

    - ``packed_layout``: its `compute_loss` reads the forwards only through `pair_logps` (and a
      `HiddenStateCollector` with `completion_states`), so it may run the packed pair layout (prompt
      encoded once, `reprpo_pl.models.pair_layouts`) when ``method.packed_forward`` is on. A method
      whose hooks read module outputs (ProjGrad, ProjBP) needs the concatenated layout.
    - ``reference_cache``: its reference outputs per example are constant and go through
      `cached_reference`, so the reference forward can be skipped for cached examples
      (`reprpo_pl.methods.ref_cache`, ``ref_cache.enabled``).
    - ``sections``: the config sections beyond ``method`` it reads (ReprPO: transform, loss,
      collection); a run that composes another section (``+transform=...`` on DPO) is refused.
    """

    def __init__(self, cfg: DictConfig | Mapping[str, Any], *, packed_layout: bool, reference_cache: bool,
                 sections: tuple[str, ...] = ()):
        super().__init__()
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = cfg
        self.method_cfg = cfg.method
        check_sections(cfg, sections)
        if self.method_cfg.lr <= 0:
            raise UserError(f"method.lr={self.method_cfg.lr} must be > 0, e.g. method.lr=5e-5")
        if self.method_cfg.agg not in AGGS:
            raise UserError(f"method.agg={self.method_cfg.agg!r}: use one of {', '.join(AGGS)}")
        if self.method_cfg.get("loss_type", "sigmoid") not in LOSS_TYPES:
            raise UserError(f"method.loss_type={self.method_cfg.loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
        if self.method_cfg.wpo not in WPO_MODES:
            raise UserError(f"method.wpo={self.method_cfg.wpo!r}: use one of {', '.join(WPO_MODES)} (quote off in YAML: \"off\")")
        if self.method_cfg.packed_forward and not packed_layout:
            raise UserError(f"method.packed_forward=true: method={self.method_cfg.name} hooks module outputs of the "
                            "concatenated pair layout; drop the override")
        self.packed = bool(self.method_cfg.packed_forward)
        base, self.tokenizer = load_base_model(cfg.model)
        bf16 = str(cfg.get("trainer", {}).get("precision")).startswith("bf16")
        if bf16:
            cast_frozen_linears(base, torch.bfloat16)  # what autocast would round them to anyway, without the copies
        self.model = add_lora(base, cfg.adapter)
        if bf16:
            share_input_casts(self.model)  # one bf16 rounding of each layer input, not one per consuming layer
        self.model.train()  # from_pretrained leaves eval mode; dropout is 0 by default, the reference pass sets eval itself
        self.strict_loading = False  # checkpoints hold no frozen base weights (`saved_state_names`)
        enabled = bool(cfg.ref_cache.enabled)
        self.ref_cache: RefCache | None = RefCache() if enabled and reference_cache else None

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

    def pair_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model inputs for a collated batch: `pack_pairs` (prompt encoded once) when ``method.packed_forward``
        is on and the model supports it, else `concat_pairs`. `pair_logps` and `completion_states` accept either."""
        return pair_model_inputs(self.model, batch, packed=self.packed)

    def reference_fingerprint(self) -> str:
        """What the cached reference outputs depend on besides the example (see `reference_fingerprint`);
        subclasses add their own settings."""
        return reference_fingerprint(self.cfg)

    def cached_reference(self, batch: dict[str, Tensor], forward: Callable[[], dict[str, Tensor]],
                         use_cache: bool) -> tuple[dict[str, Tensor], bool]:
        """``forward()`` run as the reference (under `reference`), or its earlier result for these examples;
        and whether it came from the cache.

        ``forward`` returns per-example tensors (leading dim B, the batch's pairs). With ``use_cache``
        (training steps only), the cache on and an ``index`` in the batch, a batch whose examples are all
        cached skips the reference forward; otherwise the forward runs and its outputs are stored."""
        cache = self.ref_cache if use_cache and "index" in batch else None
        if cache is not None:
            cache.bind(self.reference_fingerprint())
            cached = cache.lookup(batch["index"], batch["prompt_ids"].device)
            if cached is not None:
                cache.hits += 1
                return cached, True
        with self.reference(), torch.profiler.record_function("reprpo_pl.reference_forward"):
            outputs = forward()
        if cache is not None:
            cache.misses += 1
            cache.store(batch["index"], outputs)
        return outputs, False

    def policy_logps(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """`pair_logps` of the policy, plus the WPO weight of each pair ``[B]`` (detached; None with
        ``method.wpo=off``), from the same forward (`reprpo_pl.objectives.wpo`)."""
        per_token, wpo = self.policy_token_logps(inputs)
        return (*self._aggregate_pairs(per_token, inputs["completion_mask"]), wpo)

    def policy_token_logps(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The policy's per-token completion log-probs ``[2B, C]`` (chosen rows, then rejected) and the WPO weight
        of each pair ``[B]`` (detached; None with ``method.wpo=off``), from one forward."""
        if self.method_cfg.wpo == "off":
            return completion_logps(self.model, inputs), None
        per_token, log_sum_sq = completion_logps_and_log_sum_sq(self.model, inputs)
        lw_cho, lw_rej = wpo_log_weight(per_token, log_sum_sq, inputs["completion_mask"]).chunk(2)
        return per_token, wpo_weights(lw_cho, lw_rej, self.method_cfg.wpo)

    def pair_logps(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """For `pair_inputs` (packed or `concat_pairs`): aggregated log-probs of chosen and rejected (``[B]`` each, by
        ``method.agg``) and the per-token-mean NLL of chosen ``[B]`` (a coherence signal)."""
        return self._aggregate_pairs(completion_logps(self.model, inputs), inputs["completion_mask"])

    def _aggregate_pairs(self, per_token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token log-probs ``[2B, C]`` → chosen and rejected by ``method.agg`` and the chosen NLL, ``[B]`` each."""
        cho, rej = aggregate(per_token, mask, self.method_cfg.agg).chunk(2)
        nll_cho = -aggregate(per_token, mask, "mean").chunk(2)[0]
        return cho, rej, nll_cho

    # ---- training -------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor], use_cache: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of a collated batch and its metrics (scalars; ``loss/<term>`` may keep its graph, for
        `reprpo_pl.methods.loss_balance`, and is detached when logged). ``use_cache``: the reference
        outputs may come from (and go into) the reference cache; `training_step` passes True."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self.compute_loss(batch, use_cache=True)
        return self.log_step(loss, metrics, batch)

    def log_step(self, loss: Tensor, metrics: dict[str, Tensor | float], batch: dict[str, Tensor]) -> Tensor:
        """Check the step's loss terms are finite and log them (detached) as ``train/<name>``; returns ``loss``."""
        # the terms first, so a NaN is reported where it appeared rather than as the total it spreads to
        self.check_finite({**{k: v for k, v in metrics.items() if k.startswith("loss")}, "loss": loss})
        size = batch["prompt_ids"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        detached = {f"train/{k}": v.detach() if isinstance(v, Tensor) else v for k, v in metrics.items()}
        self.log_dict(detached, batch_size=size)
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
        """``method.optimizer`` (`make_optimizer`) under ``method.schedule`` (`lr_factor`), stepped every optimiser step."""
        params = [p for p in self.parameters() if p.requires_grad]
        m = self.method_cfg
        optimizer = make_optimizer(params, m.optimizer, lr=m.lr, weight_decay=m.weight_decay,
                                   device_type=self.device.type)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        factor = partial(lr_factor, schedule=m.schedule, total=total, warmup_ratio=m.warmup_ratio,
                         decay_ratio=m.decay_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints: everything but the frozen base ---------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = saved_state_names(self)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in saved}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose saved state is not this module's (another adapter rank, method or
        transform, or one saved without the transform's buffers): ``strict_loading`` is off because the
        frozen base is not saved, so Lightning would otherwise raise a size-mismatch traceback or resume
        silently with fresh parameters."""
        mismatch = saved_state_mismatch(checkpoint.get("state_dict") or {}, self)
        stored = (checkpoint.get("hyper_parameters") or {}).get("cfg")
        if mismatch is None and isinstance(stored, Mapping):
            mismatch = training_config_difference(stored, OmegaConf.to_container(self.cfg, resolve=True))
        if mismatch:
            where = f"ckpt_path={self.cfg.ckpt_path}" if self.cfg.get("ckpt_path") else "the checkpoint"
            raise UserError(f"{where} was trained with another configuration ({mismatch}): resume with the run's own "
                            "overrides (its .hydra/overrides.yaml), or drop ckpt_path to start afresh")


def lr_factor(step: int, *, schedule: str, total: int, warmup_ratio: float, decay_ratio: float | None) -> float:
    """The learning-rate multiplier at optimiser step ``step`` (0-based) of ``total``.

    Both schedules warm up linearly over ``warmup = max(1, ⌊warmup_ratio·total⌋)`` steps as (step+1)/warmup.
    ``cosine``: then a half cosine from 1 to 0 over the remaining steps. ``wsd`` (warmup-stable-decay, the
    journal's 15/70/15 %): then 1 until the last ``decay = max(1, ⌊decay_ratio·total⌋)`` steps, which fall
    from 1 to 0 along a half cosine, the shape of transformers' get_wsd_schedule (decay_type="cosine",
    min_lr_ratio=0) that the prototype called; stable is the rest, so the decay ends at the last step.

    transformers' schedules warm up as step/warmup, so step 0 runs at lr 0: with LoRA's B = 0 start no lora_A
    moves in the first two steps, and a 1-step run trains nothing (measured; tests/test_combinations.py fails
    with it) [decided: kept (step+1)/warmup, for wsd as well]."""
    warmup = max(1, int(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    if schedule == "wsd":
        if decay_ratio is None:
            raise UserError("method.schedule=wsd needs method.decay_ratio (the final decay's share of the steps), "
                            "e.g. method.decay_ratio=0.15")
        decay_start = max(warmup, total - max(1, int(decay_ratio * total)))
        if step < decay_start:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - decay_start) / max(1, total - decay_start))))
    raise UserError(f"method.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")


def make_optimizer(params: list[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float,
                   device_type: str) -> torch.optim.Optimizer:
    """``adamw`` (torch) or bitsandbytes' ``paged_adamw_32bit`` / ``adamw_8bit``, which need CUDA parameters
    (refused otherwise, as at the start of a run: `reprpo_pl.validation.check_optimizer`). The prototype's
    bnb PagedAdam32bit (L2 decay) equals PagedAdamW32bit at its weight_decay 0."""
    check_optimizer(name, cuda=device_type == "cuda")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "adamw_8bit": bnb.optim.AdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


# What training depends on: a resumed run must match its checkpoint here. Not compared: evaluation, logging,
# callbacks and the stopping criteria trainer.max_epochs / max_steps (a run may be resumed to stop sooner or
# later; the cosine schedule is then laid out over the new total).
TRAINING_SECTIONS = ("seed", "data", "dataset", "model", "adapter", "method", "loss", "transform", "collection")
TRAINING_TRAINER_KEYS = ("accumulate_grad_batches", "gradient_clip_val", "precision")


def training_config_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """The first setting training depends on that differs between a checkpoint's resolved config and this
    run's, as ``key=<stored> in the checkpoint, <current> here``; None when they agree."""

    def flat(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, Mapping):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}.{key}").items()}
        return {prefix: node}

    def settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for name in TRAINING_SECTIONS for k, v in flat(cfg.get(name), name).items()}
        trainer = cfg.get("trainer") or {}
        return out | {f"trainer.{k}": trainer.get(k) for k in TRAINING_TRAINER_KEYS}

    before, now = settings(stored), settings(current)
    for key in sorted(set(before) | set(now)):
        if before.get(key, "<absent>") != now.get(key, "<absent>"):
            return f"{key}={before.get(key, '<absent>')} in the checkpoint, {now.get(key, '<absent>')} here"
    return None


def saved_state_names(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """What a checkpoint of ``module`` holds, state_dict name → shape: the trainable parameters (LoRA, the
    transform's) and every other parameter and persistent buffer outside the base model ``model.*`` (ortho's
    parametrisation base, ETHER's frozen W0), so that the module rebuilt from its config and this state
    computes what the saved one did, without relying on re-initialisation. The frozen base weights are not
    saved: the model loader rebuilds them."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if k in trainable or not k.startswith("model.")}


def saved_state_mismatch(state: Mapping[str, Tensor], module: torch.nn.Module) -> str | None:
    """The first difference between a checkpoint's ``state`` and what ``module`` saves (`saved_state_names`),
    or None when they match."""
    expected = saved_state_names(module)
    for name, shape in expected.items():
        if name not in state:
            return f"it lacks {name}"
        if tuple(state[name].shape) != shape:
            return f"{name} has shape {list(state[name].shape)}, this run's has {list(shape)}"
    extra = sorted(set(state) - set(expected))
    return f"it holds {extra[0]}, which this run does not save" if extra else None


METHOD_SECTIONS = ("transform", "loss", "collection")  # config sections that only some methods read


def check_sections(cfg: DictConfig, sections: tuple[str, ...]) -> None:
    """Refuse a config section the method does not read (``method=dpo +transform=supr``): it would be
    stored in checkpoints and results as if it had been used."""
    for name in METHOD_SECTIONS:
        if name in cfg and cfg[name] is not None and name not in sections:
            raise UserError(f"method={cfg.method.name} does not use `{name}` ({name}={cfg[name].get('name', '…')}): "
                            f"drop the {name} override, or pick a ReprPO method (innerdpo, innerpo, prefvec, mse, rank, topk)")
