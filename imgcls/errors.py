"""Every exception imgcls raises on purpose, in one place (at the bottom of the import graph: no imports).

What the commands do with them: a `RecipeError` (and its kinds) is the user's to fix, printed as `error: ...`
with exit status 2 (`imgcls.exitcodes.EXIT_USAGE`); the others say what happened and exit 1. Their messages are
one paragraph that names the file, key or image and what to do.
"""
from __future__ import annotations


class RecipeError(ValueError):
    """A recipe (or a command-line value) that cannot be used; the message lists every problem by dotted key."""


class WeightsError(RecipeError):
    """Pretrained weights that cannot be had here: not cached and not downloadable, or a damaged cached file."""


class DataError(ValueError):
    """A data problem the user must fix; the message names the file, folder or key."""


class ShardError(RuntimeError):
    """A shard that cannot be fetched or read, or does not match its manifest. Not an `images.BAD_IMAGE_ERRORS`
    on purpose: the image check and `data.on_bad_image = "skip"` must not take a whole missing shard for a
    handful of broken images."""


class ClassNameError(ValueError):
    """A class name that cannot be a label."""


class ModelError(ValueError):
    """A model file or folder that is neither an imgcls artifact nor an ONNX file exported by imgcls-export."""


class SortError(ValueError):
    """A --sort-into target that would land outside DIR, or cannot be written."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from safely or exactly."""


class PreflightError(RuntimeError):
    """The processes of a distributed job did not come together; the message says what to check."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops without saving the bad state."""


class CorruptLog(ValueError):
    """The file is not a W&B transaction log, or a checksum does not match."""


class LaunchError(ValueError):
    """The launch cannot be assembled (missing address, wrong process count...); nothing was started."""
