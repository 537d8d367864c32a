"""Typed errors of the engine: callers map them to responses in one place."""


class EditError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequest(EditError, ValueError):
    """A request argument is wrong (empty prompt, steps out of range, bad seed...)."""


class InvalidImage(InvalidRequest):
    """An image could not be used: undecodable, truncated, too large, wrong dtype or shape."""


class ModelLoadError(EditError):
    """A model folder, preset or sidecar could not be loaded; the message says what to fix."""


class UnsupportedRequest(InvalidRequest):
    """The request is valid in general but this model cannot serve it (e.g. steps a student was not trained for)."""


class ConfigError(EditError, ValueError):
    """A configuration value is invalid (NaN, out of range, unknown field)."""


class EditCancelled(EditError):
    """The caller gave up on the edit (its request timed out, its client left): stopped at the next stage or step."""


class EngineDead(EditError):
    """The editor's device failed beyond recovery (a CUDA error that loses its state): restart the replica."""
