"""The trained adapter in peft's own format, beside the run: ``<run dir>/adapter/``.

    adapter/
      adapter_config.json          peft's LoraConfig        } PeftModel.from_pretrained(base, "<run dir>/adapter")
      adapter_model.safetensors    the LoRA weights         }
      README.md                    peft's model card
      transform.safetensors        the learnable transform's state_dict (ReprPO methods with a stateful transform only)
      config.yaml                  the resolved run config (what last.ckpt stores as hyper_parameters.cfg)
      trainer_state.json           {"global_step", "epoch"} at the end of training

`AdapterExport` writes it at the end of training, before `ShiftEvalCallback` writes results.json
(which marks a complete run): the folder is built in a temporary folder beside it and renamed into
place, so a killed run leaves either no adapter folder or a complete one. At the start of training it
logs the trainable-parameter count (peft's ``print_trainable_parameters``, plus the transform's).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
CONFIG_FILE = "config.yaml"
TRANSFORM_FILE = "transform.safetensors"
TRAINER_STATE = "trainer_state.json"
ADAPTER_NAME = "default"  # add_lora's (peft's default) adapter name; saved at the folder's top level


def run_config(module: Any) -> dict[str, Any]:
    """The module's resolved run config, as its checkpoints store it (``hyper_parameters.cfg``)."""
    stored = (getattr(module, "hparams", None) or {}).get("cfg")
    if isinstance(stored, Mapping):
        return OmegaConf.to_container(OmegaConf.create(dict(stored)), resolve=True)  # type: ignore[return-value]
    cfg = module.cfg
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def transform_state(module: Any) -> dict[str, Tensor]:
    """The learnable transform's state_dict (parameters and persistent buffers), on the CPU; {} when
    the method has no transform (DPO, ProjGrad, ProjBP) or one without state (``none``, ``svd``, ``supr``)."""
    transform = getattr(module, "transform", None)
    if not isinstance(transform, torch.nn.Module):
        return {}
    return {k: v.detach().cpu().contiguous() for k, v in transform.state_dict().items()}


def parameter_counts(module: Any) -> dict[str, tuple[int, int]]:
    """``{part: (trainable, all)}``: ``model`` (peft's count, which knows quantised weights) and each
    other top-level child holding parameters (e.g. ``transform``)."""
    trainable, total = module.model.get_nb_trainable_parameters()
    counts = {"model": (int(trainable), int(total))}
    for name, p in module.named_parameters():  # shared tensors are listed once, under the first name
        part = name.split(".", 1)[0]
        if part == "model":
            continue
        t, a = counts.get(part, (0, 0))
        counts[part] = (t + (p.numel() if p.requires_grad else 0), a + p.numel())
    return counts


def trainable_summary(module: Any) -> str:
    """``trainable params: N (LoRA n + transform m) || all params: M || trainable%: x`` (peft's format)."""
    counts = parameter_counts(module)
    trainable, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}"
    if len(counts) > 1:
        parts = " + ".join(f"{'LoRA' if k == 'model' else k} {t:,d}" for k, (t, _) in counts.items())
        line += f" ({parts})"
    return line


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_adapter(module: Any, target: str | Path, trainer_state: Mapping[str, Any] | None = None) -> Path:
    """Write ``module``'s adapter (layout in the module docstring) into ``target``, atomically: into a
    temporary folder beside it, then renamed into place (an existing ``target`` is replaced)."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{target.name}.*.tmp"):  # left by a run killed while exporting
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp"))
    old: Path | None = None
    try:
        # save_embedding_layers=False: the vocabulary is never resized, and "auto" would look the base
        # model up on the hub to check that
        module.model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=[ADAPTER_NAME],
                                     save_embedding_layers=False)
        state = transform_state(module)
        if state:
            from safetensors.torch import save_file

            save_file(state, str(tmp / TRANSFORM_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(run_config(module))))
        if trainer_state is not None:
            (tmp / TRAINER_STATE).write_text(json.dumps(dict(trainer_state), indent=2) + "\n")
        for path in tmp.iterdir():
            if path.is_file():
                os.chmod(path, 0o644)
                _fsync(path)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 otherwise
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp"))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists() and (old / target.name).exists():
            os.replace(old / target.name, target)  # put the previous export back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


class AdapterExport(L.Callback):
    """Log the trainable-parameter count when fitting starts; write ``<default_root_dir>/<dirname>``
    (see `export_adapter`) when training ends, on rank 0.

    Its ``on_train_end`` must run before `ShiftEvalCallback`'s (which writes results.json, the mark of
    a complete run): conf/callbacks/default.yaml lists it first, and `setup` moves it ahead of any
    ShiftEvalCallback that another config order put before it."""

    def __init__(self, dirname: str = ADAPTER_DIR):
        self.dirname = dirname
        self.path: Path | None = None  # the folder written at the end of training

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        from reprpo_pl.eval.callback import ShiftEvalCallback

        callbacks = list(trainer.callbacks)
        first_eval = next((i for i, cb in enumerate(callbacks) if isinstance(cb, ShiftEvalCallback)), None)
        if first_eval is not None and callbacks.index(self) > first_eval:
            callbacks.remove(self)
            callbacks.insert(first_eval, self)
            trainer.callbacks = callbacks  # a new list: the loop calling this hook keeps iterating the old one

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            log.info(trainable_summary(pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        target = Path(trainer.default_root_dir) / self.dirname
        self.path = export_adapter(pl_module, target, {"global_step": int(trainer.global_step),
                                                       "epoch": int(trainer.current_epoch)})
        log.info("adapter written to %s", target)


def _reason(error: Exception) -> str:
    """The informative line of a ``load_state_dict`` error (torch puts a header line first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("size mismatch", "Missing key", "Unexpected key")):
            return line[:300]
    return lines[0][:300] if lines else type(error).__name__


LORA_SETTINGS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora")


def load_adapter_state(module: Any, folder: str | Path) -> None:
    """Load an `export_adapter` folder's weights into ``module`` (built from its config.yaml): the LoRA
    weights through peft (`set_peft_model_state_dict` puts back the adapter name that peft's saved keys
    leave out), the transform's state from transform.safetensors. Raises ValueError naming the first
    difference when the folder does not fit the module."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    saved, live = PeftConfig.from_pretrained(str(folder)), module.model.peft_config[ADAPTER_NAME]
    for key in LORA_SETTINGS:
        if getattr(saved, key, None) != getattr(live, key, None):
            raise ValueError(f"its {ADAPTER_CONFIG} has {key}={getattr(saved, key, None)}, "
                             f"its {CONFIG_FILE} builds {key}={getattr(live, key, None)}")
    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ValueError("it lacks adapter_model.safetensors")
    weights = load_peft_weights(str(folder), device="cpu")
    try:
        result = set_peft_model_state_dict(module.model, weights, adapter_name=ADAPTER_NAME)
    except RuntimeError as e:  # a shape mismatch
        raise ValueError(_reason(e)) from None
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n in set(result.missing_keys)]
    if missing:
        raise ValueError(f"it lacks model.{missing[0]}")
    if result.unexpected_keys:
        raise ValueError(f"it holds {result.unexpected_keys[0]}, which this run does not train")

    expected = transform_state(module)
    path = folder / TRANSFORM_FILE
    if expected:
        if not path.is_file():
            raise ValueError(f"it lacks {TRANSFORM_FILE} (the state of the {type(module.transform).__name__} transform)")
        try:
            module.transform.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as e:
            raise ValueError(f"{TRANSFORM_FILE}: {_reason(e)}") from None
    elif path.is_file() and load_file(str(path)):
        raise ValueError(f"it holds {TRANSFORM_FILE}, but this run has no transform with state")
