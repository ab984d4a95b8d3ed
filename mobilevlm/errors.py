"""Errors that mean "your input is wrong", raised with a message naming the file, field or sample.

The CLI prints these as one line instead of a traceback; anything else is a bug and keeps its traceback.
"""


class MobileVLMError(Exception):
    """Base class for user-facing errors."""


class ImageError(MobileVLMError, ValueError):
    """An image could not be read, is not an image, or exceeds the pixel limit."""


class PromptError(MobileVLMError, ValueError):
    """A prompt does not fit its images or the model's context."""


class CheckpointError(MobileVLMError, OSError):
    """A model directory lacks a config or weights, or its weights do not fit the config."""


class DataError(MobileVLMError, ValueError):
    """A training or benchmark data file is malformed; the message names the file and the sample or line."""
