"""The project's one error hierarchy: every problem a user can fix is a `LlavaError`.

Each class also subclasses the builtin it refines (`ValueError`, `TypeError`,
`FileNotFoundError`, ...), so code that caught the builtin keeps working. The message always
names the file, argument or row at fault; the command line prints it as one line and exits 2.
Anything else that escapes is a bug in the project, not in the input.

This module imports nothing from the package: every layer may raise these.
"""

from __future__ import annotations


class LlavaError(Exception):
    """Base of every error the project raises on purpose."""


class InputError(LlavaError, ValueError):
    """An argument whose value cannot be used (wrong range, unknown name, empty)."""


class InputTypeError(LlavaError, TypeError):
    """An argument of the wrong type (e.g. `images=123`, `prompt=None`)."""


class ImageError(InputError):
    """An image that cannot be loaded; the message names where it came from."""


class ImageNotFound(ImageError, FileNotFoundError):
    """An image path that does not exist (or is not a file)."""


class PromptError(InputError):
    """A prompt or conversation that cannot be paired with its images or rendered."""


class ImageTokenMismatch(PromptError):
    """Image placeholder tokens in the ids and image features disagree in number."""


class ContextTooLong(PromptError):
    """A prompt that leaves no room in the model's context for even one new token."""


class DeviceError(InputError):
    """A device or dtype that this machine or build of torch cannot provide."""


class CheckpointError(LlavaError, ValueError):
    """A checkpoint folder or file that cannot be read or does not fit the model."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint path or hub name that does not exist (or cannot be reached offline)."""


class CheckpointMismatch(CheckpointError):
    """Weights whose names or shapes do not fit the model they are loaded into."""


class DataError(LlavaError, ValueError):
    """A bad data file or row; the message names the row id (or file and line) and the reason."""

    def __init__(self, reason: str, row_id: object = None) -> None:
        self.reason = reason
        self.row_id = row_id
        super().__init__(reason if row_id is None else f"row {row_id}: {reason}")


class LabelError(DataError):
    """A row whose labels cannot be built; never turned into a silently all-masked row."""


class OutputPathError(LlavaError, FileExistsError):
    """An output path that cannot be written: it exists and is not empty, or sits under a file."""


class MissingDependency(LlavaError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra."""


class Overloaded(LlavaError, RuntimeError):
    """The server's batch and waiting queue are full; the request was not taken (HTTP 429)."""


class GenerationFailed(LlavaError, RuntimeError):
    """The model failed while generating (a bug or a device error, logged by the server; HTTP 500)."""


class SchedulerClosed(LlavaError, RuntimeError):
    """The scheduler has shut down and takes no more requests (HTTP 503)."""


__all__ = [
    "LlavaError", "InputError", "InputTypeError", "ImageError", "ImageNotFound", "PromptError",
    "ImageTokenMismatch", "ContextTooLong", "DeviceError", "CheckpointError", "CheckpointNotFound",
    "CheckpointMismatch", "DataError", "LabelError", "OutputPathError", "MissingDependency",
    "Overloaded", "SchedulerClosed", "GenerationFailed",
]
