"""Runtime architecture seam: what differs between architectures at run time, one module per architecture.

`runtime/pipeline.py` owns the generic loop (prompts, left padding, KV cache, mitigation feeds, IAVA, VisAlign,
sampling). Everything that depends on the architecture lives in a `RuntimeArch` subclass registered under the
manifest's `model_type` (the exporter writes it: `exporter/archs/*.py`, `model_type` class attribute):

    @register_runtime("llava")
    class LlavaRuntime(RuntimeArch): ...

    arch = runtime_for(manifest, open_graph)      # open_graph(role) -> backend (runtime/backend.py)

The pipeline drives one request group like this (B rows, N images in all, images in request order):

    images (PIL, N) ─► arch.preprocess(images, index0) ─► VisualInput (feeds, tokens_per_image [N], extra)
    prompts ─► PromptBuilder.encode(prompt, tokens_per_image=[counts of this row's images])
    VisualInput (+ each image's prompt text) ─► arch.encode(visual, texts) ─► features [total_tokens, d]
    features ─► arch.embed_features(features) ─► the embed graph's `image_features` feed
    prefill:  arch.prefill_positions(batch) ─► (position_ids, last [B])
    decode:   last += 1 each step; arch.decode_positions(last) ─► position_ids of the one new token per row

Interface (a subclass overrides what differs; the defaults are the Llama-style ones of LLaVA-1.5):

- `__init__(manifest, open_graph)`: open the vision stage(s) here (`open_graph("vision")`); a Q-Former or a
  patch-merger graph is one more role recorded in the manifest's `graphs`.
- `preprocess(images, first_index=0) -> VisualInput`: PIL RGB images -> the vision stage's feeds, and the number
  of image-token positions each image takes in the prompt (`tokens_per_image`, one int per image: fixed for
  LLaVA-1.5, size-dependent for LLaVA-NeXT's tiling or Qwen2-VL's grids). `extra` carries what positions need
  (e.g. Qwen2-VL's `grid_thw`). Raise `ImageError` naming the image (`first_index + i`).
- `encode(visual, texts=None) -> np.ndarray [total_visual_tokens, d]`: run the vision stage(s); the rows are the
  images' tokens in image order, i.e. in the order of the prompt's image positions (row-major over the batch).
  `texts[i]` is the prompt text of image i's request (InstructBLIP's Q-Former reads the instruction).
- `embed_features(features)`: the flat features -> the embed graph's `image_features` input. The default reads
  the graph's declared rank: rank 3 `[N, T, d]` (LLaVA-1.5 artifacts, T static) gets `reshape(-1, T, d)`, rank 2
  `[num_tokens, d]` (variable tokens per image) gets the flat array. `no_image_features()`: the same for a
  decode step, which carries no image.
- `prefill_positions(batch) -> (position_ids, last)`: `batch` has `ids`, `attention_mask`, `image_mask` [B, S]
  (left padded), `spans` (per row, the (start, end) of each image's positions) and `images` (per row, the
  global image indices); `visual` is the group's VisualInput. `last` [B] is the position of each row's last
  prompt token in the arch's own coordinates. Llama-style: `cumsum(mask) - 1` over [B, S]; Qwen2-VL returns
  M-RoPE `[3, B, S]` and `last` = the row's largest position (text index + rope delta).
- `decode_positions(last) -> position_ids`: the next token's positions from `last` [B] (already advanced by one):
  `[B, 1]` Llama-style, `[3, B, 1]` for M-RoPE (the three sections share the text position after the images).

The manifest's `model_type` picks the module; an artifact whose type has no module is refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from anchorrt.runtime.errors import ArtifactError

_RUNTIMES: dict[str, type] = {}
DEFAULT_MODEL_TYPE = "llava"  # artifacts written before the seam all came from exporter/archs/llava.py


def register_runtime(*model_types: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        for name in model_types:
            _RUNTIMES[name] = cls
        cls.model_types = tuple(model_types)
        return cls

    return deco


def supported_model_types() -> list[str]:
    _import_builtin()
    return sorted(_RUNTIMES)


def runtime_for(manifest, open_graph: Callable[[str], Any]) -> RuntimeArch:
    """The registered RuntimeArch for `manifest`'s model_type, instantiated; ArtifactError when none is."""
    _import_builtin()
    model_type = manifest.data.get("model_type", DEFAULT_MODEL_TYPE)
    cls = _RUNTIMES.get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        shown = str(model_type)[:60].encode("ascii", "backslashreplace").decode()
        raise ArtifactError(f"this artifact's model_type '{shown}' has no runtime module (supported: "
                            f"{', '.join(supported_model_types())}); upgrade AnchorRT or re-export the model")
    return cls(manifest, open_graph)


def _import_builtin() -> None:
    # Imported lazily: the modules register themselves.
    from anchorrt.runtime.archs import llava, llava_next, qwen2_vl  # noqa: F401


@dataclass
class VisualInput:
    """The preprocessed images of one request group, in request order."""

    feeds: dict[str, np.ndarray]  # the vision stage's inputs, e.g. {"pixel_values": [N, 3, H, W]}
    tokens_per_image: list[int]  # image-token positions each image takes in the prompt
    extra: dict[str, Any] = field(default_factory=dict)  # per-arch, e.g. {"grid_thw": [N, 3]}

    @property
    def num_images(self) -> int:
        return len(self.tokens_per_image)

    def repeat(self, times: int) -> VisualInput:
        """The same images `times` over (IAVA's general and query streams share the request's images)."""
        feeds = {k: np.concatenate([v] * times) for k, v in self.feeds.items()}
        extra = {k: (np.concatenate([v] * times) if isinstance(v, np.ndarray) else v) for k, v in self.extra.items()}
        return VisualInput(feeds, list(self.tokens_per_image) * times, extra)


@dataclass
class PromptLayout:
    """The padded prompt batch, as the position-id functions see it."""

    ids: np.ndarray  # [B, S] int64, left padded
    attention_mask: np.ndarray  # [B, S] int64
    image_mask: np.ndarray  # [B, S] bool
    spans: list[list[tuple[int, int]]]  # per row: (start, end) of each image's positions, padded coordinates
    images: list[list[int]]  # per row: the global index of each of its images (into VisualInput)
    visual: VisualInput | None = None


class RuntimeArch:
    """Base: Llama-style positions and a single vision graph `pixel_values -> image_features`."""

    model_types: tuple[str, ...] = ()

    def __init__(self, manifest, open_graph: Callable[[str], Any]):
        self.manifest = manifest
        self.hidden = manifest.dims["hidden_size"]

    # -- images --------------------------------------------------------------------------------------------
    def limit_pixels(self, max_pixels: int | None) -> None:
        """The Pipeline's `max_image_pixels` for this arch's preprocessing (None: the default limit). Archs that
        preprocess with `anchorrt.runtime.preprocess.ImagePreprocessor` under `self.image_processor` need nothing more."""
        processor = getattr(self, "image_processor", None)
        if processor is not None and max_pixels is not None:
            processor.max_pixels = max_pixels

    def preprocess(self, images: Sequence, first_index: int = 0) -> VisualInput:
        raise NotImplementedError

    def encode(self, visual: VisualInput, texts: Sequence[str] | None = None) -> np.ndarray:
        raise NotImplementedError

    @property
    def fixed_tokens_per_image(self) -> int | None:
        """The image-token count when every image takes the same number (so prompts can be sized before the
        images are decoded); None when it depends on the image."""
        return None

    # -- embed feed ----------------------------------------------------------------------------------------
    def embed_features(self, features: np.ndarray, embed) -> np.ndarray:
        """Flat features [total, d] -> the embed graph's `image_features` input (rank read from the graph)."""
        shape = _input_shape(embed, "image_features")
        dtype = _input_dtype(embed, "image_features")
        if len(shape) == 3:
            t = shape[1]
            if not isinstance(t, int) or t <= 0:
                raise ArtifactError(f"graph '{embed.path.name}' input image_features has no static token count; "
                                    "re-export the model")
            return np.ascontiguousarray(features.reshape(-1, t, features.shape[-1]), dtype=dtype)
        return np.ascontiguousarray(features.reshape(-1, features.shape[-1]), dtype=dtype)

    def no_image_features(self, embed) -> np.ndarray:
        """The embed graph's `image_features` for a step without images (a decode step)."""
        shape = _input_shape(embed, "image_features")
        dtype = _input_dtype(embed, "image_features")
        if len(shape) == 3:
            return np.zeros((0, shape[1], self.hidden), dtype=dtype)
        return np.zeros((0, self.hidden), dtype=dtype)

    # -- positions -----------------------------------------------------------------------------------------
    def prefill_positions(self, layout: PromptLayout) -> tuple[np.ndarray, np.ndarray]:
        """Llama-style: position = number of real tokens before it (left padding gets 0). -> ([B, S], last [B])"""
        positions = np.maximum(np.cumsum(layout.attention_mask, axis=-1) - 1, 0)  # [B, S]
        return positions, positions[:, -1].copy()

    def decode_positions(self, last: np.ndarray) -> np.ndarray:
        return last[:, None]  # [B, 1]


def _input_shape(backend, name: str) -> list:
    for i in backend.session.get_inputs():
        if i.name == name:
            return list(i.shape)
    raise ArtifactError(f"graph '{backend.path.name}' has no input '{name}'; re-export")


def _input_dtype(backend, name: str):
    for i in backend.session.get_inputs():
        if i.name == name:
            return np.float16 if "float16" in i.type else np.float32
    raise ArtifactError(f"graph '{backend.path.name}' has no input '{name}'; re-export")
