"""Checks of the composed config that run once, at the start of ``train`` (and ``eval``), before any
data or model loads: every numeric option (type, range, finiteness), the combinations of options that
would otherwise be silently ignored or divide by zero, and the names chosen for optional config groups.

Each check raises a `UserError` naming the value and the fix, which `run_cli` prints as one line.
"""

from __future__ import annotations

import difflib
import importlib.resources
import math
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from reprpo_pl.errors import UserError

CONF_MODULE = "reprpo_pl.conf"
OPTIONAL_GROUPS = ("experiment", "hparams_search")  # `optional <group>: null` in conf/train.yaml
_MISSING = object()


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v: Any) -> bool:
    return _int(v) and v > 0


def seed_int(v: Any) -> bool:  # numpy's and Lightning's seed range
    return _int(v) and 0 <= v < 2**32


def positive(v: Any) -> bool:
    return _num(v) and v > 0


def non_negative(v: Any) -> bool:
    return _num(v) and v >= 0


def unit_interval(v: Any) -> bool:
    return _num(v) and 0 <= v <= 1


def dropout(v: Any) -> bool:
    return _num(v) and 0 <= v < 1


def smoothing(v: Any) -> bool:
    return _num(v) and 0 <= v < 0.5


def epochs(v: Any) -> bool:  # Lightning: -1 = no limit
    return _int(v) and (v > 0 or v == -1)


def steps(v: Any) -> bool:  # Lightning: -1 = no limit
    return _int(v) and (v > 0 or v == -1)


# (key, predicate, what it must be + an example fix, null allowed). A key the config does not hold is skipped.
NUMERIC: list[tuple[str, Callable[[Any], bool], str, bool]] = [
    ("seed", seed_int, "must be an integer in [0, 2**32), e.g. seed=42", False),
    ("data.seed", seed_int, "must be an integer in [0, 2**32), e.g. data.seed=0", False),
    ("data.n_train", positive_int, "must be a positive integer, e.g. data.n_train=64", False),
    ("data.batch_size", positive_int, "must be a positive integer, e.g. data.batch_size=4", False),
    ("data.max_length", positive_int, "must be a positive number of tokens, e.g. data.max_length=256", False),
    ("data.max_prompt_length", positive_int, "must be a positive number of tokens, e.g. data.max_prompt_length=160", False),
    ("eval.n_samples", positive_int, "must be a positive integer, e.g. eval.n_samples=24", False),
    ("eval.batch_size", positive_int, "must be a positive integer, e.g. eval.batch_size=8", False),
    ("eval.seed", seed_int, "must be an integer in [0, 2**32), e.g. eval.seed=0", False),
    ("method.lr", positive, "must be > 0, e.g. method.lr=5e-5 (a finite number)", False),
    ("method.weight_decay", non_negative, "must be a finite number >= 0, e.g. method.weight_decay=0.0", False),
    ("method.warmup_ratio", unit_interval, "must be a number in [0, 1], e.g. method.warmup_ratio=0.1", False),
    ("method.decay_ratio", unit_interval, "must be a number in [0, 1] (or null with method.schedule=cosine), e.g. method.decay_ratio=0.15", True),
    ("method.beta", positive, "must be > 0 and finite (ipo's target margin is 1/(2·beta); sigmoid and hinge scale the margin by it), e.g. method.beta=0.1", False),
    ("method.label_smoothing", smoothing, "must be a number in [0, 0.5), e.g. method.label_smoothing=0.0", False),
    ("method.gradnorm_every_n_steps", positive_int, "must be a positive integer or null (off), e.g. method.gradnorm_every_n_steps=50", True),
    ("method.projection.beta", non_negative, "must be a finite number >= 0, e.g. method.projection.beta=0.8", False),
    ("loss.alpha", non_negative, "must be a finite number >= 0, e.g. loss.alpha=0.1", False),
    ("loss.beta", non_negative, "must be a finite number >= 0, e.g. loss.beta=0.4", False),
    ("loss.nll_weight", non_negative, "must be a finite number >= 0, e.g. loss.nll_weight=100", False),
    ("loss.beta_out", positive, "must be > 0 and finite, e.g. loss.beta_out=0.1", False),
    ("adapter.r", positive_int, "must be a positive integer, e.g. adapter.r=64", False),
    ("adapter.lora_alpha", positive, "must be > 0 and finite, e.g. adapter.lora_alpha=16", False),
    ("adapter.lora_dropout", dropout, "must be a number in [0, 1), e.g. adapter.lora_dropout=0.0", False),
    ("trainer.accumulate_grad_batches", positive_int, "must be a positive integer, e.g. trainer.accumulate_grad_batches=1", False),
    ("trainer.max_epochs", epochs, "must be a positive integer or -1 (no limit), e.g. trainer.max_epochs=1", True),
    ("trainer.max_steps", steps, "must be a positive integer or -1 (no limit), e.g. trainer.max_steps=100", False),
    ("trainer.gradient_clip_val", non_negative, "must be a finite number >= 0 or null, e.g. trainer.gradient_clip_val=10.0", True),
    ("trainer.log_every_n_steps", positive_int, "must be a positive integer, e.g. trainer.log_every_n_steps=1", False),
    ("callbacks.optuna_pruning.every_n_steps", positive_int, "must be a positive integer, e.g. callbacks.optuna_pruning.every_n_steps=10", False),
]


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def check_numeric(cfg: DictConfig, table: list[tuple[str, Callable[[Any], bool], str, bool]] = NUMERIC,
                  nullable: tuple[str, ...] = ()) -> None:
    """Raise a `UserError` for the first option of ``table`` whose value fails its predicate; keys in
    ``nullable`` (and those marked so in the table) may also be null."""
    for key, ok, fix, null_ok in table:
        value = _get(cfg, key)
        if value is _MISSING or (value is None and (null_ok or key in nullable)):
            continue
        if not ok(value):
            raise UserError(f"{key}={value!r} {fix}")


def check_combinations(cfg: DictConfig) -> None:
    """Options that another option makes meaningless are refused rather than ignored."""
    loss_type = _get(cfg, "method.loss_type")
    smoothing_value = _get(cfg, "method.label_smoothing")
    if loss_type in ("ipo", "hinge") and smoothing_value not in (_MISSING, None, 0, 0.0):
        raise UserError(f"method.label_smoothing={smoothing_value!r} applies only to method.loss_type=sigmoid, and "
                        f"loss_type={loss_type} would ignore it: drop it or use method.loss_type=sigmoid")
    if _get(cfg, "loss.inner_loss_type") == "ipo" and _get(cfg, "loss.beta") == 0:
        raise UserError("loss.beta=0 with loss.inner_loss_type=ipo divides by zero (ipo's target margin is 1/(2·beta)): "
                        "set loss.beta > 0, e.g. loss.beta=0.4")
    if _get(cfg, "loss.weight_tokens") is True and _get(cfg, "collection.pooling") != "exp_decay":
        raise UserError(f"loss.weight_tokens=true is the prototype's exponential token weighting, "
                        f"collection.pooling=exp_decay, but collection.pooling={_get(cfg, 'collection.pooling')}: "
                        "add collection.pooling=exp_decay (or drop loss.weight_tokens)")


SCHEDULES = ("cosine", "wsd")  # method.schedule (methods/base.py lr_factor)
OPTIMIZERS = ("adamw", "paged_adamw_32bit", "adamw_8bit")  # method.optimizer; the last two are bitsandbytes', CUDA only


def check_schedule(cfg: DictConfig) -> None:
    """``method.schedule`` and ``method.decay_ratio``: wsd needs the decay's share, cosine has none."""
    schedule, decay, warmup = _get(cfg, "method.schedule"), _get(cfg, "method.decay_ratio"), _get(cfg, "method.warmup_ratio")
    if schedule is _MISSING:
        return
    if schedule not in SCHEDULES:
        raise UserError(f"method.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    if schedule == "wsd" and decay is None:
        raise UserError("method.schedule=wsd needs method.decay_ratio (the final decay's share of the steps), "
                        "e.g. method.decay_ratio=0.15")
    if schedule == "cosine" and decay not in (None, _MISSING):
        raise UserError(f"method.decay_ratio={decay!r} applies only to method.schedule=wsd, and cosine would ignore it: "
                        "drop it or use method.schedule=wsd")
    if schedule == "wsd" and _num(warmup) and warmup + decay > 1:
        raise UserError(f"method.warmup_ratio={warmup!r} + method.decay_ratio={decay!r} exceed 1 (wsd's stable phase "
                        "is the rest): lower one, e.g. method.warmup_ratio=0.15 method.decay_ratio=0.15")


def check_optimizer(name: Any, cuda: bool) -> None:
    """``method.optimizer``: one of `OPTIMIZERS`; the bitsandbytes ones need CUDA (``cuda``) and the package."""
    if name not in OPTIMIZERS:
        raise UserError(f"method.optimizer={name!r}: use one of {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        return
    if not cuda:
        raise UserError(f"method.optimizer={name} is a bitsandbytes optimizer that needs a CUDA GPU, and this run has "
                        "none: use method.optimizer=adamw (the same update without paging or 8-bit states)")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"method.optimizer={name} needs bitsandbytes, which is not installed: pip install bitsandbytes, "
                        "or use method.optimizer=adamw")


def run_has_cuda(cfg: DictConfig) -> bool:
    """Whether the trainer will put the model on a CUDA device (``trainer.accelerator`` auto, gpu or cuda)."""
    import torch

    accelerator = _get(cfg, "trainer.accelerator")
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda", _MISSING)


def group_options(group: str) -> list[str]:
    """The option names of config group ``group`` shipped in `reprpo_pl.conf` (``<group>/*.yaml``; a ``_*.yaml``
    is a part the options share, e.g. hparams_search/_optuna.yaml, not an option)."""
    folder = importlib.resources.files(CONF_MODULE) / group
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml") and not p.name.startswith("_"))


def check_group_choices(choices: Mapping[str, Any], groups: tuple[str, ...] = OPTIONAL_GROUPS,
                        extra: Callable[[str], list[str]] | None = None) -> None:
    """Hydra composes an ``optional`` group whose chosen file does not exist as if none were chosen
    (``experiment=typo`` trains the defaults). A chosen name must name a file of the group: one from
    the package's conf/ or, through ``extra``, from another config search path."""
    for group in groups:
        name = choices.get(group)
        if name is None:
            continue
        options = set(group_options(group)) | set(extra(group) if extra else [])
        if str(name) not in options:
            close = difflib.get_close_matches(str(name), sorted(options), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"{group}={name} matches no config file of the {group} group: {hint}"
                            f"use one of {', '.join(sorted(options)) or '(none)'}")


def _hydra_group_options(group: str) -> list[str]:
    """Options of ``group`` on the running app's config search path (a user's ``hydra.searchpath`` included)."""
    try:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        paths = list(hc.searchpath or [])  # from the command line or the primary config
        if not paths:
            return []
        override = "hydra.searchpath=[" + ",".join(repr(str(p)) for p in paths) + "]"
        return GlobalHydra.instance().config_loader().get_group_options(group, config_name=hc.job.config_name,
                                                                        overrides=[override])
    except Exception:  # noqa: BLE001 - no running app (a test calling train() directly): the package's files only
        return []


def check_benchmark_run(cfg: DictConfig) -> None:
    """``benchmark.run`` (conf/experiment/genies_benchmark.yaml) names one of ``benchmark.runs``, the entry the
    job's ``dataset`` interpolates; checked before anything resolves the config (the run dir's plan does)."""
    benchmark = cfg.get("benchmark")
    if benchmark is None:
        return
    run, runs = benchmark.get("run"), list(benchmark.get("runs") or {})
    if run not in runs:
        close = difflib.get_close_matches(str(run), runs, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"benchmark.run={run!r} is not one of the {len(runs)} entries of benchmark.runs: {hint}"
                        f"use <source>__<target> or target_tuned__<target>, e.g. {runs[0] if runs else '…'}")


def validate_train_config(cfg: DictConfig) -> None:
    """All start-of-run checks of ``python -m reprpo_pl.train``; cheap, and before any data or model loads."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        check_group_choices(HydraConfig.get().runtime.choices, extra=_hydra_group_options)
    check_numeric(cfg)
    check_combinations(cfg)
    check_schedule(cfg)
    if _get(cfg, "method.optimizer") is not _MISSING:
        check_optimizer(_get(cfg, "method.optimizer"), cuda=run_has_cuda(cfg))


EVAL_NUMERIC = [row for row in NUMERIC if row[0] in ("eval.n_samples", "eval.batch_size", "eval.seed")]


def validate_eval_request(request: DictConfig) -> None:
    """The numeric options of ``python -m reprpo_pl.eval`` (null = keep the training run's value)."""
    check_numeric(request, EVAL_NUMERIC, nullable=tuple(row[0] for row in EVAL_NUMERIC))
