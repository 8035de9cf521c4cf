"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

EXIT_USER_ERROR = 2  # bad config, data or paths: fix the input and rerun
EXIT_NON_FINITE = 3  # training diverged (NaN/inf loss, gradient or hidden state)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT's 2, as a shell reports a process killed by it): resume from last.ckpt
EXIT_PREEMPTED = 143  # SIGTERM (128 + 15): resume from last.ckpt


class UserError(ValueError):
    """Bad input from the user (config, data, paths). The message names the value and the fix."""


class MissingDataError(UserError):
    """A data file named by the config (a distribution's split) is not on disk; the message names its path."""


class RunSkipped(UserError):
    """``eval.missing_targets=skip`` and the run has nothing to train on or measure out of domain: its
    source's training split, or every out-of-domain target, is missing. Not a failure: the job ends with a warning."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or hidden state became NaN/inf during training; the message says where."""


class Preempted(RuntimeError):
    """Training was stopped by SIGTERM (a scheduler's preemption) or Ctrl-C; ``last.ckpt`` holds the last
    finished step. ``exit_code``: 128 + the signal's number, as a shell reports a process killed by it."""

    def __init__(self, message: str, exit_code: int = EXIT_PREEMPTED) -> None:
        super().__init__(message)
        self.exit_code = exit_code
