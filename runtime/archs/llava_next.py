"""LLaVA-NeXT at run time (`model_type` "llava_next", exporter/archs/llava_next.py): any-resolution tiling.

    image (H x W) ─► best grid resolution (R_h, R_w) from image_grid_pinpoints
                 ├─► resize into (R_h, R_w) keeping the aspect ratio, zero-pad to it, cut into t x t tiles
                 └─► base tile: the whole image squashed to the base size
    [base, tile_1 .. tile_k] ─► per-tile CLIP steps (runtime/preprocess.py) ─► vision graph ─► [1 + k, P, d]
    pack: tiles' features laid out as a (g_h * p) x (g_w * p) grid ─► unpad to the image's aspect ratio
          ─► one `image_newline` after each grid row ─► [base P rows, grid rows row-major]   ─► [T_img, d]

The number of image-token positions of an image, T_img = P + h' * (w' + 1) (h' x w' the unpadded grid), depends on
its size, so prompts are sized after preprocessing (`fixed_tokens_per_image` is None).

Visual positions (METHODS.md, "Visual positions across architectures"): `V` is every position of the image's
span: the base tile's P features, the unpadded grid's features, and the `image_newline` embeddings that end each
grid row. The newline positions hold an image embedding (a learned vector that stands for the layout, placed by
the image), so CLVA's anchors and weights, SEVI's visual keys, VisAlign's v_bar and IAVA's selection cover them
like any other image position.

Numerics follow transformers' `LlavaNextImageProcessorPil` (select the best resolution by the largest effective
then the smallest wasted area; resize with Pillow on uint8; pad with zeros, centred with the odd pixel at the
bottom/right; tiles in row-major order; the base image resized to `size` as height x width) and
`LlavaNextModel.pack_image_features` / `unpad_image` (re-implemented in numpy from their documented behaviour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from anchorrt.runtime.archs import VisualInput, _input_dtype, register_runtime
from anchorrt.runtime.archs.llava import LlavaRuntime
from anchorrt.runtime.errors import ArtifactError, ImageError
from anchorrt.runtime.preprocess import MAX_RESIZED_PIXELS
from PIL import Image

MAX_PINPOINTS = 64


def select_best_resolution(size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) of `pinpoints` that keeps most of the image's pixels, then wastes the fewest."""
    height, width = size
    best, best_effective, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    return best


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into `target` with its aspect ratio (the long side fills it)."""
    height, width = size
    th, tw = target
    if tw / width < th / height:
        return min(math.ceil(height * (tw / width)), th), tw
    return th, min(math.ceil(width * (th / height)), tw)


def unpadded_grid(size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """The rows/columns of a (g_h * p) x (g_w * p) feature grid that hold the image, not the padding.
    -> (top, bottom, left, right) bounds."""
    height, width = size
    rows, cols = grid
    if width / height > cols / rows:  # wider than the grid: padding above and below
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return pad, rows - pad, 0, cols
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return 0, rows, pad, cols - pad


@register_runtime("llava_next")
class LlavaNextRuntime(LlavaRuntime):
    def __init__(self, manifest, open_graph):
        super().__init__(manifest, open_graph)
        spec, pre = manifest.data.get("llava_next"), self.image_processor.params
        pins = spec.get("image_grid_pinpoints") if isinstance(spec, dict) else None
        per_side = spec.get("patches_per_side") if isinstance(spec, dict) else None
        tile = pre["crop_size"][0]
        ok = isinstance(pins, list) and 0 < len(pins) <= MAX_PINPOINTS and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and 0 < v <= 8192 and v % tile == 0
                                                        for v in p) for p in pins)
        ok = ok and isinstance(per_side, int) and 0 < per_side <= 8192 and pre["crop_size"][1] == tile
        if not ok or pre.get("image_grid_pinpoints", pins) != pins or self.tokens_per_image != per_side ** 2:
            raise ArtifactError("manifest fields llava_next (image_grid_pinpoints, patches_per_side) and "
                                "preprocessing (crop_size, image_grid_pinpoints) disagree or are invalid; re-export")
        self.pinpoints = [tuple(p) for p in pins]  # the model's; the processor's are checked equal above
        self.tile = tile  # pixels a side of one tile
        self.per_side = per_side  # feature rows (and columns) of one tile: P = per_side ** 2 (CLS dropped)
        self.base_size = (pre["shortest_edge"], pre["shortest_edge"])  # the whole image, squashed
        self.tokens_per_tile = self.tokens_per_image

    @property
    def fixed_tokens_per_image(self) -> None:
        return None

    # -- layout ------------------------------------------------------------------------------------------------
    def layout(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int], int]:
        """An image of `size` (height, width) -> (best resolution, unpadded grid bounds, token count)."""
        best = select_best_resolution(size, self.pinpoints)
        grid = (best[0] // self.tile * self.per_side, best[1] // self.tile * self.per_side)
        top, bottom, left, right = unpadded_grid(size, grid)
        rows, cols = bottom - top, right - left
        return best, (top, bottom, left, right), self.tokens_per_tile + rows * (cols + 1)

    def preprocess(self, images: Sequence, first_index: int = 0) -> VisualInput:
        if len(images) == 0:
            raise ImageError("no images to preprocess: expected a non-empty list of PIL images; pass at least one")
        tiles, counts, sizes, per_image = [], [], [], []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ImageError(f"image #{first_index + i} is a {type(image).__name__}, not a PIL image; load it "
                                 "with load_image()")
            size = (image.height, image.width)
            best, _, count = self.layout(size)
            rgb = image.convert("RGB") if image.mode != "RGB" else image
            new_h, new_w = fit_size(size, best)
            if new_h * new_w > MAX_RESIZED_PIXELS:
                raise ImageError(f"image #{first_index + i} ({image.width}x{image.height}) would be resized to "
                                 f"{new_w}x{new_h}; downscale it")
            resized = np.asarray(rgb.resize((new_w, new_h), resample=self.image_processor.params["resample"]))
            canvas = np.zeros((best[0], best[1], 3), dtype=np.uint8)  # zero padding, centred
            top, left = (best[0] - new_h) // 2, (best[1] - new_w) // 2
            canvas[top:top + new_h, left:left + new_w] = resized
            base = rgb.resize((self.base_size[1], self.base_size[0]), resample=self.image_processor.params["resample"])
            parts = [base] + [Image.fromarray(canvas[y:y + self.tile, x:x + self.tile])
                              for y in range(0, best[0], self.tile) for x in range(0, best[1], self.tile)]
            tiles += [self.image_processor.preprocess_one(p, index=first_index + i) for p in parts]
            counts.append(count)
            sizes.append(size)
            per_image.append(len(parts))
        pixel_values = np.stack(tiles).astype(np.float32, copy=False)  # [sum(1 + k_i), 3, t, t]
        return VisualInput({"pixel_values": pixel_values}, counts,
                           {"image_sizes": np.asarray(sizes, dtype=np.int64), "tiles_per_image": per_image})

    def encode(self, visual: VisualInput, texts: Sequence[str] | None = None) -> np.ndarray:
        pixel_values = visual.feeds["pixel_values"]
        out = self.vision.run({"pixel_values": pixel_values.astype(_input_dtype(self.vision, "pixel_values"))},
                              ["image_features", "image_newline"])
        feats, newline = out["image_features"], out["image_newline"]  # [tiles, P, d], [d]
        d = feats.shape[-1]
        packed, start = [], 0
        for size, k, count in zip(visual.extra["image_sizes"], visual.extra["tiles_per_image"],
                                  visual.tokens_per_image):
            tiles = feats[start:start + k]
            start += k
            best, (top, bottom, left, right), _ = self.layout((int(size[0]), int(size[1])))
            gh, gw, p = best[0] // self.tile, best[1] // self.tile, self.per_side
            grid = tiles[1:].reshape(gh, gw, p, p, d).transpose(0, 2, 1, 3, 4).reshape(gh * p, gw * p, d)
            grid = grid[top:bottom, left:right]  # unpad  [h', w', d]
            rows = np.concatenate([grid, np.broadcast_to(newline, (grid.shape[0], 1, d))], axis=1)  # [h', w'+1, d]
            image = np.concatenate([tiles[0], rows.reshape(-1, d)])  # [P + h'(w'+1), d]
            if image.shape[0] != count:
                raise ArtifactError(f"the vision graph gave {image.shape[0]} features for an image that takes {count} "
                                    "positions; re-export the model")
            packed.append(image)
        return np.concatenate(packed)
