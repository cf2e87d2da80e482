"""Fuzz the image loader for a fixed time: mutated PNG, JPEG, GIF (animated), APNG, BMP, WEBP (animated) and TIFF
files go through `anchorrt.runtime.preprocess.load_image` and the model's preprocessing.

    python scripts/fuzz_images.py --seconds 60                # exit 1 if any input crashed
    python scripts/fuzz_images.py --seconds 20 --crashes fuzz-crashes/

Every input must give an upright RGB image that preprocesses to finite numbers, or a one-line `ImageError`;
anything else (another exception type, a multi-line message, a non-RGB result, NaN pixels) is a crash. Crashing
inputs are written to --crashes (if given) so that each can become a regression test. Mutations (hypothesis
strategies): byte flips, insertions, deletions, truncation, and header width/height fields patched to huge or zero
values (decompression bombs). The examples come from hypothesis, in rounds of a few hundred until time is up.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

# The tiny test model's preprocessing (CLIP-style, 32 px): cheap, and every step of the real pipeline runs.
PARAMS = {
    "do_convert_rgb": True, "do_pad": False, "do_resize": True, "shortest_edge": 32, "resample": 3,
    "do_center_crop": True, "crop_size": [32, 32], "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def seed_files() -> dict[str, bytes]:
    """Small valid files of every supported format, some animated, some with EXIF orientation or transparency."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8), "RGBA")
    frames = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(3)]
    out = {}

    def save(name, image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    save("png", rgb, "PNG")
    save("png-rgba", rgba, "PNG")
    save("png-palette", rgb.convert("P"), "PNG")
    save("jpeg", rgb, "JPEG", quality=90)
    save("jpeg-exif", rgb, "JPEG", exif=exif)
    save("jpeg-progressive", rgb, "JPEG", progressive=True)
    save("gif-animated", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    save("apng", frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)
    save("bmp", rgb, "BMP")
    save("webp", rgb, "WEBP", quality=80)
    save("webp-animated", frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)
    save("tiff", rgb, "TIFF")
    save("tiff-multipage", frames[0], "TIFF", save_all=True, append_images=frames[1:])
    return out


SEEDS = seed_files()
SEED_NAMES = sorted(SEEDS)


def patch_size(data: bytes, name: str, width: int, height: int) -> bytes:
    """Write width/height into the header fields of PNG (IHDR), GIF (screen and first image) and BMP."""
    b = bytearray(data)
    try:
        if name.startswith(("png", "apng")) and len(b) >= 24:
            b[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        elif name.startswith("gif") and len(b) >= 10:
            b[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
        elif name == "bmp" and len(b) >= 26:
            b[18:26] = struct.pack("<ii", max(-2**31, min(width, 2**31 - 1)), max(-2**31, min(height, 2**31 - 1)))
    except struct.error:
        pass
    return bytes(b)


@st.composite
def mutated_images(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(SEED_NAMES))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "size", "splice"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 16))]
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "size":
            side = st.one_of(st.sampled_from([0, 1, 65535, 2**31 - 1, 2**32 - 1, 100_000]), st.integers(0, 2**32 - 1))
            data = bytearray(patch_size(bytes(data), name, draw(side), draw(side)))
        elif kind == "splice":
            other = SEEDS[draw(st.sampled_from(SEED_NAMES))]
            i = draw(st.integers(0, len(data)))
            data[i:] = other[draw(st.integers(0, len(other))):]
    return name, bytes(data)


def check_one(data: bytes, preprocess) -> str | None:
    """None when the loader behaved (an RGB image or a one-line ImageError); else a description of the crash."""
    from anchorrt.runtime.errors import ImageError
    from anchorrt.runtime.preprocess import load_image

    try:
        image = load_image(data, max_pixels=4_000_000)
        if image.mode != "RGB" or min(image.size) <= 0:
            return f"load_image returned mode {image.mode} size {image.size}"
        pixels = preprocess([image])
        if pixels.shape != (1, 3, 32, 32) or not np.isfinite(pixels).all():
            return f"preprocess returned shape {pixels.shape} or non-finite values"
    except ImageError as exc:
        if "\n" in str(exc) or not str(exc):
            return f"ImageError message is not one line: {str(exc)!r}"
    except Exception as exc:  # noqa: BLE001 - any other exception is what the fuzzer looks for
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def fuzz(seconds: float, crashes_dir: Path | None = None, seed: int | None = None) -> dict:
    """Run for `seconds`; -> {"tried", "crashes", "by_seed": {name: count}, "first_crash"}."""
    from anchorrt.runtime.preprocess import ImagePreprocessor

    preprocess = ImagePreprocessor(PARAMS)
    stats = {"tried": 0, "crashes": 0, "by_seed": {}, "first_crash": None}
    deadline = time.monotonic() + seconds

    @settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=seed is not None)
    @given(mutated_images())
    def one(example):
        if time.monotonic() > deadline:
            return
        name, data = example
        stats["tried"] += 1
        stats["by_seed"][name] = stats["by_seed"].get(name, 0) + 1
        problem = check_one(data, preprocess)
        if problem is not None:
            stats["crashes"] += 1
            stats["first_crash"] = stats["first_crash"] or f"{name}: {problem}"
            if crashes_dir is not None:
                crashes_dir.mkdir(parents=True, exist_ok=True)
                (crashes_dir / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.bin").write_bytes(data)

    while time.monotonic() < deadline:
        one()
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--crashes", type=Path, default=None, help="folder for crashing inputs")
    args = ap.parse_args(argv)
    r = fuzz(args.seconds, args.crashes)
    print(f"fuzz_images: {r['tried']} inputs in {args.seconds:g} s from {len(SEEDS)} seed files, "
          f"{r['crashes']} crashes" + (f" (first: {r['first_crash']})" if r["crashes"] else ""))
    return 1 if r["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
