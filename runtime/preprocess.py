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
   (offset `(side - edge) // 2`) on a square filled with `int(m * 255)` for each channel mean `m`. The square's
   side x side is checked against the pixel limit before it is allocated (as is the resize target).
3. Resize with Pillow on uint8 RGB so that the short side equals `shortest_edge`; the long side is
   `int(shortest_edge * long / short)`, i.e. truncated, not rounded. With the optional `resize_to` [h, w]
   (SigLIP's `SiglipImageProcessorPil`, `size` {"height", "width"}) the image is resized to exactly h x w
   instead, aspect ratio not kept, and there is no centre crop.
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
from anchorrt.runtime.errors import AnchorError, ArtifactError, ImageError
from PIL import Image, ImageOps, UnidentifiedImageError

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

MAX_RESIZED_PIXELS = MAX_PIXELS
"""Default bound on every intermediate image inside `ImagePreprocessor` (the padded square, the resize target);
`ImagePreprocessor(..., max_pixels=N)` (the pipeline passes its `max_image_pixels`) or ANCHORRT_MAX_IMAGE_PIXELS
replace it. An extreme aspect ratio would otherwise ask for gigabytes: a 1 x 70000 image pads to a 70000 x 70000
square (14.7 GB of RGB) and a resize of its short side to 336 gives 336 x 23.5 M pixels. Each size is computed and
checked before anything is allocated, so for a model that pads to a square (LLaVA's `do_pad`) the limit applies to
the padded square, side * side, not to the image as decoded."""

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image

PARAM_KEYS = (
    "do_convert_rgb", "do_pad", "do_resize", "shortest_edge", "resample", "do_center_crop", "crop_size",
    "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
)

OPTIONAL_PARAM_KEYS = ("resize_to", "image_grid_pinpoints")
# resize_to [height, width]: resize to exactly this size (SigLIP), else shortest_edge. image_grid_pinpoints: LLaVA-NeXT's
# tiling resolutions, used by runtime/archs/llava_next.py (each tile then goes through the steps above).

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


def _is_video(head: bytes) -> bool:
    """MP4/MOV (ISO base media `ftyp` box), WebM/MKV (EBML), AVI: named so that a video gets a clear refusal."""
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")


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
        if _is_video(head):
            raise _fail(name, "it is a video, and video input is not supported (still images only)",
                        "extract frames and pass them as images") from None
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
    # stat before open: opening a FIFO blocks until a writer appears (for ever), and a device or socket is no image.
    # The O_NONBLOCK open plus fstat below closes the race of the path being swapped between the two.
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise _fail(name, "no such file", "check the path") from None
    except PermissionError:
        raise _fail(name, "permission denied", "check the file's permissions") from None
    except (OSError, ValueError) as err:  # ValueError: an embedded NUL byte
        raise _fail(name, f"cannot stat the file ({_printable(getattr(err, 'strerror', None) or type(err).__name__)})",
                    "check the path") from None
    _check_regular(info, name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _fail(name, "no such file", "check the path") from None
    except IsADirectoryError:
        raise _fail(name, "it is a directory, not an image file", "pass the path of an image file") from None
    except PermissionError:
        raise _fail(name, "permission denied", "check the file's permissions") from None
    except OSError as err:
        raise _fail(name, f"cannot open the file ({_printable(err.strerror or type(err).__name__)})",
                    "check the path") from None
    with open(fd, "rb") as fp:  # O_NONBLOCK has no effect on reads of a regular file
        try:
            info = os.fstat(fp.fileno())
        except OSError:
            raise _fail(name, "cannot stat the file", "check the path") from None
        _check_regular(info, name)
        if info.st_size == 0:
            raise _fail(name, "file is empty (0 bytes)", _REWRITE_HINT)
        try:
            return _open_and_decode(fp, name, max_pixels)
        except OSError:  # reading the file itself failed (I/O error, file vanished)
            raise _fail(name, "the file could not be read", "check the disk and the path") from None


def _check_regular(info: os.stat_result, name: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise _fail(name, "it is a directory, not an image file", "pass the path of an image file")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "a special file")
        raise _fail(name, f"it is {kind}, not a regular file", "pass the path of an image file")


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
    if params.get("resize_to") is not None:
        size = params["resize_to"]
        if not isinstance(size, (list, tuple)) or len(size) != 2 or \
                not all(_is_int(c) and 0 < c <= MAX_PREPROCESS_SIDE for c in size):
            raise bad("resize_to", f"[height, width] as positive integers up to {MAX_PREPROCESS_SIDE}", size)
        out["resize_to"] = [size[0], size[1]]
    if params.get("image_grid_pinpoints") is not None:
        pins = params["image_grid_pinpoints"]
        if not isinstance(pins, (list, tuple)) or not 0 < len(pins) <= 64 or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(c) and 0 < c <= MAX_PREPROCESS_SIDE
                                                                     for c in p) for p in pins):
            raise bad("image_grid_pinpoints", f"up to 64 [height, width] pairs up to {MAX_PREPROCESS_SIDE}", pins)
        out["image_grid_pinpoints"] = [[p[0], p[1]] for p in pins]
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

    def __init__(self, params: Mapping[str, Any], max_pixels: int | None = None) -> None:
        """`max_pixels` bounds every intermediate image (input, padded square, resize target) by width * height;
        None: `default_max_pixels()` at each call (MAX_PIXELS unless ANCHORRT_MAX_IMAGE_PIXELS is set)."""
        self.params = validate_params(params)
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels <= 0):
            raise ImageError(f"max_pixels must be a positive integer, got {max_pixels!r}; pass e.g. {MAX_PIXELS}")
        self.max_pixels = max_pixels
        p = self.params
        self._mean = np.asarray(p["image_mean"], dtype=np.float32)[:, None, None]
        self._std = np.asarray(p["image_std"], dtype=np.float32)[:, None, None]
        self._pad_colour = tuple(int(m * 255) for m in p["image_mean"])

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image, or None when it depends on the input (no centre crop)."""
        if self.params["do_center_crop"]:
            return self.params["crop_size"][0], self.params["crop_size"][1]
        if self.params["do_resize"] and self.params.get("resize_to"):
            return self.params["resize_to"][0], self.params["resize_to"][1]
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
        """One image -> float32 [3, H, W].

        Every intermediate size (the input, the padded square, the resize target) is computed and checked against
        the pixel limit before it is allocated: a 1 x 70000 image on a model that pads to a square is refused in
        microseconds instead of asking for a 70000 x 70000 array.
        """
        name = f"#{index}"
        if not isinstance(image, Image.Image):
            raise ImageError(f"image {name} is a {type(image).__name__}, not a PIL image; load it with load_image()")
        p = self.params
        limit = self.max_pixels if self.max_pixels is not None else default_max_pixels()
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(f"image {name} has zero width or height ({width}x{height}); pass a non-empty image")
        self._check_size(name, width, height, limit, "it is")
        if p["do_pad"] and width != height:
            side = max(width, height)
            self._check_size(name, side, side, limit, "padding it to a square would make it")
        try:
            if p["do_convert_rgb"]:
                image = convert_to_rgb(image)
            elif image.mode != "RGB":
                raise ImageError(f"image {name} has mode {image.mode} and this model's preprocessing does not convert "
                                 "to RGB (do_convert_rgb is false); convert it with load_image() first")
            if p["do_pad"]:
                image = self._pad_to_square(image)
            if p["do_resize"]:
                image = self._resize(image, name, limit)
            pixels = np.asarray(image, dtype=np.uint8)
        except ImageError:
            raise
        except MemoryError:
            raise ImageError(f"image {name} ({width}x{height}): not enough memory to preprocess it; "
                             "downscale it") from None
        except Exception:  # noqa: BLE001 - a lazily opened image can fail to decode here; no Pillow error escapes
            raise ImageError(f"image {name} cannot be decoded or converted to RGB (mode {image.mode}); "
                             "load it with load_image() to see why") from None
        if p["do_center_crop"]:
            pixels = _center_crop(pixels, *p["crop_size"])
        chw = pixels.transpose(2, 0, 1)
        out = np.empty(chw.shape, dtype=np.float32)
        for c in range(chw.shape[0]):  # one channel at a time bounds the float64 temporary to a third
            if p["do_rescale"]:
                # float64 multiply then float32, as transformers' rescale does, so the rounding matches
                out[c] = chw[c].astype(np.float64) * p["rescale_factor"]
            else:
                out[c] = chw[c]
        if p["do_normalize"]:
            out -= self._mean
            out /= self._std
        return out

    @staticmethod
    def _check_size(name: str, width: int, height: int, limit: int, what: str) -> None:
        if width * height > limit:
            raise ImageError(f"image {name}: {what} {width}x{height} = {width * height} pixels, over the limit of "
                             f"{limit}; crop it closer to square or downscale it (or raise max_pixels / "
                             f"{MAX_PIXELS_ENV})")

    def _pad_to_square(self, image: Image.Image) -> Image.Image:
        """LLaVA's expand2square on the uint8 RGB pixels: centred at `(side - edge) // 2` on the mean colour.
        Pillow's paste copies pixels unchanged, so this equals padding the numpy array (one allocation, not two)."""
        width, height = image.size
        if height == width:
            return image
        side = max(height, width)
        square = Image.new("RGB", (side, side), self._pad_colour)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        return square

    def _resize(self, image: Image.Image, name: str, limit: int) -> Image.Image:
        width, height = image.size
        edge = self.params["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        new_h, new_w = (new_long, edge) if width <= height else (edge, new_long)
        if self.params.get("resize_to"):
            new_h, new_w = self.params["resize_to"]
        if new_h * new_w > limit:
            raise ImageError(f"image {name} ({width}x{height}) has too extreme an aspect ratio: resizing its short "
                             f"side to {edge} would make it {new_w}x{new_h} = {new_w * new_h} pixels, over the limit "
                             f"of {limit}; crop it closer to square")
        try:
            return image.resize((new_w, new_h), resample=self.params["resample"])
        except MemoryError:
            raise ImageError(f"image {name}: not enough memory to resize it to {new_w}x{new_h}; downscale it") from None


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
