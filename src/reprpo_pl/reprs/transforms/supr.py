"""``supr``: suppressed activations, the features whose change pushes logits down (SPEC §3.4, hs only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprpo_pl.errors import UserError
from reprpo_pl.reprs.transforms import (
    ReprTransform,
    TransformTraits,
    final_norm,
    gram,
    unembedding,
    unwrap_model,
)


class SuppressedActivations(ReprTransform):
    """Keep, in each collected layer's state, the features whose change suppressed logits.

    Keys ``hs.k_1 < … < hs.k_n`` (sorted by layer, n ≥ 2), states ``h_i`` ``[B, T, d]``, ``mask``
    ``[B, T]``; ``W`` ``[V, d]`` is the unembedding, ``norm`` the model's final norm.

    1. ``t_b`` = position of the last real completion token of row b (the last True of
       ``mask[b]``) [decided], never a padding position; ``x_i = h_i[b, t_b]`` ``[B, d]``.
    2. Logits per layer: ``ℓ_i = norm(x_i) Wᵀ`` ``[B, V]``.
    3. Per consecutive pair (k_i, k_{i+1}): logit decrease ``δ = relu(ℓ_i − ℓ_{i+1})`` ``[B, V]``
       (only the tokens pushed down), mapped back with the pseudo-inverse:
       ``s = W⁺ δ = (WᵀW)⁺ Wᵀ δ`` ``[B, d]``; ``keep_{i+1} = s > threshold`` ``[B, d]``.
    4. Output: key ``k_{i+1}`` → ``h_{i+1} ⊙ keep_{i+1}`` (the state after the suppression, as the
       prototype's ``hs[1:] * mask``), the feature mask broadcast over all T positions; the first
       key, which has no earlier collected layer, uses the first pair's mask: ``h_1 ⊙ keep_2``.
       The last key uses the pair (k_{n−1}, k_n). Shapes ``[B, T, d]`` as input.

    Steps 1–3 run without gradient; the output carries the gradient of the kept features of h.
    Departure from the prototype: it thresholded the plain logit difference, whose round trip
    ``W⁺ W Δ`` is the identity on the normed-state difference; the relu makes the logit detour
    select suppression only. It also read position T−1, a padding position for short rows.

    Parameters: none. ``(WᵀW)⁺`` ``[d, d]`` is a non-persistent buffer; W and the final norm are
    read from the model's own modules at each forward (never copied, trained or saved).
    """

    traits = TransformTraits(commutes_with_mean=False, preserves_norm=False)  # the mask depends on the states

    def __init__(
        self,
        keys: list[str],
        dims: dict[str, int],
        model: nn.Module,
        collection_mode: str,
        threshold: float = 0.1,
    ) -> None:
        super().__init__()
        if collection_mode != "hs":
            raise UserError(f"transform=supr needs collection.mode=hs (got collection.mode={collection_mode})")
        if len(keys) < 2:
            raise UserError(f"transform=supr compares consecutive collected layers and needs ≥ 2 of them, got {keys}: list more in collection.layers")
        self.keys = sorted(keys, key=lambda key: int(key.split(".")[1]))
        self.threshold = threshold
        self._readout = (unwrap_model(model).get_output_embeddings(), final_norm(model))  # a tuple: not registered
        self.register_buffer("gram_pinv", torch.linalg.pinv(gram(unembedding(model))).float(), persistent=False)

    @torch.no_grad()
    def suppressed_features(self, hs: dict[str, Tensor], mask: Tensor) -> list[Tensor]:
        """Per key in `keys` order, the bool feature mask ``[B, d]`` (steps 1–3 of the class docstring)."""
        lm_head, norm = self._readout
        weight = lm_head.weight.detach()
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * positions).argmax(-1)  # [B]
        rows = torch.arange(mask.shape[0], device=mask.device)
        logits = [F.linear(norm(hs[key][rows, last]).to(weight.dtype), weight).float() for key in self.keys]
        keep = []
        for earlier, later in zip(logits, logits[1:]):
            decrease = (earlier - later).clamp(min=0)  # [B, V]
            suppressed = (decrease.to(weight.dtype) @ weight).float() @ self.gram_pinv  # [B, d]
            keep.append(suppressed > self.threshold)
        return [keep[0], *keep]

    def forward(self, hs: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        keep = dict(zip(self.keys, self.suppressed_features(hs, mask)))
        return {key: h * keep[key][:, None, :].to(h.dtype) for key, h in hs.items()}
