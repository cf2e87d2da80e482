"""AnchorRT's torch-free runtime: numpy, onnxruntime, tokenizers and Pillow only.

    from anchorrt.runtime import Pipeline
    pipe = Pipeline.from_dir("out/llava")
    print(pipe.generate("cat.jpg", "What is in the image?").text)
"""

from anchorrt.runtime.errors import (  # noqa: F401 - the public error types
    AnchorError,
    ArtifactError,
    BackendError,
    FlagError,
    ImageError,
    PromptError,
)

__all__ = ["Pipeline", "Request", "Generation", "AnchorError", "ArtifactError", "BackendError", "FlagError",
           "ImageError", "PromptError"]


def __getattr__(name: str):
    # Lazy, so that `from anchorrt.runtime.errors import ...` (used by the exporter) does not load onnxruntime.
    if name in ("Pipeline", "Request", "Generation"):
        from anchorrt.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
