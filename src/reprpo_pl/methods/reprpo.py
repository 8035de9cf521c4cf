"""ReprPO: a loss on (transformed, pooled) hidden states, chosen by the `loss` group (SPEC §3.4)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from reprpo_pl.errors import UserError
from reprpo_pl.methods.base import PreferenceModule
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
                                     coll.pooling)
        if self.ref_cache is not None and not self.pipeline.reference_cacheable:
            log.info("ref_cache: off for this ReprPO setup (it needs per-token reference states every step)")
            self.ref_cache = None

    def reference_fingerprint(self) -> str:
        settings = OmegaConf.to_container(self.cfg.collection, resolve=True)
        return super().reference_fingerprint() + "/" + repr(sorted(settings.items())) + f"/{self.loss_fn.pooling}"

    def compute_loss(self, batch: dict[str, Tensor], use_cache: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = self.pair_inputs(batch)
        mask = inputs["completion_mask"]

        def reference_forward() -> dict[str, Tensor]:
            with self.collector as states:
                cho, rej, nll = self.pair_logps(inputs)
            tokens = {k: completion_states(h, inputs) for k, h in states.items()}
            return {"logp_cho": cho, "logp_rej": rej, "nll_cho": nll, **self.pipeline.reference_states(tokens, mask)}

        ref, from_cache = self.cached_reference(batch, reference_forward, use_cache)
        with self.collector as states:
            pi_cho, pi_rej, pi_nll, wpo = self.policy_logps(inputs)
        self.check_finite(states, where="hidden state at")
        pi_tokens = {k: completion_states(h, inputs) for k, h in states.items()}
        pi_pooled, ref_pooled = self.pipeline.pooled(pi_tokens, ref, mask)
        dev_cho = dev_rej = None
        if self.loss_fn.needs_token_deviation:
            dev_cho, dev_rej = token_deviation(pi_tokens, {k: ref[f"tokens:{k}"] for k in pi_tokens}, mask).chunk(2)
        halves = lambda d: ({k: v.chunk(2)[0] for k, v in d.items()}, {k: v.chunk(2)[1] for k, v in d.items()})  # noqa: E731
        (pi_c, pi_r), (ref_c, ref_r) = halves(pi_pooled), halves(ref_pooled)
        reprs = ReprBatch(pi_c, pi_r, ref_c, ref_r, pi_cho, pi_rej, ref["logp_cho"], ref["logp_rej"], pi_nll,
                          ref["nll_cho"], dev_cho, dev_rej, wpo)
        loss, metrics = self.loss_fn(reprs)
        metrics |= {"nll/chosen": pi_nll.detach().mean(), "nll/chosen_ref": ref["nll_cho"].mean()}
        if wpo is not None:
            metrics["wpo/weight"] = wpo.mean()
        if self.ref_cache is not None:  # 1 when this batch's reference outputs came from the cache
            metrics["ref_cached"] = float(from_cache)
        return loss, metrics
