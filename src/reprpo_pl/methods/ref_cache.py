"""The reference cache: per-example reference outputs, computed once and reused in later epochs.

The reference is the base model with the adapter disabled, in eval mode: for a given example it
returns the same log-probs and hidden states at every step, so after the first epoch its forward
(about a third of a LoRA DPO step) is wasted work. `RefCache` keeps, per training example (the
``index`` column of a batch), what a method reads from that forward; a batch whose examples are all
cached skips the reference forward entirely (``ref_cache.enabled``, default true).

What is cached [decided]:

- DPO: the aggregated reference log-probs of chosen and rejected and the chosen NLL, ``[B]`` each.
- ReprPO: the same, plus per collected layer the reference states **pooled over completion tokens
  before the transform**, ``[B, 2, d]`` (chosen, rejected). The transform is learnable and is applied
  to reference states too, so transformed states are never constant; but when the transform is one
  fixed linear map per token (none, ETHER, HRA, ortho, svd) mean-pooling commutes with it,
  ``T(mmean_t H) = mmean_t T(H)``, and ``T`` is applied to the cached pooled state at every step.
  With attention-sink filtering (``collection.sink_k``) the dropped positions depend on state norms,
  so it also needs a norm-preserving transform (none, HRA, ortho). `transform_traits` says what
  holds per transform
  (each transform class declares its ``traits``).
- Nothing when a method needs per-token reference states: a transform that is not linear per token
  (supr), a pooling that is not a plain mean (rank's log-softmax), a loss with
  ``needs_token_deviation`` (innerdpo's ``use_token_constraint``), or a method whose hooks read the
  reference forward (ProjGrad, ProjBP). Caching per-token states (``[n, T, d]`` per layer) is too big.

Cached values are keyed by the example index and by a fingerprint of everything that changes them
(`reference_fingerprint`: model, data and tokenisation, aggregation, collection layers/mode/modules,
sink filter, pooling); a changed fingerprint empties the cache. It lives in memory (on CPU) for one
run, is filled during training steps only, and is not saved in checkpoints (a resumed run refills it).
Values come back bit-identical to the forward that produced them; a fresh forward in another batch
differs only by float rounding (padding and batch composition change the reduction order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor


def reference_fingerprint(cfg: DictConfig | Mapping[str, Any], **extra: Any) -> str:
    """A short hash of the run settings that change reference outputs for a given example index:
    the model (name, dtype, tiny seed), the training data (root, source, seed, n_train) and its
    tokenisation (max_length, max_prompt_length, chat_template), ``method.agg``, plus ``extra``
    (e.g. collection mode/layers/modules, sink filter, pooling)."""

    def section(name: str, keys: tuple[str, ...]) -> dict[str, Any]:
        node = cfg.get(name) if cfg is not None else None
        if node is None:
            return {}
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        return {k: node.get(k) for k in keys}

    settings = {
        "model": section("model", ("name_or_path", "dtype", "seed", "revision")),
        "data": section("data", ("root", "seed", "n_train", "max_length", "max_prompt_length", "chat_template")),
        "dataset": section("dataset", ("source",)),
        "method": section("method", ("agg",)),
        "extra": extra,
    }
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RefCache:
    """Per-example tensors by example index, stored on CPU.

    `store(index, values)`: ``index [B]`` ints, ``values`` a dict of tensors with leading dim B.
    `lookup(index, device)`: the same dict for these indices when every one is cached (else None).
    `bind(fingerprint)` empties the cache when the fingerprint differs from the stored one.
    """

    def __init__(self) -> None:
        self.fingerprint: str | None = None
        self._values: dict[str, Tensor] = {}
        self._filled = torch.zeros(0, dtype=torch.bool)
        self.hits = 0  # batches served from the cache
        self.misses = 0  # batches that ran the reference forward

    def bind(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            self.clear()
            self.fingerprint = fingerprint

    def clear(self) -> None:
        self._values, self._filled = {}, torch.zeros(0, dtype=torch.bool)

    def __len__(self) -> int:
        return int(self._filled.sum())

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._values.values())

    def lookup(self, index: Tensor, device: torch.device | str) -> dict[str, Tensor] | None:
        index = index.cpu()
        if not self._values or int(index.max()) >= len(self._filled) or not bool(self._filled[index].all()):
            return None
        return {name: stored[index].to(device) for name, stored in self._values.items()}

    def store(self, index: Tensor, values: Mapping[str, Tensor]) -> None:
        index = index.cpu()
        self._grow(int(index.max()) + 1)
        for name, value in values.items():
            value = value.detach().cpu()
            if name not in self._values:
                if self._filled.any():
                    raise ValueError(f"reference cache: entry {name!r} is new but other examples are cached without it")
                self._values[name] = torch.zeros((len(self._filled), *value.shape[1:]), dtype=value.dtype)
            self._values[name][index] = value
        self._filled[index] = True

    def _grow(self, size: int) -> None:
        if size <= len(self._filled):
            return
        size = max(size, 2 * len(self._filled))
        grown = torch.zeros(size, dtype=torch.bool)
        grown[: len(self._filled)] = self._filled
        self._filled = grown
        for name, stored in self._values.items():
            bigger = torch.zeros((size, *stored.shape[1:]), dtype=stored.dtype)
            bigger[: len(stored)] = stored
            self._values[name] = bigger
