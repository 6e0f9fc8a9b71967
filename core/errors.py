"""Errors qpeft reports to users as one line (exit status 2), never as a traceback."""

from __future__ import annotations


class QpeftError(Exception):
    """A user-facing error: bad input or an unsupported request, explained in one line."""

    exit_code = 2


class ConfigError(QpeftError):
    """A configuration problem, tied to the config key that caused it."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class PluginError(QpeftError):
    """A plugin is missing, broken, or two plugins claim the same name."""


class TrainingDiverged(QpeftError):
    """Training produced a non-finite loss or gradient norm: the run stops, saves no adapter,
    and keeps the checkpoints written before (exit status 2, like every run failure)."""

    def __init__(self, message: str, *, step: int):
        self.step = step
        super().__init__(message)


class NonFiniteError(QpeftError):
    """Weights holding NaN/inf: refused when an adapter or a merged model would be written or
    loaded, naming the tensor."""
