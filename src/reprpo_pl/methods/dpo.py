"""DPO on a LoRA adapter with the disabled adapter as reference (SPEC §3.1)."""

from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig
from torch import Tensor

from reprpo_pl.methods.base import PreferenceModule
from reprpo_pl.objectives.dpo import dpo_loss, dpo_metrics
from reprpo_pl.objectives.wpo import weighted


class DPOModule(PreferenceModule):
    """One forward per role (chosen and rejected behind one shared prompt, see `pair_inputs`);
    loss_type sigmoid | ipo | hinge; agg mean | sum.
    The reference log-probs come from the reference cache when the batch's examples are in it.
    ProjGrad and ProjBP reuse this loss with their own capabilities (no packed layout, no cache)."""

    def __init__(self, cfg: DictConfig | Mapping[str, Any], *, packed_layout: bool = True, reference_cache: bool = True):
        super().__init__(cfg, packed_layout=packed_layout, reference_cache=reference_cache)

    def compute_loss(self, batch: dict[str, Tensor], use_cache: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.method_cfg
        inputs = self.pair_inputs(batch)

        def reference_forward() -> dict[str, Tensor]:
            return dict(zip(("logp_cho", "logp_rej", "nll_cho"), self.pair_logps(inputs)))

        ref, from_cache = self.cached_reference(batch, reference_forward, use_cache)
        pi_cho, pi_rej, pi_nll, wpo = self.policy_logps(inputs)
        per_pair = dpo_loss(pi_cho, pi_rej, ref["logp_cho"], ref["logp_rej"], cfg.beta, cfg.loss_type, cfg.label_smoothing)
        loss = weighted(per_pair, wpo).mean()
        metrics = dpo_metrics(pi_cho, pi_rej, ref["logp_cho"], ref["logp_rej"], cfg.beta)
        if wpo is not None:
            metrics["wpo/weight"] = wpo.mean()
        metrics |= {"nll/chosen": pi_nll.detach().mean(), "nll/chosen_ref": ref["nll_cho"].mean()}
        if self.ref_cache is not None:  # 1 when this batch's reference outputs came from the cache
            metrics["ref_cached"] = float(from_cache)
        return loss, metrics
