"""What a run shows on the console while it trains.

On a terminal: Lightning's tqdm bar (``Epoch 0:  62%|███▏ | 8/13 [00:09<00:06, 1.2it/s, train/loss=0.693]``).
Anywhere else (a file, CI, a SLURM log): no bar — its carriage-return frames would fill the file — but
one plain log line every N optimiser steps, ``step 8/13 loss 0.693 1.2 s/step ETA 0:06``. Both are
Lightning `ProgressBar` callbacks, so the Trainer adds no bar of its own (it would pick its Rich bar
when ``rich`` is installed); `console_progress` (``callbacks.progress`` in conf/callbacks/default.yaml)
picks one. The eval scorer follows the same rule (`is_terminal`).

`quiet_third_party` silences the console noise of library internals that our own calls cannot avoid
(train and eval call it first).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

log = logging.getLogger(__name__)

SHORT_RUN = 20  # runs of at most this many optimiser steps log every step by default, longer ones every 10


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default stdout, where Lightning's bar and Hydra's console log go) is an
    interactive terminal."""
    try:
        return (sys.stdout if stream is None else stream).isatty()
    except (AttributeError, ValueError):  # no isatty / a closed stream
        return False


def console_progress(every_n_steps: int | None = None, refresh_rate: int = 1) -> ProgressBar:
    """Lightning's tqdm bar on a terminal (refreshed every ``refresh_rate`` batches), else `StepLog`
    writing a line every ``every_n_steps`` optimiser steps (None: every step for runs of ≤ 20 steps,
    else every 10)."""
    return Bar(refresh_rate=refresh_rate) if is_terminal() else StepLog(every_n_steps)


class Bar(TQDMProgressBar):
    """`TQDMProgressBar` without the logger version (``v_num``): loss and the other ``prog_bar=True``
    metrics, it/s, elapsed and ETA of the epoch. Closed (left on screen) at the end of the last epoch
    rather than at train end, so that what prints in between (the epoch-end evaluation's bars,
    Lightning's "`Trainer.fit` stopped" line) starts on a line of its own instead of over the bar."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        last_step = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        if last_epoch or last_step:
            self.train_progress_bar.close()


class StepLog(ProgressBar):
    """Training progress as log lines, for consoles that are not a terminal: one every ``every_n_steps``
    optimiser steps, plus the first and the last step, e.g. ``step 8/13 loss 0.693 1.2 s/step ETA 0:06``
    (``epoch 1/2`` too when training more than one epoch). The metrics are those logged with
    ``prog_bar=True`` (``train/`` dropped from their names); s/step is the wall time per step of this
    process so far, epoch-end evaluation included, so the ETA counts it in."""

    def __init__(self, every_n_steps: int | None = None):
        super().__init__()
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: use a positive number of steps, or null for the default")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self._enabled = True
        self._start: tuple[float, int] | None = None  # (perf_counter, global_step) at train start
        self._last_step = -1
        self._total: float = math.inf  # optimiser steps of the whole fit

    def disable(self) -> None:  # Lightning calls this on ranks other than 0
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step)  # a resumed run starts at its checkpoint's step
        self._last_step = trainer.global_step
        self._total = trainer.estimated_stepping_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not self._enabled or self._start is None or step == self._last_step:  # accumulating gradients
            return
        self._last_step = step
        total = self._total
        every = self.every_n_steps or (1 if total <= SHORT_RUN else 10)
        if step % every == 0 or step == self._start[1] + 1 or step >= total:
            log.info("%s", self.line(trainer, pl_module, step, total))

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, total: float) -> str:
        assert self._start is not None
        parts = [f"step {step}/{total if math.isfinite(total) else '?'}"]
        if trainer.max_epochs is not None and trainer.max_epochs > 1:
            parts.append(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
        for name, value in self.get_metrics(trainer, pl_module).items():
            if name != "v_num":
                parts.append(f"{name.removeprefix('train/')} {_number(value)}")
        started, first = self._start
        per_step = (time.perf_counter() - started) / max(step - first, 1)
        parts.append(f"{per_step:.2f} s/step" if per_step < 10 else f"{per_step:.0f} s/step")
        if math.isfinite(total):
            parts.append(f"ETA {_duration(per_step * max(total - step, 0))}")
        return " ".join(parts)


def _number(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    """``7`` → ``0:07``, ``3723`` → ``1:02:03``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ---- third-party console noise ------------------------------------------------------------------

_TIP = "💡 Tip:"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP)


def quiet_third_party() -> None:
    """Silence what library internals print on every run although nothing in our calls asks for it.
    Each filter is narrow (message + emitting module) so that the same text from elsewhere, and every
    other warning, still shows. Idempotent."""
    # Lightning 2.6's CombinedLoader (lightning/pytorch/utilities/_pytree.py) builds
    # torch.utils._pytree.LeafSpec(), which torch 2.10+ deprecates with a FutureWarning: printed on
    # every fit, whatever dataloader we pass. Lightning has to move to treespec_leaf().
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # torchdata 0.11's StatefulDataLoader.__init__ (our training loader) calls torch.set_vital, which
    # torch 2.13 turned into a deprecated no-op that warns on every loader it builds.
    warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated", category=UserWarning,
                            module=r"torchdata\.stateful_dataloader\.stateful_dataloader")
    # Lightning 2.6 advertises litlogger / litmodels ("💡 Tip: ... try installing [litlogger]...") as an
    # INFO record of its rank-zero logger whenever no LitLogger is in use, with no switch to turn it off
    # (Lightning-AI/pytorch-lightning#21294; later versions add Trainer(suggest_integrations=False)).
    # Only those records are dropped: "GPU available: …" and the rest of that logger still show.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    if not is_terminal(sys.stderr):
        # transformers' from_pretrained draws its own "Loading weights" tqdm bar on stderr (and the hub
        # client its download bars): off a terminal their carriage-return frames would land in the log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
