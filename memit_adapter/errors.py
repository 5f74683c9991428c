"""Typed errors. Each subclasses :class:`MemitError` and the matching built-in, so callers may catch either."""

from __future__ import annotations


class MemitError(Exception):
    """Base class of every error raised on purpose by ``memit_adapter``."""


class InvalidRequestError(MemitError, ValueError):
    """An edit request is malformed: bad prompt template, subject not in prompt, empty target, ..."""


class ConflictingRequestsError(MemitError, ValueError):
    """Two requests (or two packs) give the same subject and relation prompt different targets."""


class ConfigError(MemitError, ValueError):
    """A configuration field holds a value outside what is allowed."""


class UnsupportedArchitectureError(MemitError, KeyError):
    """The model's ``config.model_type`` has no entry in the architecture table."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelError(MemitError, ValueError):
    """The model cannot be worked on as it is: weights on the meta device, a tokenizer it does not fit, ..."""


class StatisticsError(MemitError, RuntimeError):
    """Second-moment statistics are missing, unreadable or not finite."""


class PackError(MemitError, ValueError):
    """An edit pack is inconsistent, corrupted, or does not fit the model it is used with."""


class FingerprintMismatchError(PackError):
    """The pack was computed on other base weights than the model it is applied to."""


class WeightsChangedError(PackError):
    """Weights a pack was merged into were changed by other code since; ``unmerge`` would not restore them exactly."""


class OverwriteError(PackError):
    """Saving would replace or mix with files that are not an edit pack written by this library."""
