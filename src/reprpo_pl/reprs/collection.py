"""Collect hidden states from a causal LM with forward hooks, only at the listed decoder blocks.

Two collection modes (SPEC §3.4):

- ``"hs"``: the residual stream after decoder block k, key ``"hs.<k>"``, ``[B, T, d]``.
  Block k's output is HF's ``output_hidden_states[k + 1]``, except for the last block, where HF
  reports the state after the final norm.
- ``"side"``: the input (``collect_input=True``, default ``o_proj`` and ``down_proj``) or output
  (e.g. q/k/v/gate/up) of the submodules of block k whose path relative to the block matches a
  regex, key ``"side.<k>.<path>"`` (e.g. ``"side.12.mlp.down_proj"``), ``[B, T, width]``.
  Only the listed blocks are hooked [decided]; the prototype hooked every block in side mode.

States keep the autograd graph, so a loss on them trains the adapter. With peft the hooks sit on
the LoRA-wrapped module (``self_attn.o_proj``), so they also work under ``disable_adapter()``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from types import TracebackType
from typing import Literal

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from reprpo_pl.errors import UserError
from reprpo_pl.reprs.layers import parse_layers

DEFAULT_SIDE_MODULES: tuple[str, ...] = (r"self_attn\.o_proj$", r"mlp\.down_proj$")
"""Regexes (``re.search`` on the path relative to a block) of the modules whose inputs ``side`` collects."""

_BLOCK_LIST_NAMES = ("layers", "h")  # Llama/Qwen/OLMo/Mistral `model.layers`; GPT-2 `transformer.h`


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, blocks)``: the ``nn.ModuleList`` of decoder blocks, found through peft wrappers.

    Takes the ModuleList named ``layers`` (or GPT-2's ``h``); if several exist (e.g. a vision
    tower), the one whose length is the text config's ``num_hidden_layers``.
    """
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES
    ]
    if len(found) > 1:
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        depth = getattr(text_config, "num_hidden_layers", None)
        found = [(name, module) for name, module in found if len(module) == depth]
    if len(found) != 1:
        raise UserError(
            f"cannot find the decoder blocks of {type(model).__name__}: expected one nn.ModuleList named "
            f"{' or '.join(_BLOCK_LIST_NAMES)} (found {[name for name, _ in found]})"
        )
    return found[0]


class HiddenStateCollector:
    """Forward hooks that gather hidden states of the listed decoder blocks into a dict.

    Usage::

        collector = HiddenStateCollector(model, "hs", parse_layers("0.5:-2", n_layers))
        with collector as states:          # states: dict[key, Tensor [B, T, dims[key]]]
            out = model(input_ids=ids, attention_mask=mask)
        # states now holds one tensor per key in collector.keys

    ``layers`` are block indices (negative count from the end) or any spec ``parse_layers`` reads.
    ``modules`` are regexes searched in module paths relative to a block (side mode only).

    Each forward of the model replaces the dict's contents (one concatenated forward of 2B rows
    gives ``[2B, T, d]`` states). A key already filled during the current forward is not
    overwritten: non-reentrant gradient checkpointing re-runs a block's forward during backward,
    which fires the hooks of its submodules again (and, before transformers 5, of the block
    itself); those recomputed tensors are ignored, so the dict, the states and the gradients
    match a run without checkpointing. Side mode refuses reentrant checkpointing, whose forward
    runs the block without grad and would give states that cannot train the adapter.

    Attributes:
        mode: ``"hs"`` or ``"side"``.
        n_layers: number of decoder blocks L.
        layers: sorted absolute block indices that are hooked.
        keys: ``"hs.<k>"`` or ``"side.<k>.<path>"``, in layer order.
        dims: width of each key's vectors (the last axis of its state).
    """

    def __init__(
        self,
        model: nn.Module,
        mode: Literal["hs", "side"],
        layers: Sequence[int] | str,
        collect_input: bool = True,
        modules: Sequence[str] = DEFAULT_SIDE_MODULES,
    ) -> None:
        blocks_path, blocks = find_decoder_blocks(model)
        self.mode = mode
        self.n_layers = len(blocks)
        self.layers = parse_layers(layers, self.n_layers)
        # The module that runs the blocks: its pre-hook marks the start of each forward.
        self._decoder = model.get_submodule(blocks_path.rpartition(".")[0])
        self._targets: dict[str, tuple[nn.Module, bool]] = {}  # key -> (module, take its input?)
        self.dims: dict[str, int] = {}
        if mode == "hs":
            hidden_size = _hidden_size(model)
            for k in self.layers:
                self._targets[f"hs.{k}"] = (blocks[k], False)
                self.dims[f"hs.{k}"] = hidden_size
        elif mode == "side":
            for k in self.layers:
                for path, module in _match_side_modules(blocks[k], k, modules).items():
                    self._targets[f"side.{k}.{path}"] = (module, collect_input)
                    self.dims[f"side.{k}.{path}"] = _linear_width(module, collect_input, path)
        else:
            raise UserError(f"collection mode {mode!r} is unknown (use 'hs' or 'side')")
        self.keys = list(self._targets)
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> dict[str, Tensor]:
        """Register the hooks; return the (empty) dict that the model's forward fills."""
        if self._handles:
            raise RuntimeError("HiddenStateCollector is already active; exit it before entering again")
        if self.mode == "side" and torch.is_grad_enabled():
            _check_no_reentrant_checkpointing(self._decoder)
        states: dict[str, Tensor] = {}
        self._handles.append(self._decoder.register_forward_pre_hook(lambda module, args: states.clear()))
        for key, (module, take_input) in self._targets.items():
            self._handles.append(module.register_forward_hook(partial(_store, states, key, take_input)))
        return states

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Remove the hooks (also when the forward raised)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _store(
    states: dict[str, Tensor], key: str, take_input: bool, module: nn.Module, args: tuple, output: object
) -> None:
    """Forward hook: keep the module's input ``args[0]`` or its output (first item if a tuple)."""
    if key in states:  # gradient-checkpointing recompute during backward: keep the forward's tensor
        return
    value = args[0] if take_input else output
    states[key] = value[0] if isinstance(value, tuple) else value


def _check_no_reentrant_checkpointing(decoder: nn.Module) -> None:
    """Side states need ``use_reentrant=False``: reentrant checkpointing runs block internals without grad."""
    for module in decoder.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        reentrant = getattr(func, "keywords", {}).get("use_reentrant", False)
        if module.training and getattr(module, "gradient_checkpointing", False) and reentrant:
            raise UserError(
                "side collection under reentrant gradient checkpointing gives states without gradient: "
                "enable it with gradient_checkpointing_kwargs={'use_reentrant': False}"
            )


def _match_side_modules(block: nn.Module, layer: int, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """Submodules of ``block`` whose relative path matches any regex; peft internals are skipped.

    With peft, ``self_attn.o_proj`` is the LoRA wrapper and ``self_attn.o_proj.base_layer`` /
    ``.lora_A.default`` its internals: only the wrapper is a candidate. Every regex must match
    at least one module of every listed block.
    """
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as err:
        raise UserError(f"side-collection module regexes {list(patterns)!r}: invalid regex ({err})") from err
    tuner_prefixes = tuple(f"{name}." for name, m in block.named_modules() if isinstance(m, BaseTunerLayer))
    candidates = {
        name: module
        for name, module in block.named_modules()
        if name and not name.startswith(tuner_prefixes)
    }
    unmatched = [p.pattern for p in compiled if not any(p.search(name) for name in candidates)]
    if not compiled or unmatched:
        leaves = [name for name, m in candidates.items() if isinstance(m, BaseTunerLayer) or not list(m.children())]
        raise UserError(
            f"side-collection module regexes {unmatched or list(patterns)!r} match nothing in block {layer} "
            f"(regexes are searched in paths relative to the block; available: {', '.join(leaves[:8])})"
        )
    return {name: module for name, module in candidates.items() if any(p.search(name) for p in compiled)}


def _hidden_size(model: nn.Module) -> int:
    """Width d of the residual stream, from the (text) config."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden_size = getattr(text_config, "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise UserError(f"cannot read hidden_size from the config of {type(model).__name__}")
    return hidden_size


def _linear_width(module: nn.Module, take_input: bool, path: str) -> int:
    """Input or output width of a linear-like module (nn.Linear, peft LoRA wrapper, GPT-2 Conv1D)."""
    width = getattr(module, "in_features" if take_input else "out_features", None)
    weight = getattr(module, "weight", None)
    if width is None and hasattr(module, "nf") and isinstance(weight, Tensor):  # GPT-2 Conv1D: weight [in, out]
        width = weight.shape[0] if take_input else module.nf
    if not isinstance(width, int):
        raise UserError(
            f"side-collection module {path!r} ({type(module).__name__}) is not linear-like, so its width is "
            "unknown: match Linear modules such as 'self_attn\\.o_proj$' or 'mlp\\.down_proj$'"
        )
    return width
