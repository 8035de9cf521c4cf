"""DPO on a LoRA adapter with the disabled adapter as reference (SPEC §3.1)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from reprpo_pl.methods.base import PreferenceModule
from reprpo_pl.methods.dpo_loss import dpo_loss, dpo_metrics


class DPOModule(PreferenceModule):
    """One forward per role (chosen and rejected behind one shared prompt, see `pair_inputs`);
    loss_type sigmoid | ipo | hinge; agg mean | sum.
    The reference log-probs come from the reference cache when the batch's examples are in it."""

    fast_paths: ClassVar[bool] = True  # not inherited: see PreferenceModule

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.method_cfg
        inputs = self.pair_inputs(batch)

        def reference_forward() -> dict[str, Tensor]:
            return dict(zip(("logp_cho", "logp_rej", "nll_cho"), self.pair_logps(inputs)))

        ref = self.cached_reference(batch, reference_forward)
        ref_cho, ref_rej, ref_nll = ref["logp_cho"], ref["logp_rej"], ref["nll_cho"]
        pi_cho, pi_rej, pi_nll = self.pair_logps(inputs)
        loss = dpo_loss(pi_cho, pi_rej, ref_cho, ref_rej, cfg.beta, cfg.loss_type, cfg.label_smoothing).mean()
        metrics = dpo_metrics(pi_cho, pi_rej, ref_cho, ref_rej, cfg.beta)
        metrics["nll/chosen"] = pi_nll.detach().mean()
        metrics["nll/chosen_ref"] = ref_nll.mean()
        return loss, metrics
