"""Qwen2-VL image preprocessing without torch: smart resize, rescale, normalise, patch flattening.

Mirrors the PIL backend of transformers 5 (`Qwen2VLImageProcessorPil`, what `Qwen2VLImageProcessor` resolves to
without torchvision), re-implemented from its documented behaviour:

1. RGB conversion as runtime/preprocess.py (`convert_to_rgb`).
2. `smart_resize(h, w, factor=P*m, min_pixels, max_pixels)`: each side rounded (Python's round, half to even) to a
   multiple of `factor`; if the area exceeds max_pixels, both sides are scaled by sqrt(h*w/max_pixels) and floored
   to multiples of factor (at least factor); if below min_pixels, scaled up by sqrt(min_pixels/(h*w)) and ceiled.
   Aspect ratios above 200 are refused. Pillow resizes the uint8 RGB image to that size (bicubic by default).
3. Rescale in float64 then float32; normalise in float32 with float32 mean/std (as the CLIP path).
4. Patchify: [C, H, W] → (gh/m, gw/m, m, m, C, P, P), the frame repeated `temporal_patch_size` times for a still
   image, flattened to [gh*gw, C*T*P*P]; grid (1, gh, gw).

The torchvision backend (`Qwen2VLImageProcessorFast`) resizes tensors and differs from Pillow by a few grey levels;
it is not mirrored (as for CLIP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from anchorrt.runtime.errors import ArtifactError, ImageError
from anchorrt.runtime.preprocess import convert_to_rgb
from PIL import Image

MAX_QWEN_PIXELS = 64 * 28 * 28 * 1280
"""Upper bound on a manifest's max_pixels (64x the released default, 1003520 px): a forged value would make every
request resize to, and run the vision tower on, an arbitrarily large image."""

PARAM_KEYS = ("do_convert_rgb", "do_resize", "resample", "min_pixels", "max_pixels", "do_rescale", "rescale_factor",
              "do_normalize", "image_mean", "image_std", "patch_size", "temporal_patch_size", "merge_size")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is above 200:1, which "
                         "Qwen2-VL's processor refuses; crop the image closer to square")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_qwen2_vl_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a manifest's Qwen2-VL preprocessing params; ArtifactError naming the first bad field."""
    def bad(key: str, expected: str) -> ArtifactError:
        return ArtifactError(f"manifest preprocessing.{key} must be {expected} (got {params.get(key)!r}); re-export")

    if not isinstance(params, Mapping):
        raise ArtifactError("manifest preprocessing is not an object; re-export the model")
    out = {}
    for key in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize"):
        if not isinstance(params.get(key), bool):
            raise bad(key, "true or false")
        out[key] = params[key]
    for key, limit in (("patch_size", 1024), ("temporal_patch_size", 64), ("merge_size", 64), ("resample", 5)):
        v = params.get(key)
        if not _is_int(v) or not (0 <= v <= limit) or (key != "resample" and v == 0):
            raise bad(key, f"an integer up to {limit}")
        out[key] = v
    factor = out["patch_size"] * out["merge_size"]
    for key in ("min_pixels", "max_pixels"):
        v = params.get(key)
        if not _is_int(v) or not 0 < v <= MAX_QWEN_PIXELS:
            raise bad(key, f"a positive integer up to {MAX_QWEN_PIXELS}")
        out[key] = v
    if out["max_pixels"] < factor * factor or out["min_pixels"] > out["max_pixels"]:
        raise bad("max_pixels", f"at least {factor * factor} and at least min_pixels")
    v = params.get("rescale_factor")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 < v < float("inf")):
        raise bad("rescale_factor", "a positive number")
    out["rescale_factor"] = float(v)
    for key in ("image_mean", "image_std"):
        v = params.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                              and math.isfinite(x) for x in v)):
            raise bad(key, "a list of 3 numbers")
        if key == "image_std" and any(x == 0 for x in v):
            raise bad(key, "non-zero")
        out[key] = [float(x) for x in v]
    return out


class Qwen2VLPreprocessor:
    """PIL images → (`pixel_values` float32 [sum of patches, C*T*P*P], grids [(1, gh, gw), ...])."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = validate_qwen2_vl_params(params)
        self._mean = np.asarray(self.params["image_mean"], dtype=np.float32)[:, None, None]
        self._std = np.asarray(self.params["image_std"], dtype=np.float32)[:, None, None]

    def __call__(self, images: Sequence[Image.Image] | Image.Image) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, Sequence) or len(images) == 0:
            raise ImageError("no images to preprocess: expected a non-empty list of PIL images; pass at least one")
        out = [self.preprocess_one(img, i) for i, img in enumerate(images)]
        return np.concatenate([p for p, _ in out]), [g for _, g in out]

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        p = self.params
        if not p["do_resize"]:
            return height, width
        return smart_resize(height, width, p["patch_size"] * p["merge_size"], p["min_pixels"], p["max_pixels"])

    def preprocess_one(self, image: Image.Image, index: int = 0) -> tuple[np.ndarray, tuple[int, int, int]]:
        name = f"#{index}"
        if not isinstance(image, Image.Image):
            raise ImageError(f"image {name} is a {type(image).__name__}, not a PIL image; load it with load_image()")
        p = self.params
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(f"image {name} has zero width or height ({width}x{height}); pass a non-empty image")
        try:
            rgb = convert_to_rgb(image) if p["do_convert_rgb"] else image
            if rgb.mode != "RGB":
                raise ImageError(f"image {name} has mode {image.mode} and this model's preprocessing does not "
                                 "convert to RGB; convert it with load_image() first")
            new_h, new_w = self.resized_size(height, width)
            if (new_h, new_w) != (height, width):
                rgb = Image.fromarray(np.asarray(rgb, dtype=np.uint8)).resize((new_w, new_h), resample=p["resample"])
            pixels = np.asarray(rgb, dtype=np.uint8)
        except ImageError:
            raise
        except Exception:  # noqa: BLE001 - a lazily opened image can fail to decode here; no Pillow error escapes
            raise ImageError(f"image {name} cannot be decoded, converted to RGB or resized (mode {image.mode}); "
                             "load it with load_image() to see why") from None
        factor = p["patch_size"] * p["merge_size"]
        if pixels.shape[0] % factor or pixels.shape[1] % factor:
            raise ImageError(f"image {name} is {pixels.shape[1]}x{pixels.shape[0]}, not a multiple of {factor} a "
                             "side, and this artifact does not resize; resize it first")
        chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        out = (chw.astype(np.float64) * p["rescale_factor"]).astype(np.float32) if p["do_rescale"] \
            else chw.astype(np.float32)
        if p["do_normalize"]:
            out = (out - self._mean) / self._std
        return self._patchify(out)

    def _patchify(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        p = self.params
        ps, m, tp = p["patch_size"], p["merge_size"], p["temporal_patch_size"]
        c, h, w = image.shape
        gh, gw = h // ps, w // ps
        x = image.reshape(c, gh // m, m, ps, gw // m, m, ps).transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m,gw/m,m,m,C,P,P)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, ps, ps))  # the frame repeated T times
        return np.ascontiguousarray(x.reshape(gh * gw, c * tp * ps * ps), dtype=np.float32), (1, gh, gw)
