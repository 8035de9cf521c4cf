"""ReprPO: a loss on (transformed, pooled) hidden states, chosen by the `loss` group (SPEC §3.4)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from hydra.utils import instantiate
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from reprpo_pl.errors import UserError
from reprpo_pl.methods.base import PreferenceModule
from reprpo_pl.methods.loss_balance import LossBalance, check_auto_alpha, term_gradient_norms
from reprpo_pl.models.logprobs import completion_logps
from reprpo_pl.models.pair_layouts import completion_states
from reprpo_pl.reprs.collection import HiddenStateCollector
from reprpo_pl.reprs.layers import parse_layers
from reprpo_pl.reprs.pipeline import ReprPipeline, token_deviation
from reprpo_pl.reprs.transforms import build_transform
from reprpo_pl.reprs.types import ReprBatch

log = logging.getLogger(__name__)


class ReprPOModule(PreferenceModule):
    """Collect hidden states of policy and reference in one forward each, transform them (learnable,
    e.g. ETHER) and pool them over completion tokens (`ReprPipeline`, which decides whether pooling
    first is exact and so whether the reference can be cached), and hand a `ReprBatch` to the loss."""

    def __init__(self, cfg: DictConfig | Mapping[str, Any]):
        super().__init__(cfg, packed_layout=True, reference_cache=True, sections=("transform", "loss", "collection"))
        coll = self.cfg.collection
        layers = parse_layers(coll.layers, self.model.config.num_hidden_layers)
        self.collector = HiddenStateCollector(self.model, coll.mode, layers, coll.collect_input, list(coll.modules))
        self.loss_fn = instantiate({k: v for k, v in self.cfg.loss.items() if k != "name"})
        if self.method_cfg.wpo != "off" and self.loss_fn.logprob_term != "smooth":
            raise UserError(f"method.wpo={self.method_cfg.wpo} weights a DPO term, and loss={self.cfg.loss.name} has none "
                            "here: use method.wpo=off (or a loss with a DPO term: innerdpo, innerpo, prefvec)")
        self.transform = build_transform(self.cfg.transform, self.collector.keys, self.collector.dims, self.model, coll.mode)
        if coll.pooling != "mean" and self.loss_fn.pooling != "mean":
            raise UserError(f"collection.pooling={coll.pooling}: loss={self.cfg.loss.name} pools {self.loss_fn.pooling} "
                            "over every completion token; use collection.pooling=mean")
        self.pipeline = ReprPipeline(self.transform, self.loss_fn.pooling, coll.sink_k, self.loss_fn.needs_token_deviation,
                                     coll.pooling, normalize_tokens=getattr(self.loss_fn, "norm_before_reduce", False))
        if self.ref_cache is not None and (not self.pipeline.reference_cacheable or self.loss_fn.needs_token_logps):
            log.info("ref_cache: off for this ReprPO setup (it needs per-token reference states or log-probs every step)")
            self.ref_cache = None
        auto_alpha = bool(getattr(self.loss_fn, "auto_alpha", False))
        self.balance = LossBalance(self.method_cfg.gradnorm_every_n_steps, auto_alpha, float(self.cfg.loss.get("alpha", 1.0)))
        if auto_alpha:
            check_auto_alpha(self.cfg.loss, self.balance.every_n_steps)
            # the measured α, a buffer so that checkpoints carry it and a resumed run goes on with it
            self.register_buffer("auto_alpha", torch.tensor(self.balance.initial_alpha))

    def reference_fingerprint(self) -> str:
        settings = OmegaConf.to_container(self.cfg.collection, resolve=True)
        return super().reference_fingerprint() + "/" + repr(sorted(settings.items())) + f"/{self.loss_fn.pooling}"

    def compute_loss(self, batch: dict[str, Tensor], use_cache: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = self.pair_inputs(batch)
        mask = inputs["completion_mask"]
        token_logps = self.loss_fn.needs_token_logps

        def reference_forward() -> dict[str, Tensor]:
            with self.collector as states:
                per_token = completion_logps(self.model, inputs)
            cho, rej, nll = self._aggregate_pairs(per_token, mask)
            tokens = {k: completion_states(h, inputs) for k, h in states.items()}
            extra = {"token_logp_cho": per_token.chunk(2)[0]} if token_logps else {}
            return {"logp_cho": cho, "logp_rej": rej, "nll_cho": nll, **extra, **self.pipeline.reference_states(tokens, mask)}

        ref, from_cache = self.cached_reference(batch, reference_forward, use_cache)
        with self.collector as states:
            pi_token, wpo = self.policy_token_logps(inputs)
        pi_cho, pi_rej, pi_nll = self._aggregate_pairs(pi_token, mask)
        self.check_finite(states, where="hidden state at")
        pi_tokens = {k: completion_states(h, inputs) for k, h in states.items()}
        pi_pooled, ref_pooled = self.pipeline.pooled(pi_tokens, ref, mask)
        dev_cho = dev_rej = None
        if self.loss_fn.needs_token_deviation:
            dev_cho, dev_rej = token_deviation(pi_tokens, {k: ref[f"tokens:{k}"] for k in pi_tokens}, mask).chunk(2)
        halves = lambda d: ({k: v.chunk(2)[0] for k, v in d.items()}, {k: v.chunk(2)[1] for k, v in d.items()})  # noqa: E731
        (pi_c, pi_r), (ref_c, ref_r) = halves(pi_pooled), halves(ref_pooled)
        per_token_fields = {}
        if token_logps:
            per_token_fields = {"pi_token_logp_cho": pi_token.chunk(2)[0], "ref_token_logp_cho": ref["token_logp_cho"],
                                "completion_mask_cho": mask.chunk(2)[0]}
        reprs = ReprBatch(pi_c, pi_r, ref_c, ref_r, pi_cho, pi_rej, ref["logp_cho"], ref["logp_rej"], pi_nll,
                          ref["nll_cho"], dev_cho, dev_rej, wpo, **per_token_fields)
        loss, metrics = self.loss_fn(reprs)
        metrics |= {"nll/chosen": pi_nll.detach().mean(), "nll/chosen_ref": ref["nll_cho"].mean()}
        if wpo is not None:
            metrics["wpo/weight"] = wpo.mean()
        if self.ref_cache is not None:  # 1 when this batch's reference outputs came from the cache
            metrics["ref_cached"] = float(from_cache)
        return loss, metrics

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """`PreferenceModule.training_step`, plus the loss balance: every ``method.gradnorm_every_n_steps`` optimiser
        steps the gradient norm of each ``loss/<term>`` on the trainable parameters is logged as
        ``train/gradnorm/<term>``; with ``loss.auto_alpha`` the hidden term's weight is then re-measured
        (`LossBalance`) and used until the next measurement."""
        loss, metrics = self.compute_loss(batch, use_cache=True)
        if self.balance.due(self.global_step):
            norms = term_gradient_norms(metrics, [p for p in self.parameters() if p.requires_grad])
            if self._trainer is not None:  # under DDP the ranks' mean, so that every rank takes the same α
                norms = {k: self.trainer.strategy.reduce(v, reduce_op="mean") for k, v in norms.items()}
            # straight to the loggers: self.log would repeat the last value on the steps between measurements
            for logger in self.loggers:
                logger.log_metrics({f"train/gradnorm/{k.removeprefix('loss/')}": float(v) for k, v in norms.items()},
                                   step=self.global_step)
            if self.balance.auto_alpha:
                self.auto_alpha.fill_(self.balance.matched_alpha(norms, float(self.auto_alpha)))
        if self.balance.auto_alpha:  # L = out + α·in as the loss computed it, with α replaced by the measured one
            loss = loss + (self.auto_alpha - self.balance.initial_alpha) * metrics["loss/in"]
            metrics["auto_alpha"] = self.auto_alpha.clone()
        return self.log_step(loss, metrics, batch)
