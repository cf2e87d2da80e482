"""Image loading and CLIP-style preprocessing for the runtime, without torch or transformers.

`load_image` turns a path, encoded bytes or a PIL image into an upright RGB `PIL.Image.Image`, and turns every way
that can fail (missing file, corrupt or truncated data, decompression bombs, odd pixel modes) into a one-line
`ImageError`. `ImagePreprocessor` turns RGB images into the `pixel_values` array the vision graph takes.

The numerics mirror the PIL backend of transformers 5 (`CLIPImageProcessorPil`, which is what
`CLIPImageProcessor` resolves to when torchvision is absent, and `LlavaImageProcessorPil`), re-implemented from its
documented behaviour, in this order:

1. RGB conversion (`convert_to_rgb`): an image with an alpha band or a `transparency` entry is composited onto an
   opaque white background; any other mode goes through Pillow's `convert("RGB")` (so 16/32-bit integer modes
   saturate at 255, exactly as transformers does). Note that `transformers.image_utils.load_image` instead drops
   the alpha band; we follow the image processor, which is what `processor(images=Image.open(path))` runs.
2. Optional pad to a square (LLaVA's `do_pad`): on the uint8 pixels, before resizing, the image is centred
   (offset `(side - edge) // 2`) on a square filled with `int(m * 255)` for each channel mean `m`.
3. Resize with Pillow on uint8 RGB so that the short side equals `shortest_edge`; the long side is
   `int(shortest_edge * long / short)`, i.e. truncated, not rounded.
4. Centre crop to `crop_size`: the crop starts at `(size - crop) // 2`; if the image is smaller than the crop it is
   first placed at offset `ceil((crop - size) / 2)` on zeros (uint8 zeros, so they are normalised like black).
5. Rescale in float64 (`pixels * rescale_factor`) then cast to float32.
6. Normalise in float32: `(x - mean) / std` with mean and std cast to float32.

Doing each step with the same library calls and dtypes makes the output bit-identical to transformers in practice.
Not mirrored: the torchvision backend (`CLIPImageProcessorFast`), whose tensor resize differs from Pillow's by
up to a few grey levels.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.errors import AnchorError, ArtifactError, ImageError

MAX_PIXELS = 64_000_000
"""Default limit on width * height of an input image, checked from the header before any pixel is decoded.

Why 64 Mpx: it admits every camera photo in common use (a 61 Mpx full-frame sensor is 9504 x 6336 = 60.2 Mpx) while
bounding what one request can cost: decoded RGB is 3 bytes a pixel (192 MB at the limit, plus one RGBA copy for
images with transparency) before the resize to the model's few hundred pixels a side. It sits below Pillow's own
`Image.MAX_IMAGE_PIXELS` (89.5 Mpx, a warning; twice that, an error), which also applies. Override it per call
(`load_image(..., max_pixels=N)`), per pipeline (`Pipeline.from_dir(..., max_image_pixels=N)`), or for a process,
the CLI included, with the environment variable ANCHORRT_MAX_IMAGE_PIXELS."""

MAX_PIXELS_ENV = "ANCHORRT_MAX_IMAGE_PIXELS"

MAX_PREPROCESS_SIDE = 8_192
"""Upper bound on `shortest_edge` and `crop_size` from a manifest: a forged value would make every request allocate
a huge `pixel_values` array (8192 x 8192 x 3 float32 is already 805 MB)."""

MAX_RESIZED_PIXELS = 64_000_000
"""Limit on the size after the shortest-edge resize: an extreme aspect ratio (1 x 100000) would otherwise ask
for a resize to hundreds of megapixels before the centre crop throws most of it away."""

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image

PARAM_KEYS = (
    "do_convert_rgb", "do_pad", "do_resize", "shortest_edge", "resample", "do_center_crop", "crop_size",
    "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
)
OPTIONAL_PARAM_KEYS = ("resize_exact",)
"""`resize_exact: [height, width]`: resize straight to that size, aspect ratio not kept (BLIP's image processor,
InstructBLIP); absent for CLIP/LLaVA, whose resize keeps the aspect ratio (`shortest_edge`)."""

_FORMATS_HINT = "PNG, JPEG, GIF, BMP, WEBP or TIFF"
_REWRITE_HINT = "re-export or re-save the image"
# Magic numbers, only to name the format when Pillow gives up before it has identified the file.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


def _printable(text: str) -> str:
    """Keep messages on one line even when a file name holds control characters."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(name: str, problem: str, fix: str) -> ImageError:
    return ImageError(f"cannot read image {name}: {problem}; {fix}")


def _sniff(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """Return `image` as mode RGB the way transformers' `convert_to_rgb` does (transparency over white).

    Pillow exceptions propagate; `load_image` and `ImagePreprocessor` wrap them into `ImageError`.
    """
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _decode(image: Image.Image, name: str, max_pixels: int, fmt: str | None) -> Image.Image:
    """Check the declared size, then decode the first frame, make it upright and RGB."""
    fmt = image.format or fmt
    what = f" ({fmt})" if fmt else ""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _fail(name, f"image has zero width or height ({width}x{height})", "pass a non-empty image")
    if width * height > max_pixels:
        raise _fail(name, f"image is too large ({width}x{height} = {width * height} pixels, limit {max_pixels})",
                    f"downscale it or raise the limit (max_pixels, or {MAX_PIXELS_ENV})")
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated GIF/PNG/WEBP or multi-page TIFF: the first frame is the image
        image.load()
        upright = ImageOps.exif_transpose(image)
        if upright is None:  # only returned by the in_place=True form; kept for type checkers
            upright = image
        try:
            return convert_to_rgb(upright)
        except ValueError:
            raise _fail(name, f"cannot convert pixel mode '{upright.mode}' to RGB", "re-save the image as RGB") from None
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _fail(name, "image is too large (over Pillow's decompression-bomb limit)", "downscale it") from None
    except MemoryError:
        raise _fail(name, f"not enough memory to decode it ({width}x{height})", "downscale it") from None
    except Exception:  # noqa: BLE001 - Pillow signals bad data with OSError, SyntaxError, ValueError, struct.error...
        raise _fail(name, f"file is truncated or corrupt{what}", _REWRITE_HINT) from None


def _open_and_decode(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    start = fp.tell()
    head = fp.read(16)
    fp.seek(start)
    sniffed = _sniff(head)
    try:
        image = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _fail(name, "image is too large (its header declares more pixels than Pillow's decompression-bomb "
                    f"limit of {Image.MAX_IMAGE_PIXELS} pixels)", "downscale it") from None
    except UnidentifiedImageError:
        if sniffed:  # a known signature Pillow could not parse further: a damaged header, not a foreign format
            raise _fail(name, f"file is truncated or corrupt ({sniffed})", _REWRITE_HINT) from None
        raise _fail(name, "not a recognised image format", f"use {_FORMATS_HINT}") from None
    except MemoryError:
        raise _fail(name, "not enough memory to open it", "downscale it") from None
    except Exception:  # noqa: BLE001 - any other failure to parse the header is bad data, whatever Pillow raised
        what = f" ({sniffed})" if sniffed else ""
        raise _fail(name, f"file is truncated or corrupt{what}", _REWRITE_HINT) from None
    with image:
        return _decode(image, name, max_pixels, sniffed)


class _PillowWarnings(warnings.catch_warnings):
    """Decompression-bomb warnings become errors (then ImageError); Pillow's chatter (corrupt EXIF...) is muted.

    Warning filters are process-wide, so this changes them only for the duration of one load, and leaves
    `Image.MAX_IMAGE_PIXELS` alone (other code in the process may rely on it).
    """

    def __enter__(self) -> None:
        super().__enter__()
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")


def default_max_pixels() -> int:
    """MAX_PIXELS, or the value of the ANCHORRT_MAX_IMAGE_PIXELS environment variable when it is set."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or raw.strip() == "":
        return MAX_PIXELS
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise ImageError(f"{MAX_PIXELS_ENV} must be a positive integer number of pixels, got {_printable(raw)!r}; "
                         f"unset it for the default of {MAX_PIXELS}")
    return value


def load_image(src: ImageSource, max_pixels: int | None = None) -> Image.Image:
    """Load an image as an upright RGB `PIL.Image.Image`, or raise a one-line `ImageError`.

    `src` is a path (str or os.PathLike), the encoded bytes of an image file, or a PIL image. The declared
    width * height is checked against `max_pixels` before the pixels are decoded (Pillow's `Image.open` only reads
    the header); Pillow's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) also applies and is reported the
    same way. `max_pixels=None` is `default_max_pixels()` (MAX_PIXELS unless ANCHORRT_MAX_IMAGE_PIXELS is set).
    Animated images (GIF, APNG, WEBP) and multi-page TIFFs yield their first frame only. The EXIF
    orientation tag is applied (`ImageOps.exif_transpose`), then the image is converted to RGB by `convert_to_rgb`
    (transparent pixels become white, as in transformers' image processors). No exception other than `ImageError`
    escapes.
    """
    if max_pixels is None:
        max_pixels = default_max_pixels()
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ImageError(f"max_pixels must be a positive integer, got {max_pixels!r}; pass e.g. {MAX_PIXELS}")
    with _PillowWarnings():
        if isinstance(src, Image.Image):
            return _decode(src, "<PIL image>", max_pixels, None)
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            if not data:
                raise _fail("<bytes>", "image data is empty", f"pass the encoded bytes of a {_FORMATS_HINT} file")
            return _open_and_decode(io.BytesIO(data), "<bytes>", max_pixels)
        if isinstance(src, (str, os.PathLike)):
            return _load_path(src, max_pixels)
    raise ImageError(f"cannot read image: unsupported source type '{type(src).__name__}'; "
                     "pass a file path, the image file's bytes, or a PIL image")


def _load_path(src: str | os.PathLike[str], max_pixels: int) -> Image.Image:
    try:
        path = Path(os.fspath(src))
    except TypeError:
        raise ImageError("cannot read image: the path is not a text path; pass a str or pathlib.Path") from None
    name = f"'{_printable(str(path))}'"
    if not str(src):
        raise ImageError("cannot read image: the path is empty; pass the path of an image file")
    try:
        fp = open(path, "rb")  # noqa: SIM115 - closed below; opening it ourselves separates I/O errors from decoding
    except FileNotFoundError:
        raise _fail(name, "no such file", "check the path") from None
    except IsADirectoryError:
        raise _fail(name, "it is a directory, not an image file", "pass the path of an image file") from None
    except PermissionError:
        raise _fail(name, "permission denied", "check the file's permissions") from None
    except OSError as err:
        raise _fail(name, f"cannot open the file ({_printable(err.strerror or type(err).__name__)})",
                    "check the path") from None
    with fp:
        try:
            info = os.fstat(fp.fileno())
        except OSError:
            raise _fail(name, "cannot stat the file", "check the path") from None
        if stat.S_ISDIR(info.st_mode):
            raise _fail(name, "it is a directory, not an image file", "pass the path of an image file")
        if not stat.S_ISREG(info.st_mode):
            raise _fail(name, "not a regular file", "pass the path of an image file")
        if info.st_size == 0:
            raise _fail(name, "file is empty (0 bytes)", _REWRITE_HINT)
        try:
            return _open_and_decode(fp, name, max_pixels)
        except OSError:  # reading the file itself failed (I/O error, file vanished)
            raise _fail(name, "the file could not be read", "check the disk and the path") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_params(
    params: Mapping[str, Any],
    *,
    source: str = "the manifest's preprocessing entry",
    error: type[AnchorError] = ArtifactError,
    fix: str = "re-export the model",
) -> dict[str, Any]:
    """Check a preprocessing params dict (the manifest's "preprocessing" entry); return a normalised copy.

    Raises `error` (ArtifactError by default; the exporter passes CheckpointError) naming the first bad key, with
    `source` saying where the params came from and `fix` what to do.
    """

    def bad(key: str, expected: str, value: Any) -> AnchorError:
        return error(f"{source}: bad '{key}': expected {expected}, got {value!r}; {fix}")

    if not isinstance(params, Mapping):
        raise error(f"{source}: expected an object, got {type(params).__name__}; {fix}")
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise error(f"{source}: missing {', '.join(missing)}; {fix}")
    unknown = sorted(str(k) for k in params if k not in PARAM_KEYS + OPTIONAL_PARAM_KEYS)
    if unknown:
        raise error(f"{source}: unknown keys {', '.join(unknown)} (written by a newer AnchorRT?); {fix}")
    out: dict[str, Any] = {}
    for key in ("do_convert_rgb", "do_pad", "do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if not isinstance(params[key], bool):
            raise bad(key, "true or false", params[key])
        out[key] = params[key]
    edge = params["shortest_edge"]
    if not _is_int(edge) or not 0 < edge <= MAX_PREPROCESS_SIDE:
        raise bad("shortest_edge", f"a positive integer up to {MAX_PREPROCESS_SIDE}", edge)
    out["shortest_edge"] = edge
    resample = params["resample"]
    if not _is_int(resample) or not 0 <= resample <= 5:
        raise bad("resample", "a PIL resampling code 0-5 (3 = bicubic)", resample)
    out["resample"] = resample
    crop = params["crop_size"]
    if not isinstance(crop, (list, tuple)) or len(crop) != 2 or \
            not all(_is_int(c) and 0 < c <= MAX_PREPROCESS_SIDE for c in crop):
        raise bad("crop_size", f"[height, width] as positive integers up to {MAX_PREPROCESS_SIDE}", crop)
    out["crop_size"] = [crop[0], crop[1]]
    if "resize_exact" in params:
        size = params["resize_exact"]
        if not isinstance(size, (list, tuple)) or len(size) != 2 or \
                not all(_is_int(c) and 0 < c <= MAX_PREPROCESS_SIDE for c in size):
            raise bad("resize_exact", f"[height, width] as positive integers up to {MAX_PREPROCESS_SIDE}", size)
        out["resize_exact"] = [size[0], size[1]]
    factor = params["rescale_factor"]
    if not _is_real(factor) or factor <= 0:
        raise bad("rescale_factor", "a positive number", factor)
    out["rescale_factor"] = float(factor)
    for key in ("image_mean", "image_std"):
        vals = params[key]
        if not isinstance(vals, (list, tuple)) or len(vals) != 3 or not all(_is_real(v) for v in vals):
            raise bad(key, "3 finite numbers", vals)
        if key == "image_std" and not all(v > 0 for v in vals):
            raise bad(key, "3 positive numbers", vals)
        out[key] = [float(v) for v in vals]
    if out["do_pad"] and not all(0 <= int(m * 255) <= 255 for m in out["image_mean"]):
        # the pad colour is int(mean * 255) per channel, which must be a uint8
        raise bad("image_mean", "values in [0, 1] when do_pad is true", out["image_mean"])
    return out


class ImagePreprocessor:
    """Turn PIL images into `pixel_values`, float32 [N, 3, H, W], as transformers' CLIP/LLaVA PIL processors do."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = validate_params(params)
        p = self.params
        self._mean = np.asarray(p["image_mean"], dtype=np.float32)[:, None, None]
        self._std = np.asarray(p["image_std"], dtype=np.float32)[:, None, None]
        self._pad_colour = tuple(int(m * 255) for m in p["image_mean"])

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image, or None when it depends on the input (no centre crop)."""
        if self.params["do_center_crop"]:
            return self.params["crop_size"][0], self.params["crop_size"][1]
        return None

    def __call__(self, images: Sequence[Image.Image] | Image.Image) -> np.ndarray:
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, Sequence) or len(images) == 0:
            raise ImageError("no images to preprocess: expected a non-empty list of PIL images; pass at least one")
        arrays = [self.preprocess_one(img, index=i) for i, img in enumerate(images)]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ImageError(f"images have different sizes after preprocessing ({sorted(shapes)}) and this model "
                             "does not centre-crop; pass one image at a time or images of equal size")
        return np.stack(arrays).astype(np.float32, copy=False)

    def preprocess_one(self, image: Image.Image, index: int = 0) -> np.ndarray:
        """One image -> float32 [3, H, W]."""
        name = f"#{index}"
        if not isinstance(image, Image.Image):
            raise ImageError(f"image {name} is a {type(image).__name__}, not a PIL image; load it with load_image()")
        p = self.params
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(f"image {name} has zero width or height ({width}x{height}); pass a non-empty image")
        try:
            if p["do_convert_rgb"]:
                image = convert_to_rgb(image)
            elif image.mode != "RGB":
                raise ImageError(f"image {name} has mode {image.mode} and this model's preprocessing does not convert "
                                 "to RGB (do_convert_rgb is false); convert it with load_image() first")
            pixels = np.asarray(image, dtype=np.uint8)
        except ImageError:
            raise
        except Exception:  # noqa: BLE001 - a lazily opened image can fail to decode here; no Pillow error escapes
            raise ImageError(f"image {name} cannot be decoded or converted to RGB (mode {image.mode}); "
                             "load it with load_image() to see why") from None
        if p["do_pad"]:
            pixels = self._pad_to_square(pixels)
        if p["do_resize"] and "resize_exact" in p:  # BLIP: straight to [height, width]
            pixels = _resize_exact(pixels, image if not p["do_pad"] else None, p["resize_exact"], p["resample"])
        elif p["do_resize"]:
            pixels = self._resize(pixels, image if not p["do_pad"] else None, name)
        if p["do_center_crop"]:
            pixels = _center_crop(pixels, *p["crop_size"])
        chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        out: np.ndarray
        if p["do_rescale"]:
            # float64 multiply then float32, as transformers' rescale does, so the rounding matches
            out = (chw.astype(np.float64) * p["rescale_factor"]).astype(np.float32)
        else:
            out = chw.astype(np.float32)
        if p["do_normalize"]:
            out = (out - self._mean) / self._std
        return out

    def _pad_to_square(self, pixels: np.ndarray) -> np.ndarray:
        height, width = pixels.shape[:2]
        if height == width:
            return pixels
        side = max(height, width)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[...] = np.asarray(self._pad_colour, dtype=np.uint8)
        top, left = (side - height) // 2, (side - width) // 2
        square[top:top + height, left:left + width] = pixels
        return square

    def _resize(self, pixels: np.ndarray, rgb: Image.Image | None, name: str) -> np.ndarray:
        height, width = pixels.shape[:2]
        edge = self.params["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        new_h, new_w = (new_long, edge) if width <= height else (edge, new_long)
        if new_h * new_w > MAX_RESIZED_PIXELS:
            raise ImageError(f"image {name} ({width}x{height}) has too extreme an aspect ratio: resizing its short "
                             f"side to {edge} would make it {new_w}x{new_h}; crop it closer to square")
        source = rgb if rgb is not None else Image.fromarray(pixels)
        try:
            resized = source.resize((new_w, new_h), resample=self.params["resample"])
        except MemoryError:
            raise ImageError(f"image {name}: not enough memory to resize it to {new_w}x{new_h}; downscale it") from None
        return np.asarray(resized, dtype=np.uint8)


def _resize_exact(pixels: np.ndarray, rgb: Image.Image | None, size: Sequence[int], resample: int) -> np.ndarray:
    """Resize the uint8 RGB pixels to `size` = [height, width] with Pillow, as transformers' PIL backend does for
    BLIP's `size: {"height", "width"}` (no aspect ratio kept, no crop)."""
    source = rgb if rgb is not None else Image.fromarray(pixels)
    return np.asarray(source.resize((size[1], size[0]), resample=resample), dtype=np.uint8)


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Centre crop, zero-padding an axis that is shorter than the crop (image placed at ceil of half the gap)."""
    height, width = pixels.shape[:2]
    if height >= crop_h and width >= crop_w:
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return pixels[top:top + crop_h, left:left + crop_w]
    out = np.zeros((crop_h, crop_w, pixels.shape[2]), dtype=pixels.dtype)
    src_top, dst_top, rows = _axis(height, crop_h)
    src_left, dst_left, cols = _axis(width, crop_w)
    out[dst_top:dst_top + rows, dst_left:dst_left + cols] = pixels[src_top:src_top + rows, src_left:src_left + cols]
    return out


def _axis(size: int, crop: int) -> tuple[int, int, int]:
    """(source offset, destination offset, length) along one axis of a centre crop."""
    if size >= crop:
        return (size - crop) // 2, 0, crop
    return 0, (crop - size + 1) // 2, size
