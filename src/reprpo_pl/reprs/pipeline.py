"""From collected completion states to the pooled, transformed vectors a ReprPO loss reads (SPEC §3.4).

`ReprPipeline` holds the one decision that makes this fast and keeps it exact: **pool first** when
``T(Σ_t w_t H_t) = Σ_t w_t T(H_t)``, i.e. the loss pools the states themselves (not their log-softmax) and the
transform is one linear map per token (`TransformTraits.commutes_with_mean`): then it holds for every token
weighting whose weights depend on the mask only (``collection.pooling``: mean, last, exp_decay); with attention-sink filtering the dropped
positions are found on raw norms, so the transform must also preserve norms. Then states are pooled to
``[2B, d]`` before the transform, and the reference's pooled (untransformed) states are constant per
example, so they can be cached (the methods' reference cache). Otherwise (supr, rank's log-softmax
pooling, per-token normalisation (``norm_before_reduce``), sink filtering through a norm-changing transform) every token is transformed, then pooled, as
the SPEC writes it, and the reference forward runs every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from reprpo_pl.reprs.pooling import (
    PoolingKind,
    TokenWeighting,
    filter_attention_sinks,
    pool,
    token_weights,
    weighted_mean,
)
from reprpo_pl.reprs.transforms import ReprTransform, transform_traits

States = dict[str, Tensor]  # collection key → states


@dataclass
class ReprPipeline:
    """``transform`` (owned, and trained, by the LightningModule), the loss's ``pooling`` and the
    collection's ``sink_k``. ``needs_token_deviation``: the loss also reads per-token reference states."""

    transform: ReprTransform
    pooling: PoolingKind
    sink_k: float | None
    needs_token_deviation: bool = False
    tokens: TokenWeighting = "mean"  # collection.pooling: which completion tokens, how much (`token_weights`)
    normalize_tokens: bool = False  # the loss's norm_before_reduce: pool H_t/‖H_t‖ (per token, after the transform)

    def __post_init__(self) -> None:
        traits = transform_traits(self.transform)
        self.pool_first = (self.pooling == "mean" and traits.commutes_with_mean and not self.normalize_tokens
                           and (self.sink_k is None or traits.preserves_norm))

    @property
    def reference_cacheable(self) -> bool:
        """Whether what `reference_states` keeps is constant per example and small (pooled, no tokens)."""
        return self.pool_first and not self.needs_token_deviation

    def reference_states(self, tokens: States, mask: Tensor) -> States:
        """What to keep of the reference's completion states ``{key: [2B, C, d]}``: per example
        ``pooled:<key> [B, 2, d]`` (chosen, rejected) when pooling first, else ``tokens:<key> [2B, C, d]``
        (also when the loss reads per-token deviations)."""
        out: States = {}
        if self.pool_first:
            out |= {f"pooled:{k}": torch.stack(v.chunk(2), 1) for k, v in self._pool_raw(tokens, mask).items()}
        if not self.pool_first or self.needs_token_deviation:
            out |= {f"tokens:{k}": v for k, v in tokens.items()}
        return out

    def pooled(self, policy_tokens: States, reference: States, mask: Tensor) -> tuple[States, States]:
        """Policy completion states ``{key: [2B, C, d]}`` and `reference_states` → transformed, pooled
        ``{key: [2B, d]}`` fp32 for policy and reference (chosen rows, then rejected)."""
        keys = list(policy_tokens)
        if self.pool_first:
            policy = self._transform_pooled(self._pool_raw(policy_tokens, mask))
            ref = self._transform_pooled({k: torch.cat(reference[f"pooled:{k}"].unbind(1)) for k in keys})
        else:
            policy = self._pool_tokens(policy_tokens, mask)
            ref = self._pool_tokens({k: reference[f"tokens:{k}"].detach() for k in keys}, mask)
        return policy, ref

    def _pool_raw(self, tokens: States, mask: Tensor) -> States:
        """Untransformed ``{key: [2B, C, d]}`` → masked means ``{key: [2B, d]}`` fp32, sinks dropped on raw
        norms (equal to transformed norms: pool_first needs a norm-preserving transform for that)."""
        return {k: weighted_mean(h, token_weights(mask if self.sink_k is None else filter_attention_sinks(h, mask, self.sink_k),
                                                  self.tokens))
                for k, h in tokens.items()}

    def _transform_pooled(self, pooled: States) -> States:
        """``T`` on pooled states ``{key: [N, d]}`` (each as one token per row) → ``{key: [N, d]}``."""
        some = next(iter(pooled.values()))
        ones = torch.ones(some.shape[0], 1, dtype=torch.bool, device=some.device)
        return {k: h.squeeze(1) for k, h in self.transform({k: h.unsqueeze(1) for k, h in pooled.items()}, ones).items()}

    def _pool_tokens(self, tokens: States, mask: Tensor) -> States:
        """``{key: [2B, C, d]}`` → transformed per token (unit-normalised with ``normalize_tokens``), then pooled
        ``{key: [2B, d]}``."""
        transformed = self.transform(tokens, mask)
        if self.normalize_tokens:
            transformed = {k: F.normalize(h, dim=-1) for k, h in transformed.items()}
        return {k: pool(h, mask, self.pooling, self.sink_k, self.tokens) for k, h in transformed.items()}


def token_deviation(policy: States, reference: States, mask: Tensor) -> Tensor:
    """``[2B]``: masked mean over completion tokens of ‖H^π − H^ref‖ (states ``[2B, C, d]``), averaged over keys."""
    m = mask.float()
    devs = [((policy[k] - reference[k].detach()).norm(dim=-1) * m).sum(-1) / m.sum(-1).clamp(min=1) for k in policy]
    return torch.stack(devs).mean(0)
