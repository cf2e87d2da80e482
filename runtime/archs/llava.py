"""LLaVA-1.5 at run time (`model_type` "llava", exporter/archs/llava.py).

    PIL images ─► ImagePreprocessor (CLIP-style, runtime/preprocess.py) ─► pixel_values [N, 3, H, W]
               ─► vision graph ─► image_features [N, T, d] ─► flat [N*T, d]

Every image takes the same `tokens.tokens_per_image` positions (T = patches, less CLS under the "default"
feature-select strategy), so the prompt can be sized before any image is decoded. Positions are Llama's 1-D
`cumsum(attention_mask) - 1` (the base class).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from anchorrt.runtime.archs import RuntimeArch, VisualInput, _input_dtype, register_runtime
from anchorrt.runtime.errors import ImageError
from anchorrt.runtime.preprocess import ImagePreprocessor


@register_runtime("llava")
class LlavaRuntime(RuntimeArch):
    def __init__(self, manifest, open_graph):
        super().__init__(manifest, open_graph)
        self.vision = open_graph("vision")
        self.image_processor = ImagePreprocessor(manifest.preprocessing)
        self.tokens_per_image = manifest.tokens["tokens_per_image"]

    @property
    def fixed_tokens_per_image(self) -> int:
        return self.tokens_per_image

    def preprocess(self, images: Sequence, first_index: int = 0) -> VisualInput:
        if len(images) == 0:
            raise ImageError("no images to preprocess: expected a non-empty list of PIL images; pass at least one")
        pixel_values = self.image_processor(images)  # [N, 3, H, W]
        return VisualInput({"pixel_values": pixel_values}, [self.tokens_per_image] * len(images))

    def encode(self, visual: VisualInput, texts: Sequence[str] | None = None) -> np.ndarray:
        pixel_values = visual.feeds["pixel_values"]
        out = self.vision.run({"pixel_values": pixel_values.astype(_input_dtype(self.vision, "pixel_values"))},
                              ["image_features"])["image_features"]  # [N, T, d]
        return out.reshape(-1, out.shape[-1])  # [N*T, d]
