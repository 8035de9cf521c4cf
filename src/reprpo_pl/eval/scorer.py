"""Per-row log-prob statistics for the base model and the adapter in one pass over a dataset (SPEC §5)."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import torch
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from peft import PeftModel
from torch import Tensor
from torch.utils.data import DataLoader

from reprpo_pl.models.logprobs import completion_logps, pair_model_inputs
from reprpo_pl.progress import is_terminal

log = logging.getLogger(__name__)


@dataclass
class RowScores:
    """Per-row statistics, each ``[N]``: summed completion log-probs and token counts."""

    logp_cho: Tensor
    logp_rej: Tensor
    n_cho: Tensor
    n_rej: Tensor

    @property
    def correct(self) -> Tensor:
        """``[N]`` bool: per-token-mean log-prob of chosen exceeds rejected's."""
        return self.logp_cho / self.n_cho > self.logp_rej / self.n_rej

    @property
    def log_ppl_cho(self) -> Tensor:
        return -self.logp_cho / self.n_cho

    def to_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in ("logp_cho", "logp_rej", "n_cho", "n_rej")}

    def stack(self) -> Tensor:
        """``[N, 4]``: the four fields as columns (the inverse of `from_stacked`)."""
        return torch.stack([self.logp_cho, self.logp_rej, self.n_cho, self.n_rej], dim=1)

    @classmethod
    def from_stacked(cls, columns: Tensor) -> RowScores:
        """From ``[N, 4]`` columns ``logp_cho, logp_rej, n_cho, n_rej``."""
        return cls(*columns.unbind(dim=1))

    def select(self, index: Tensor) -> RowScores:
        """The rows at ``index`` (``[n]`` positions)."""
        return RowScores.from_stacked(self.stack()[index])


@torch.no_grad()
def score_pairs(model: PeftModel, loader: DataLoader, with_adapter: bool = True, with_base: bool = True,
                desc: str = "score") -> dict[str, RowScores]:
    """Score every pair of ``loader`` with the adapter and/or with it disabled, batch by batch.

    Uses the packed layout (each prompt encoded once for both completions) where the model supports
    it. Returns ``{"adapter": RowScores, "base": RowScores}`` (only the roles asked for; ``[0]`` each when
    ``loader`` is empty, e.g. a rank's shard of a target with fewer batches than ranks).

    Progress: on a terminal a transient tqdm bar (Lightning's class, on stdout like its training bar,
    below it when one is open); elsewhere one log line per call, ``<desc>: <n> pairs in <t> s``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    roles = [r for r, on in (("adapter", with_adapter), ("base", with_base)) if on]
    parts: dict[str, list[Tensor]] = {role: [torch.empty(4, 0)] for role in roles}
    started, terminal = time.perf_counter(), is_terminal()
    try:
        for batch in Tqdm(loader, desc=desc, leave=False, disable=not terminal, dynamic_ncols=True, file=sys.stdout):
            inputs = {k: v.to(device) for k, v in pair_model_inputs(model, batch).items()}
            counts = inputs["completion_mask"].sum(-1).float()
            for role in roles:
                if role == "base":
                    with model.disable_adapter():
                        sums = completion_logps(model, inputs).sum(-1)
                else:
                    sums = completion_logps(model, inputs).sum(-1)
                parts[role].append(torch.stack([*sums.chunk(2), *counts.chunk(2)]).float().cpu())
    finally:
        model.train(was_training)
    scores = {role: RowScores(*torch.cat(chunks, dim=1)) for role, chunks in parts.items()}
    if not terminal and scores:
        log.info("%s: %d pairs in %.1f s", desc, next(iter(scores.values())).logp_cho.numel(), time.perf_counter() - started)
    return scores
