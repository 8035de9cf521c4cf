"""ReprPO: a loss on (transformed, pooled) hidden states, chosen by the `loss` group (SPEC §3.4)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from reprpo_pl.data.collator import concat_pairs
from reprpo_pl.methods.base import PreferenceModule
from reprpo_pl.reprs.collection import HiddenStateCollector
from reprpo_pl.reprs.layers import parse_layers
from reprpo_pl.reprs.pooling import pool
from reprpo_pl.reprs.transforms import build_transform
from reprpo_pl.reprs.types import ReprBatch


class ReprPOModule(PreferenceModule):
    """Collect hidden states of policy and reference in one concatenated forward each, transform
    them (learnable, e.g. ETHER), pool over completion tokens, and hand a `ReprBatch` to the loss."""

    def __init__(self, cfg: DictConfig | Mapping[str, Any]):
        super().__init__(cfg)
        coll = self.cfg.collection
        layers = parse_layers(coll.layers, self.model.config.num_hidden_layers)
        self.collector = HiddenStateCollector(self.model, coll.mode, layers, coll.collect_input, list(coll.modules))
        self.loss_fn = instantiate({k: v for k, v in self.cfg.loss.items() if k != "name"})
        self.transform = build_transform(self.cfg.transform, self.collector.keys, self.collector.dims, self.model, coll.mode)

    def _pool(self, states: dict[str, Tensor], mask: Tensor, prompt_len: int) -> dict[str, Tensor]:
        """``{key: [2B, P+C, d]}`` → transformed, pooled over completion tokens ``{key: [2B, d]}``."""
        completion = {k: h[:, prompt_len:] for k, h in states.items()}
        transformed = self.transform(completion, mask)
        return {k: pool(h, mask, self.loss_fn.pooling, self.cfg.collection.sink_k) for k, h in transformed.items()}

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = concat_pairs(batch)
        mask = inputs["completion_mask"]
        prompt_len = batch["prompt_ids"].shape[1]
        with self.reference(), self.collector as ref_states:
            ref_cho, ref_rej, ref_nll = self.pair_logps(inputs)
        with self.collector as pi_states:
            pi_cho, pi_rej, pi_nll = self.pair_logps(inputs)
        self.check_finite({k: h for k, h in pi_states.items()}, where="hidden state at")
        ref_pooled = self._pool({k: h.detach() for k, h in ref_states.items()}, mask, prompt_len)
        pi_pooled = self._pool(pi_states, mask, prompt_len)
        split = lambda d: ({k: v.chunk(2)[0] for k, v in d.items()}, {k: v.chunk(2)[1] for k, v in d.items()})  # noqa: E731
        (pi_c, pi_r), (ref_c, ref_r) = split(pi_pooled), split(ref_pooled)
        dev_cho = dev_rej = None
        if self.loss_fn.needs_token_deviation:
            dev_cho, dev_rej = self._token_deviation(pi_states, ref_states, mask, prompt_len).chunk(2)
        reprs = ReprBatch(pi_c, pi_r, ref_c, ref_r, pi_cho, pi_rej, ref_cho, ref_rej, pi_nll, ref_nll, dev_cho, dev_rej)
        loss, metrics = self.loss_fn(reprs)
        metrics = {**metrics, "nll/chosen": pi_nll.detach().mean(), "nll/chosen_ref": ref_nll.mean()}
        return loss, metrics

    @staticmethod
    def _token_deviation(pi: dict[str, Tensor], ref: dict[str, Tensor], mask: Tensor, prompt_len: int) -> Tensor:
        """``[2B]``: masked mean over completion tokens of ‖H^π − H^ref‖, averaged over keys."""
        m = mask.float()
        devs = [((pi[k][:, prompt_len:] - ref[k][:, prompt_len:].detach()).norm(dim=-1) * m).sum(-1) / m.sum(-1).clamp(min=1)
                for k in pi]
        return torch.stack(devs).mean(0)
