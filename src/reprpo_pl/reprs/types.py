"""The data a representation loss reads: pooled hidden states and log-probs for one batch."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ReprBatch:
    """Pooled (and transformed) hidden states plus completion log-probs of one batch of B pairs.

    Each dict maps a collection key (e.g. ``"hs.12"`` or ``"side.12.mlp.down_proj"``) to a
    ``[B, d_k]`` tensor. ``pi_*`` carry gradient (policy = base + adapter); ``ref_*`` are the
    same network with the adapter disabled and are detached.
    """

    pi_cho: dict[str, Tensor]
    pi_rej: dict[str, Tensor]
    ref_cho: dict[str, Tensor]
    ref_rej: dict[str, Tensor]
    pi_logp_cho: Tensor  # [B] aggregated completion log-prob (mean or sum per token, see `agg`)
    pi_logp_rej: Tensor  # [B]
    ref_logp_cho: Tensor  # [B]
    ref_logp_rej: Tensor  # [B]
    pi_nll_cho: Tensor  # [B] per-token-mean NLL of the chosen completion, policy
    ref_nll_cho: Tensor  # [B] same for the reference
    token_dev_cho: Tensor | None = None  # [B] masked mean_t ‖H^π − H^ref‖, mean over keys
    token_dev_rej: Tensor | None = None  # [B]
    dpo_weights: Tensor | None = None  # [B] detached WPO weights of the DPO term (method.wpo), None = off
    pi_token_logp_cho: Tensor | None = None  # [B, C] per-token (shifted) log-probs of the chosen completion, policy
    ref_token_logp_cho: Tensor | None = None  # [B, C] same for the reference; both only for a loss's needs_token_logps
    completion_mask_cho: Tensor | None = None  # [B, C] bool, the chosen completion's tokens among those C columns

    @property
    def keys(self) -> list[str]:
        return list(self.pi_cho)
