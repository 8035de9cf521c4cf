"""Evaluate a saved adapter on a shift table: rebuild the module from the config stored in its
checkpoint, load the saved state (all but the frozen base), score base vs adapter, write results.json + results.md.

    python -m reprpo_pl.eval ckpt_path=<run dir | .ckpt | <run dir>/adapter> [dataset=<source>] [targets=[a,b]] [eval.n_samples=N]

The adapter folder (`reprpo_pl.eval.adapter_export`, peft's format) holds the config as config.yaml and
the state as peft's adapter_model.safetensors plus transform.safetensors.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from reprpo_pl.config import CONF_PATH, run_cli
from reprpo_pl.data.datamodule import TRAIN_SHIFT, VAL_SHIFT, PreferenceDataModule
from reprpo_pl.errors import UserError
from reprpo_pl.eval.adapter_export import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    CONFIG_FILE,
    TRAINER_STATE,
    load_adapter_state,
)
from reprpo_pl.eval.base_cache import open_base_cache
from reprpo_pl.eval.callback import build_results, evaluate_targets
from reprpo_pl.eval.results import write_per_row, write_results
from reprpo_pl.methods.base import saved_state_mismatch
from reprpo_pl.models.precision import precision_context
from reprpo_pl.progress import quiet_third_party
from reprpo_pl.validation import validate_eval_request

log = logging.getLogger(__name__)

LAST_CKPT = Path("checkpoints") / "last.ckpt"


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is an adapter folder in peft's format (it holds adapter_config.json)."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def checkpoint_file(ckpt_path: Any) -> Path:
    """What ``ckpt_path`` names: a .ckpt file; an adapter folder (``<run dir>/adapter``); for a run dir,
    its ``checkpoints/last.ckpt``, else its ``adapter/``."""
    if ckpt_path is None or str(ckpt_path).strip() == "":
        raise UserError("ckpt_path is required: pass a training run dir, its .ckpt file or its adapter folder, "
                        "e.g. ckpt_path=outputs/<date>/<time>")
    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir():
        if is_adapter_dir(path):
            return path
        if (path / LAST_CKPT).is_file():
            return path / LAST_CKPT
        if is_adapter_dir(path / ADAPTER_DIR):
            return path / ADAPTER_DIR
        raise UserError(f"ckpt_path={ckpt_path}: the directory has no {LAST_CKPT} (nor {ADAPTER_DIR}/{ADAPTER_CONFIG}); "
                        "pass a .ckpt file, an adapter folder or a training run dir")
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path} does not exist")
    return path


def run_dir_of(ckpt: Path) -> Path:
    """``<run>/checkpoints/x.ckpt`` → ``<run>``; an adapter folder ``<run>/adapter`` → ``<run>``; any other file → its folder."""
    if ckpt.is_dir():
        return ckpt.parent
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _eval_root(ckpt_path: Any) -> str:
    """Resolver for conf/eval.yaml's default out_dir: ``<run dir>/eval``, or ``outputs/eval`` when
    ckpt_path names nothing (the task then fails with a one-line error and the empty dir is removed)."""
    try:
        return str(run_dir_of(checkpoint_file(ckpt_path)) / "eval")
    except UserError:
        return "outputs/eval"


if not OmegaConf.has_resolver("reprpo_eval_root"):
    OmegaConf.register_new_resolver("reprpo_eval_root", _eval_root)


def load_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The checkpoint dict, checked to hold ``state_dict`` and ``hyper_parameters.cfg``."""
    try:
        # weights_only: our checkpoints hold tensors and plain containers only, so no pickled code runs
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, …
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"ckpt_path={ckpt}: cannot read the checkpoint ({type(e).__name__}: {reason[:160]}); "
                        "the file is corrupt or incomplete") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping) \
            or "cfg" not in (checkpoint.get("hyper_parameters") or {}):
        raise UserError(f"ckpt_path={ckpt} is not a reprpo_pl checkpoint (it lacks state_dict or hyper_parameters.cfg; "
                        "a plain torch.save(model.state_dict()) does not say which run it is): pass the run dir, its "
                        "checkpoints/last.ckpt or its adapter folder")
    return checkpoint


def load_adapter_config(folder: Path) -> tuple[dict[str, Any], int | None]:
    """An adapter folder's run config (config.yaml) and the global step it was exported at (or None)."""
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise UserError(f"ckpt_path={folder} is a peft adapter folder without {CONFIG_FILE}, so not a reprpo_pl export; "
                        "load it with PeftModel.from_pretrained, or pass the run dir")
    try:
        stored = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    except Exception as e:  # not yaml
        raise UserError(f"ckpt_path={folder}: cannot read {CONFIG_FILE} ({type(e).__name__})") from None
    if not isinstance(stored, dict) or not (stored.get("method") or {}).get("_target_"):
        raise UserError(f"ckpt_path={folder}: {CONFIG_FILE} is not a reprpo_pl run config (it lacks method._target_)")
    step = None
    if (folder / TRAINER_STATE).is_file():
        try:
            step = json.loads((folder / TRAINER_STATE).read_text()).get("global_step")
        except (ValueError, AttributeError):
            step = None
    return stored, step


def _label(cfg: DictConfig) -> str:
    return f"{cfg.method.name} on {cfg.model.name}"


def check_requested(cfg: DictConfig, request: DictConfig, ckpt: Path) -> None:
    """``method=`` / ``model=`` on the command line (config groups, as in training) must match the checkpoint's."""
    for key, stored in (("method", cfg.method.name), ("model", cfg.model.name)):
        wanted = (request.get(key) or {}).get("name")
        if wanted is not None and str(wanted) != stored:
            raise UserError(f"ckpt_path={ckpt} was trained with method={cfg.method.name} model={cfg.model.name}, "
                            f"not {key}={wanted}: drop {key}= or pass a {key}={wanted} checkpoint")


def select_targets(dataset: DictConfig, targets: Any) -> tuple[DictConfig, list[str] | None]:
    """``dataset`` with only the requested targets (plus its in-domain one, which the shift-table parser
    requires), and the requested names (None = all). A bare name takes its shift from the table."""
    if targets is None:
        return dataset, None
    if isinstance(targets, str):
        targets = [targets]
    table = {t["name"]: t["shift"] for t in dataset.targets}
    wanted: dict[str, str] = {}
    for item in targets:
        if isinstance(item, Mapping):
            name, shift = item.get("name"), item.get("shift")
        else:
            name, shift = str(item), table.get(str(item))
            if shift is None:
                raise UserError(f"targets: {name} is not in {dataset.source}'s shift table ({', '.join(table)}); "
                                f"give its shift, e.g. targets=[{{name:{name},shift:cross_domain}}]")
        wanted[str(name)] = shift
    in_domain = [{"name": n, "shift": s} for n, s in table.items() if s == "in_domain" and n not in wanted]
    selected = copy.deepcopy(dataset)
    selected.targets = in_domain + [{"name": n, "shift": s} for n, s in wanted.items()]
    return selected, list(wanted)


def eval_config(stored: Mapping[str, Any], request: DictConfig) -> DictConfig:
    """The run's config with the evaluation overrides of ``request`` (conf/eval.yaml) applied."""
    cfg = OmegaConf.create(dict(stored))
    if request.get("dataset") is not None:
        cfg.dataset = request.dataset
    for group in ("eval", "data"):
        for key, value in (request.get(group) or {}).items():
            if value is not None:
                cfg[group][key] = value
    return cfg


def _instantiate(cfg: DictConfig, ckpt: Path) -> Any:
    try:
        module_cls = get_class(cfg.method._target_)
    except ImportError:
        raise UserError(f"ckpt_path={ckpt}: method._target_={cfg.method._target_} cannot be imported; "
                        "the checkpoint comes from another version of reprpo_pl") from None
    return module_cls(cfg)


def build_module_from_adapter(cfg: DictConfig, folder: Path) -> Any:
    """Instantiate ``cfg.method._target_`` and load an adapter folder's weights into it."""
    module = _instantiate(cfg, folder)
    try:
        load_adapter_state(module, folder)
    except ValueError as e:
        raise UserError(f"ckpt_path={folder} does not fit the {_label(cfg)} module its {CONFIG_FILE} describes: {e}") from None
    return module


def build_module(cfg: DictConfig, state: Mapping[str, torch.Tensor], ckpt: Path) -> Any:
    """Instantiate ``cfg.method._target_`` and load the checkpoint's saved state (all but the frozen base) into it."""
    module = _instantiate(cfg, ckpt)
    mismatch = saved_state_mismatch(state, module)
    if mismatch:
        raise UserError(f"ckpt_path={ckpt} does not fit the {_label(cfg)} module it describes: {mismatch}")
    module.load_state_dict(dict(state), strict=False)  # strict=False: the frozen base is not in the checkpoint
    return module


def evaluate_checkpoint(request: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Score the checkpoint (or adapter folder) named by ``request.ckpt_path`` and write results into ``out_dir``
    (per-pair records into ``out_dir/eval/<target>.jsonl``)."""
    validate_eval_request(request)
    ckpt = checkpoint_file(request.get("ckpt_path"))
    if ckpt.is_dir():  # an adapter folder
        checkpoint = None
        stored, global_step = load_adapter_config(ckpt)
    else:
        checkpoint = load_checkpoint(ckpt)
        stored, global_step = checkpoint["hyper_parameters"]["cfg"], checkpoint.get("global_step")
    trained = OmegaConf.create(stored)
    check_requested(trained, request, ckpt)
    cfg = eval_config(stored, request)
    dataset, names = select_targets(cfg.dataset, request.get("targets"))
    # read (and validate) the data before the model loads. The datamodule also reads the n_train training
    # rows, whose in-sample row is scored here as in training.
    datamodule = PreferenceDataModule(cfg.data, dataset, cfg.eval)
    if names is None and dataset.source != trained.dataset.source:
        # the in-sample row is the pairs the adapter trained on (the validation slice, the ones it held out):
        # another source's training pairs are neither
        names = [t.name for t in datamodule.targets if t.shift not in (TRAIN_SHIFT, VAL_SHIFT)]
    if names is not None:  # drop the in-domain target if it was only added for the parser (and the in-sample row)
        datamodule.targets = [t for t in datamodule.targets if t.name in names]
        datamodule.eval_text = {n: rows for n, rows in datamodule.eval_text.items() if n in names}
    module = build_module_from_adapter(cfg, ckpt) if checkpoint is None else build_module(cfg, checkpoint["state_dict"], ckpt)
    if torch.cuda.is_available():
        module.cuda()
    datamodule.tokenizer = module.tokenizer
    datamodule.setup("validate")
    log.info("evaluating %s (step %s) on %d targets of %s", ckpt, global_step, len(datamodule.targets), dataset.source)
    started = time.perf_counter()
    disk_cache = open_base_cache(module.model, cfg.trainer.precision, datamodule.eval_batch_size, module.tokenizer.pad_token_id)
    with precision_context(cfg.trainer.precision, module.device):  # the precision the run trained (and was scored) in
        targets, per_row = evaluate_targets(module.model, datamodule, disk_cache=disk_cache)
    results = build_results(cfg, targets, global_step=global_step, timing={"eval_s": round(time.perf_counter() - started, 1)})
    # `dataset` stays the training source (what the adapter learned); `evaluated_on` names the table used
    results.update(dataset=trained.dataset.source, evaluated_on=dataset.source, checkpoint=str(ckpt.resolve()))
    write_per_row(out_dir, per_row)
    markdown = write_results(out_dir, results)
    log.info("results written to %s", out_dir)
    print("\n" + markdown)
    return results


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="eval")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    quiet_third_party()
    try:
        results = run_cli(lambda: evaluate_checkpoint(cfg, out_dir), run_dir=out_dir)
    finally:  # a failed evaluation leaves no empty <run dir>/eval (or outputs/eval) behind
        for parent in (out_dir.parent, out_dir.parent.parent):
            if parent.name in ("eval", "outputs") and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    return float(results["objective"])
