"""Transforms applied to collected hidden states before pooling (SPEC §3.4 "Transforms").

One file per transform (``none``, ``ether``, ``hra``, ``ortho``, ``svd``, ``supr``), one yaml per
transform in ``conf/transform/``. A yaml names its class with ``_target_`` and ``_partial_: true``;
`build_transform` instantiates it with Hydra and completes it in one of two ways:

- a per-key module (``none``, ``ether``, ``hra``, ``ortho``): built once per collected key with
  ``dim=dims[key]`` (and ``key=key`` when its constructor takes a ``key``: ETHER seeds its init with
  `key_seed`), so each key has its own parameters; ``forward(h: [B, T, d]) -> [B, T, d]``. HRA and
  ortho draw their init from torch's global generator (seeded by the run's ``seed``), one key after another.
- a `ReprTransform` subclass (``svd``, ``supr``): built once from
  ``keys, dims, model, collection_mode``, because it reads frozen model tensors (unembedding,
  final norm) or mixes keys. Frozen model tensors never enter its parameters or its state_dict.
"""

from __future__ import annotations

import hashlib
import inspect
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from reprpo_pl.errors import UserError


@dataclass(frozen=True)
class TransformTraits:
    """What a transform ``T`` of per-token states lets the pooling (and the reference cache) do.
    Each transform class declares its own as the class attribute ``traits``; `tests/methods/test_ref_cache.py`
    checks the declarations numerically.

    commutes_with_mean: T is one linear map for every token, ``T(h) = hM`` (no bias, no dependence on
        other tokens or on the states), so ``T(mmean_t H) = mmean_t T(H)``: pool first, transform ``[B, d]``.
    preserves_norm: ``‖T(h)‖ = ‖h‖`` (orthogonal M), so attention sinks found on raw norms are the ones
        found on transformed norms.
    learnable: T has trainable parameters (trained with the adapter, saved in checkpoints and the adapter folder).
    """

    commutes_with_mean: bool = False
    preserves_norm: bool = False
    learnable: bool = False


def transform_traits(transform: nn.Module) -> TransformTraits:
    """The declared traits of a built transform; a `PerKeyTransform` has those all its per-key modules
    share. A class that declares none gets neither trait (safe: per-token path, no reference cache)."""
    if isinstance(transform, PerKeyTransform):
        each = [transform_traits(module) for module in transform.per_key.values()]
        return TransformTraits(all(t.commutes_with_mean for t in each), all(t.preserves_norm for t in each),
                               any(t.learnable for t in each))
    declared = getattr(type(transform), "traits", None)
    return declared if isinstance(declared, TransformTraits) else TransformTraits()


class ReprTransform(nn.Module):
    """Maps collected states to transformed states with the same keys and shapes.

    ``forward(hs, mask)``: ``hs`` is ``{key: [B, T, d_key]}``, ``mask`` ``[B, T]`` bool marks the
    real completion tokens; returns ``{key: [B, T, d_key]}``.
    """

    def forward(self, hs: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


class PerKeyTransform(ReprTransform):
    """Applies its own module to each key's states: ``[B, T, d_key] -> [B, T, d_key]``; ignores the mask."""

    def __init__(self, per_key: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.per_key = nn.ModuleDict({module_key(key): module for key, module in per_key.items()})

    def forward(self, hs: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        return {key: self.per_key[module_key(key)](h) for key, h in hs.items()}


def module_key(key: str) -> str:
    """A collection key as an ``nn.ModuleDict`` key (no dots; keys never contain "-", so this is
    one-to-one): ``"side.12.mlp.down_proj" -> "side-12-mlp-down_proj"``."""
    return key.replace(".", "-")


def transform_names() -> list[str]:
    """The available transforms: the modules of this package (one file per transform)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_transform(
    cfg: Mapping | DictConfig,
    keys: list[str],
    dims: dict[str, int],
    model: nn.Module,
    collection_mode: str,
) -> ReprTransform:
    """Instantiate the transform described by a ``conf/transform/*.yaml`` config for these keys.

    Args:
        cfg: ``name`` (a label), ``_target_`` (the class: a shipped one or any importable one), ``_partial_: true``
            and the class's hyper-parameters.
        keys: collection keys, e.g. ``["hs.2", "hs.3"]``.
        dims: width of each key's states.
        model: the (possibly peft-wrapped) causal LM the states come from.
        collection_mode: ``"hs"`` or ``"side"``.
    """
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = config.pop("name", None)
    if "_target_" not in config or config.get("_partial_") is not True:
        raise UserError(f"transform {name!r}: the config needs `_target_: <class>` and `_partial_: true` "
                        f"(see conf/transform/ether.yaml); shipped transforms: {', '.join(transform_names())}")
    make = instantiate(config)
    if isinstance(make.func, type) and issubclass(make.func, ReprTransform):
        return make(keys=list(keys), dims=dict(dims), model=model, collection_mode=collection_mode)
    takes_key = "key" in inspect.signature(make.func).parameters
    return PerKeyTransform({key: make(dim=dims[key], **({"key": key} if takes_key else {})) for key in keys})


def key_seed(seed: int, key: str) -> int:
    """A seed for one key's random init, stable across processes and Python versions (unlike ``hash``):
    the first 8 bytes of BLAKE2b of ``"<seed>/<key>"``, e.g. ``key_seed(0, "hs.2") != key_seed(0, "hs.3")``."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "little")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` under a peft wrapper (the model itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unembedding(model: nn.Module) -> Tensor:
    """The output embedding (lm_head) weight ``[V, d]``, detached."""
    return unwrap_model(model).get_output_embeddings().weight.detach()


def embedding(model: nn.Module) -> Tensor:
    """The input embedding weight ``[V, d]``, detached."""
    return unwrap_model(model).get_input_embeddings().weight.detach()


_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last block's output before the unembedding (Llama/Qwen ``model.norm``,
    GPT-2 ``transformer.ln_f``, ...), found on the HF base model through peft wrappers."""
    hf_model = unwrap_model(model)
    decoder = getattr(hf_model, "base_model", hf_model)
    for name in _FINAL_NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(
        f"cannot find the final norm of {type(hf_model).__name__}: expected a submodule of its base model "
        f"named {' or '.join(_FINAL_NORM_NAMES)}"
    )


def gram(weight: Tensor, chunk_rows: int = 8192) -> Tensor:
    """``WᵀW`` ``[d, d]`` in float64 for a ``[V, d]`` matrix, accumulated over row chunks (no [V, d] fp64 copy)."""
    out = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
    for rows in weight.split(chunk_rows):
        rows = rows.double()
        out += rows.T @ rows
    return out
