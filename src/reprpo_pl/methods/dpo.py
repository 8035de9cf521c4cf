"""DPO on a LoRA adapter with the disabled adapter as reference (SPEC §3.1)."""

from __future__ import annotations

from torch import Tensor

from reprpo_pl.data.collator import concat_pairs
from reprpo_pl.methods.base import PreferenceModule
from reprpo_pl.methods.dpo_loss import dpo_loss, dpo_metrics


class DPOModule(PreferenceModule):
    """One concatenated forward per role; loss_type sigmoid | ipo | hinge; agg mean | sum."""

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.method_cfg
        inputs = concat_pairs(batch)
        with self.reference():
            ref_cho, ref_rej, ref_nll = self.pair_logps(inputs)
        pi_cho, pi_rej, pi_nll = self.pair_logps(inputs)
        loss = dpo_loss(pi_cho, pi_rej, ref_cho, ref_rej, cfg.beta, cfg.loss_type, cfg.label_smoothing).mean()
        metrics = dpo_metrics(pi_cho, pi_rej, ref_cho, ref_rej, cfg.beta)
        metrics["nll/chosen"] = pi_nll.detach().mean()
        metrics["nll/chosen_ref"] = ref_nll.mean()
        return loss, metrics
