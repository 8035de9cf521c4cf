"""Checkpoint files that are never half-written, and a clear error for a bad ``ckpt_path``.

Lightning's `TorchCheckpointIO` writes the checkpoint to a temporary file in the *system* temp dir and
moves it into place. The move is a rename only when that dir is on the same filesystem as the run;
otherwise (``/tmp`` on local disk or tmpfs, runs on a network filesystem: the usual cluster layout)
it is a copy straight into ``last.ckpt``, so a run killed during the copy leaves a truncated
checkpoint, and the whole checkpoint passes through ``/tmp`` (RAM, for tmpfs) first.
`AtomicCheckpointIO` writes beside the target and renames, which is atomic on POSIX filesystems.
Wire it with ``plugins: [{_target_: reprpo_pl.checkpoint_io.AtomicCheckpointIO}]`` in the trainer config.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from reprpo_pl.errors import EXIT_INTERRUPTED, Preempted, UserError

log = logging.getLogger(__name__)

def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local(path: Any) -> Path:
    return Path(str(path).removeprefix("file://"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` into a temporary file beside ``path``, fsync, then rename it into place; a
    stale temporary of the same target (from a killed run) is removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file ``path`` as a Path, or a UserError naming the problem and the fix."""
    local = _local(path)
    if not local.exists():
        siblings = sorted(p.name for p in local.parent.glob("*.ckpt")) if local.parent.is_dir() else []
        hint = f" ({local.parent} holds {', '.join(siblings)})" if siblings else ""
        raise UserError(f"ckpt_path={path} does not exist{hint}: point it at a run's checkpoints/last.ckpt, or drop ckpt_path to start afresh")
    if not local.is_file():
        raise UserError(f"ckpt_path={path} is a directory: point it at a checkpoint file such as {local / 'last.ckpt'}")
    return local


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with an atomic local save (`atomic_torch_save`) and a load that turns a
    missing or unreadable file into a one-line `UserError`. Remote paths (``s3://`` …) keep Lightning's
    behaviour."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, _local(path))

    def load_checkpoint(
        self,
        path: Any,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        local = check_checkpoint_path(path)
        try:
            checkpoint = super().load_checkpoint(local, map_location=map_location, weights_only=weights_only)
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as e:
            raise UserError(
                f"ckpt_path={path} cannot be read as a checkpoint ({type(e).__name__}): the file is truncated or not "
                "a Lightning .ckpt; use another checkpoint of the run or drop ckpt_path to start afresh"
            ) from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise UserError(f"ckpt_path={path} holds no Lightning checkpoint (no 'state_dict'): point it at a run's checkpoints/last.ckpt")
        return checkpoint


class ResumableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose ``last.ckpt`` is resumable at every point a run can stop: written every
    ``every_n_train_steps`` optimizer steps (Lightning's own trigger), at every epoch end, on SIGTERM,
    and at the end of training, always for the final step.

    Why a subclass (Lightning 2.6.6): with ``save_top_k=0`` ModelCheckpoint writes ``last.ckpt`` only
    at its step/time trigger; at epoch end it copies ``last.ckpt`` only when it saved a top-k file at
    that step; ``every_n_train_steps`` and ``every_n_epochs`` cannot be combined; ``on_train_end``
    saves only if nothing was ever saved (so a run of 73 steps with ``every_n_train_steps=50`` would
    end with a step-50 ``last.ckpt``); and on SIGTERM Lightning raises `SIGTERMException` without a
    checkpoint unless ``save_on_exception`` (which also writes a second, named file).

    Ctrl-C (SIGINT) during training is handled like SIGTERM: the step in progress finishes, ``last.ckpt``
    is written and the run stops with the command to resume (Lightning's own Ctrl-C handling stops
    wherever the interrupt lands, possibly half-way through an optimizer step, and exits 1). One after
    the training loop is done (during the final evaluation) stops at once, with ``last.ckpt`` of the
    final step, whose resume only evaluates; a second Ctrl-C interrupts at once (Lightning's handling)."""

    def __init__(self, *args: Any, save_last: bool = True, save_top_k: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, save_top_k=save_top_k, **kwargs)
        self.stopped_by: str | None = None  # "SIGINT" or "SIGTERM" once a signal asked training to stop
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self.stopped_by = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous_sigint = signal.signal(signal.SIGINT, self._make_sigint_handler(trainer))

    def _make_sigint_handler(self, trainer: Any) -> Callable[[int, Any], None]:
        def handler(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
            if trainer.fit_loop.done:  # no step left to finish: the final evaluation is running; stop it now
                self.stopped_by = "SIGINT"
                last = Path(str(self.dirpath)) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
                raise Preempted(f"interrupted (Ctrl-C) during the final evaluation at step {trainer.global_step}; "
                                f"resume with ckpt_path={last} (it evaluates that step)", EXIT_INTERRUPTED)
            log.warning("Ctrl-C: stopping after the step in progress and writing last.ckpt (Ctrl-C again to abort now)")
            self.stopped_by = "SIGINT"
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM path: stop at the step boundary (all ranks)

        return handler

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restore_sigint()
        super().teardown(trainer, pl_module, stage)

    def save_last_now(self, trainer: Any) -> None:
        """Write ``last.ckpt`` for the current step unless it already holds it (or no step was taken)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.save_last_now(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        self.save_last_now(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, (SIGTERMException, Preempted)):  # between steps: the state is that of a finished step
            self.stopped_by = self.stopped_by or "SIGTERM"
            self.save_last_now(trainer)
