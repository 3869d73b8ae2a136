"""Errors that describe bad input. Entry points print their message and exit non-zero."""


class PPOWError(Exception):
    """Base class: an error whose message is meant for the user, not a traceback."""


class CheckpointError(PPOWError):
    """A model or drafter checkpoint is missing, corrupt, truncated or of an unsupported kind."""


class InputError(PPOWError):
    """Invalid user input: prompts, sampling parameters, question files, specs."""


class MeasurementError(PPOWError):
    """A timing on this machine gave no usable figure (for example, one swamped by noise)."""
