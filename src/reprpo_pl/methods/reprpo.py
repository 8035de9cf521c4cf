"""ReprPO: a loss on (transformed, pooled) hidden states, chosen by the `loss` group (SPEC §3.4)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Mapping

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from reprpo_pl.methods.base import PreferenceModule
from reprpo_pl.methods.logprobs import completion_states
from reprpo_pl.reprs.collection import HiddenStateCollector
from reprpo_pl.reprs.layers import parse_layers
from reprpo_pl.reprs.pooling import filter_attention_sinks, masked_mean, pool
from reprpo_pl.reprs.transforms import build_transform, transform_traits
from reprpo_pl.reprs.types import ReprBatch

log = logging.getLogger(__name__)


class ReprPOModule(PreferenceModule):
    """Collect hidden states of policy and reference in one forward each, transform them (learnable,
    e.g. ETHER), pool over completion tokens, and hand a `ReprBatch` to the loss.

    Pool first when it is exact (``pool_first``): with mean pooling and a transform that is one linear
    map per token (`transform_traits`), ``T(mmean_t H) = mmean_t T(H)``, so the states are pooled to
    ``[2B, d]`` and then transformed, and the reference's pooled (untransformed) states can be cached
    (`reprpo_pl.methods.ref_cache`). Otherwise (supr, rank's log-softmax pooling, sink filtering
    with a transform that changes norms) every token is transformed, then pooled, as the SPEC writes it;
    then, like with a loss that reads per-token deviations, the reference forward runs every step."""

    fast_paths: ClassVar[bool] = True  # not inherited: see PreferenceModule

    def __init__(self, cfg: DictConfig | Mapping[str, Any]):
        super().__init__(cfg)
        coll = self.cfg.collection
        layers = parse_layers(coll.layers, self.model.config.num_hidden_layers)
        self.collector = HiddenStateCollector(self.model, coll.mode, layers, coll.collect_input, list(coll.modules))
        self.loss_fn = instantiate({k: v for k, v in self.cfg.loss.items() if k != "name"})
        self.transform = build_transform(self.cfg.transform, self.collector.keys, self.collector.dims, self.model, coll.mode)
        traits = transform_traits(self.transform)
        sink_k = coll.get("sink_k")
        self.pool_first = (
            self.loss_fn.pooling == "mean" and traits.commutes_with_mean and (sink_k is None or traits.preserves_norm)
        )
        if self.ref_cache is not None and not (self.pool_first and not self.loss_fn.needs_token_deviation):
            log.info("ref_cache: off for this ReprPO setup (it needs per-token reference states every step)")
            self.ref_cache = None

    def reference_fingerprint(self) -> str:
        coll = self.cfg.collection
        settings = OmegaConf.to_container(coll, resolve=True) if isinstance(coll, DictConfig) else dict(coll)
        return super().reference_fingerprint() + "/" + repr(sorted(settings.items())) + f"/{self.loss_fn.pooling}"

    # ---- pooling ----------------------------------------------------------------------------
    def _pool_raw(self, tokens: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """Untransformed completion states ``{key: [2B, C, d]}`` → masked means ``{key: [2B, d]}`` fp32,
        sinks dropped on raw norms (equal to transformed norms: pool_first needs a norm-preserving transform for that)."""
        sink_k = self.cfg.collection.get("sink_k")
        return {k: masked_mean(h, mask if sink_k is None else filter_attention_sinks(h, mask, sink_k)) for k, h in tokens.items()}

    def _transform_pooled(self, pooled: dict[str, Tensor]) -> dict[str, Tensor]:
        """``T`` on pooled states ``{key: [N, d]}`` (each as one token per row) → ``{key: [N, d]}``."""
        some = next(iter(pooled.values()))
        ones = torch.ones(some.shape[0], 1, dtype=torch.bool, device=some.device)
        return {k: h.squeeze(1) for k, h in self.transform({k: h.unsqueeze(1) for k, h in pooled.items()}, ones).items()}

    def _pool_tokens(self, tokens: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """Completion states ``{key: [2B, C, d]}`` → transformed per token, then pooled ``{key: [2B, d]}``."""
        transformed = self.transform(tokens, mask)
        return {k: pool(h, mask, self.loss_fn.pooling, self.cfg.collection.get("sink_k")) for k, h in transformed.items()}

    # ---- the step ---------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = self.pair_inputs(batch)
        mask = inputs["completion_mask"]

        def reference_forward() -> dict[str, Tensor]:
            with self.collector as states:
                cho, rej, nll = self.pair_logps(inputs)
            out = {"logp_cho": cho, "logp_rej": rej, "nll_cho": nll}
            tokens = {k: completion_states(h, inputs) for k, h in states.items()}
            if self.pool_first:  # per example: [B, 2, d] (chosen, rejected), cacheable
                out |= {f"pooled:{k}": torch.stack(v.chunk(2), 1) for k, v in self._pool_raw(tokens, mask).items()}
            else:  # per token, [2B, C, d]: not cacheable (the cache is off in this case)
                out |= {f"tokens:{k}": v for k, v in tokens.items()}
            return out

        ref = self.cached_reference(batch, reference_forward)
        with self.collector as pi_states:
            pi_cho, pi_rej, pi_nll = self.pair_logps(inputs)
        self.check_finite({k: h for k, h in pi_states.items()}, where="hidden state at")
        pi_tokens = {k: completion_states(h, inputs) for k, h in pi_states.items()}
        keys = list(pi_tokens)
        if self.pool_first:
            pi_pooled = self._transform_pooled(self._pool_raw(pi_tokens, mask))
            ref_pooled = self._transform_pooled({k: torch.cat(ref[f"pooled:{k}"].unbind(1)) for k in keys})
        else:
            pi_pooled = self._pool_tokens(pi_tokens, mask)
            ref_pooled = self._pool_tokens({k: ref[f"tokens:{k}"].detach() for k in keys}, mask)
        split = lambda d: ({k: v.chunk(2)[0] for k, v in d.items()}, {k: v.chunk(2)[1] for k, v in d.items()})  # noqa: E731
        (pi_c, pi_r), (ref_c, ref_r) = split(pi_pooled), split(ref_pooled)
        dev_cho = dev_rej = None
        if self.loss_fn.needs_token_deviation:
            dev_cho, dev_rej = self._token_deviation(pi_tokens, {k: ref[f"tokens:{k}"] for k in keys}, mask).chunk(2)
        ref_cho, ref_rej, ref_nll = ref["logp_cho"], ref["logp_rej"], ref["nll_cho"]
        reprs = ReprBatch(pi_c, pi_r, ref_c, ref_r, pi_cho, pi_rej, ref_cho, ref_rej, pi_nll, ref_nll, dev_cho, dev_rej)
        loss, metrics = self.loss_fn(reprs)
        metrics = {**metrics, "nll/chosen": pi_nll.detach().mean(), "nll/chosen_ref": ref_nll.mean()}
        return loss, metrics

    @staticmethod
    def _token_deviation(pi: dict[str, Tensor], ref: dict[str, Tensor], mask: Tensor) -> Tensor:
        """``[2B]``: masked mean over completion tokens of ‖H^π − H^ref‖ (states ``[2B, C, d]``), averaged over keys."""
        m = mask.float()
        devs = [((pi[k] - ref[k].detach()).norm(dim=-1) * m).sum(-1) / m.sum(-1).clamp(min=1) for k in pi]
        return torch.stack(devs).mean(0)
