"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(ValueError):
    """Bad input from the user (config, data, paths). The message names the value and the fix."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or hidden state became NaN/inf during training; the message says where."""


class Preempted(RuntimeError):
    """Training was stopped by SIGTERM (a scheduler's preemption); ``last.ckpt`` holds the last finished step."""
