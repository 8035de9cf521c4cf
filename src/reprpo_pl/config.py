"""Hydra/OmegaConf plumbing shared by the entry points: the conf/ path, resolvers, and the CLI error wrapper."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Callable, TypeVar

import torch
from omegaconf import OmegaConf

from reprpo_pl.errors import UserError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
T = TypeVar("T")
log = logging.getLogger(__name__)

if not OmegaConf.has_resolver("precision"):
    OmegaConf.register_new_resolver("precision", lambda: "bf16-mixed" if torch.cuda.is_available() else "32-true")


def run_cli(fn: Callable[[], T], run_dir: Path | None = None, multirun: bool = False) -> T:
    """Run ``fn``; a `UserError` becomes one line on stderr and exit code 2 (no traceback), and a run
    directory holding nothing but Hydra's bookkeeping is removed. In a multirun the error is re-raised
    as a short exception so the launcher/sweeper records the job as failed."""
    try:
        return fn()
    except UserError as e:
        if run_dir is not None:
            _remove_if_empty(run_dir)
        if multirun:
            raise UserError(str(e)) from None
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _remove_if_empty(run_dir: Path) -> None:
    keep = {".hydra", "train.log", "eval.log"}
    if run_dir.is_dir() and all(p.name in keep for p in run_dir.iterdir()):
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
