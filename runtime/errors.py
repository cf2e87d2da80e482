"""Typed errors. Each carries a one-line message that names the problem and the fix.

The CLI prints `error: <message>` and exits non-zero for any of these; the API raises them. Nothing here
imports torch or transformers.
"""


class AnchorError(Exception):
    """Base class: a problem the user can fix. `str(err)` is one line."""

    exit_code = 2


class ArtifactError(AnchorError):
    """An artifact folder is missing, incomplete, modified, or not understood."""


class CheckpointError(AnchorError):
    """A model checkpoint folder cannot be exported (missing, wrong architecture, unsafe weights...)."""


class ImageError(AnchorError):
    """An image cannot be read or is not acceptable (corrupt, empty, too large, unsupported format)."""


class PromptError(AnchorError):
    """A prompt cannot be run (empty, contains the image token, no room left in the context)."""


class FlagError(AnchorError):
    """A mitigation or generation flag has a bad value or names a method the artifact does not carry."""


class BackendError(AnchorError):
    """An execution backend is missing or cannot run here (e.g. TensorRT not installed, CUDA fell back)."""


class VerifyError(AnchorError):
    """Exported graphs disagree with the PyTorch model past the stated tolerance."""

    exit_code = 3
