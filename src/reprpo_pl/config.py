"""Hydra/OmegaConf plumbing shared by the entry points: where the shipped configs are, resolvers, and the CLI error wrapper."""

from __future__ import annotations

import importlib.resources
import logging
import shutil
import sys
from pathlib import Path
from types import TracebackType
from typing import Callable, TypeVar

from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from reprpo_pl.errors import (  # noqa: F401 (the exit codes: re-exported for the entry points and tests)
    EXIT_INTERRUPTED,
    EXIT_NON_FINITE,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    NonFiniteError,
    Preempted,
    UserError,
)
from reprpo_pl.models.precision import default_precision

CONF_MODULE = "reprpo_pl.conf"  # the repository's conf/, installed as a package (see pyproject.toml)
CONF_PATH = f"pkg://{CONF_MODULE}"  # what @hydra.main and a user's hydra.searchpath name
CONF_DIR = str(importlib.resources.files(CONF_MODULE))  # the same folder on disk, for tests and tools that read a yaml
T = TypeVar("T")
log = logging.getLogger(__name__)


if not OmegaConf.has_resolver("precision"):
    OmegaConf.register_new_resolver("precision", default_precision)


def run_cli(fn: Callable[[], T], run_dir: Path | None = None, multirun: bool = False) -> T:
    """Run ``fn``; a user-facing error becomes one line ``error: <msg>`` on stderr and a non-zero exit
    without a traceback: `UserError` → exit 2, a non-finite loss/gradient/hidden state
    (``NonFiniteError``) → exit 3. A `UserError` raised inside a Hydra ``instantiate`` call (e.g. a loss
    validating its options) and a config key the instantiated class does not accept count as user
    errors too. A run directory holding nothing but Hydra's bookkeeping is removed. In a multirun the
    error is re-raised as a short exception so the launcher/sweeper records the job as failed."""
    try:
        return fn()
    except Exception as e:
        user_error = user_facing_error(e)
        if user_error is None:
            raise
        if run_dir is not None:
            _remove_if_empty(run_dir)
        if multirun:  # a fresh exception: no deep traceback in the sweeper's log
            short = type(user_error)(str(user_error))
            if isinstance(user_error, Preempted):
                short.exit_code = user_error.exit_code  # Ctrl-C's 130, not the default 143
            raise short from None
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(EXIT_NON_FINITE if isinstance(user_error, NonFiniteError)
                 else user_error.exit_code if isinstance(user_error, Preempted) else EXIT_USER_ERROR)


def user_facing_error(e: BaseException) -> Exception | None:
    """The error to show the user as one line, or None for a bug (which keeps its traceback)."""
    if isinstance(e, (UserError, NonFiniteError, Preempted)):
        return e
    if isinstance(e, InstantiationException):
        cause = e.__cause__
        if isinstance(cause, (UserError, NonFiniteError)):
            return cause
        if isinstance(cause, TypeError) and _raised_in_hydra(cause.__traceback__):
            # the target's signature rejected the config's keys (a typo'd or unknown option)
            target = str(e).split("'")[1] if str(e).count("'") >= 2 else "a config node"
            return UserError(f"config for {target} is invalid: {cause}; check the keys of that config group")
    return None


def _raised_in_hydra(tb: TracebackType | None) -> bool:
    """True when the innermost frame of ``tb`` is Hydra's instantiate code, i.e. the call's arguments
    were rejected before the target's own code ran."""
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "hydra" in Path(last.tb_frame.f_code.co_filename).parts


def _remove_if_empty(run_dir: Path) -> None:
    """Remove ``run_dir`` when it holds nothing but Hydra's bookkeeping and empty folders (a logger's)."""
    from reprpo_pl.run_dirs import holds_only_bookkeeping

    if run_dir.is_dir() and holds_only_bookkeeping(run_dir):
        _detach_file_handlers(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


def _detach_file_handlers(run_dir: Path) -> None:
    """Close and remove the logging handlers writing into ``run_dir`` (Hydra's train.log), so that a
    process that goes on after the error (a sweep, a notebook, a test session) does not log into a
    removed directory."""
    root = run_dir.resolve()
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(root):
                logger.removeHandler(handler)
                handler.close()
