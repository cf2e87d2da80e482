"""Tests for runtime.preprocess (image loading, CLIP/LLaVA preprocessing) and exporter.preprocessing (config reading).

Parity is checked against the transformers PIL processors (`CLIPImageProcessorPil`, `LlavaImageProcessorPil`); with
torchvision absent `transformers.CLIPImageProcessor` *is* `CLIPImageProcessorPil`. The runtime repeats the same
Pillow and numpy operations with the same dtypes, so the measured difference is 0.0 on every image here; the
asserted bound is the 1e-5 the runtime promises.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from anchorrt.exporter.preprocessing import preprocessing_params
from anchorrt.runtime.errors import ArtifactError, CheckpointError, ImageError
from anchorrt.runtime.preprocess import ImagePreprocessor, convert_to_rgb, load_image, validate_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

transformers = pytest.importorskip("transformers")
HFClip = transformers.CLIPImageProcessorPil
HFLlava = transformers.LlavaImageProcessorPil

TOL = 1e-5
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def make_params(edge: int = 336, crop: int | tuple[int, int] = 336, do_pad: bool = False, **over: Any) -> dict:
    crop_hw = [crop, crop] if isinstance(crop, int) else list(crop)
    params = {
        "do_convert_rgb": True, "do_pad": do_pad, "do_resize": True, "shortest_edge": edge, "resample": 3,
        "do_center_crop": True, "crop_size": crop_hw, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }
    params.update(over)
    return params


def hf_processor(params: dict) -> Any:
    """The transformers processor built from the same params (Llava's for pad-to-square, else CLIP's)."""
    kwargs = {
        "do_convert_rgb": params["do_convert_rgb"], "do_resize": params["do_resize"],
        "size": {"shortest_edge": params["shortest_edge"]}, "resample": params["resample"],
        "do_center_crop": params["do_center_crop"],
        "crop_size": {"height": params["crop_size"][0], "width": params["crop_size"][1]},
        "do_rescale": params["do_rescale"], "rescale_factor": params["rescale_factor"],
        "do_normalize": params["do_normalize"], "image_mean": params["image_mean"], "image_std": params["image_std"],
    }
    if params["do_pad"]:
        return HFLlava(do_pad=True, **kwargs)
    return HFClip(**kwargs)


def hf_pixels(params: dict, image: Image.Image) -> np.ndarray:
    return np.asarray(hf_processor(params)(image, return_tensors="np")["pixel_values"])


def max_diff(params: dict, image: Image.Image) -> float:
    ours = ImagePreprocessor(params)([image])
    ref = hf_pixels(params, image)
    assert ours.dtype == np.float32 and ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.isfinite(ours).all()
    return float(np.abs(ours - ref.astype(np.float32)).max())


def _texture(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Gradients plus noise: smooth areas and sharp edges, so bicubic over- and undershoot gets exercised."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(w - 1, 1) + yy * 127 // max(h - 1, 1))[..., None] + rng.integers(0, 90, (h, w, c))
    return np.clip(base, 0, 255).astype(np.uint8)


def _make_images() -> dict[str, Image.Image]:
    rgba = _texture(48, 64, 4, 1)
    rgba[..., 3] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]  # from fully transparent to opaque
    p_trans = Image.fromarray(_texture(33, 45, 3, 6)).quantize(16)
    p_trans.info["transparency"] = 3
    # 16-bit grey with values up to 765: Pillow's convert("RGB") saturates them at 255, in transformers too
    i16 = Image.frombytes("I;16", (24, 20), (_texture(20, 24, 1, 8)[..., 0].astype("<u2") * 3).tobytes())
    return {
        "rgba_64x48": Image.fromarray(rgba, "RGBA"),
        "gray_L_50x70": Image.fromarray(_texture(70, 50, 1, 2)[..., 0], "L"),
        "tall_30x200": Image.fromarray(_texture(200, 30, 3, 3)),
        "wide_200x30": Image.fromarray(_texture(30, 200, 3, 4)),
        "tiny_3x2": Image.fromarray(_texture(2, 3, 3, 5)),
        "P_45x33": Image.fromarray(_texture(33, 45, 3, 6)).quantize(16),
        "P_transparency_45x33": p_trans,
        "odd_37x53": Image.fromarray(_texture(53, 37, 3, 7)),
        "LA_21x17": Image.fromarray(_texture(17, 21, 2, 9), "LA"),
        "CMYK_25x19": Image.fromarray(_texture(19, 25, 4, 10), "CMYK"),
        "I16_24x20": i16,
    }


IMAGES = _make_images()
CONFIGS = {
    "edge336_crop336": make_params(336, 336),
    "edge32_crop32": make_params(32, 32),
    "edge20_crop32_pads": make_params(20, 32),  # short side below the crop: transformers zero-pads
    "edge32_crop24x40": make_params(32, (24, 40)),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_parity_with_clip_image_processor(name: str, config: str) -> None:
    diff = max_diff(CONFIGS[config], IMAGES[name])
    assert diff <= TOL, f"{name}/{config}: max abs diff {diff}"


@pytest.mark.parametrize("edge", [336, 32])
@pytest.mark.parametrize("name", ["tall_30x200", "wide_200x30", "rgba_64x48", "tiny_3x2", "odd_37x53", "gray_L_50x70"])
def test_parity_with_llava_pad_to_square(name: str, edge: int) -> None:
    diff = max_diff(make_params(edge, edge, do_pad=True), IMAGES[name])
    assert diff <= TOL, f"{name}/pad{edge}: max abs diff {diff}"


@pytest.mark.parametrize("do_normalize", [True, False])
def test_bit_exact_where_measured_exact(do_normalize: bool) -> None:
    # The bound above is 1e-5, but the runtime is in fact bit-identical; a float32 rescale instead of transformers'
    # float64 one would still pass 1e-5 (1 ulp), so dtype/order drift is caught here with exact equality.
    params = make_params(32, 32, do_normalize=do_normalize)
    for name in ("rgba_64x48", "odd_37x53", "tall_30x200"):
        ours = ImagePreprocessor(params)([IMAGES[name]])
        assert np.array_equal(ours, hf_pixels(params, IMAGES[name])), name


def test_pad_to_square_uses_mean_colour_and_centres() -> None:
    params = make_params(4, 4, do_pad=True, do_rescale=False, do_normalize=False, resample=0)
    black = Image.new("RGB", (4, 2), (0, 0, 0))  # 4 wide, 2 high -> one padded row above and one below
    out = ImagePreprocessor(params)([black])[0]
    pad = [int(m * 255) for m in CLIP_MEAN]
    assert out[:, 0, 0].tolist() == pad and out[:, 3, 0].tolist() == pad
    assert out[:, 1:3].max() == 0


@pytest.mark.parametrize("do_resize,do_center_crop,do_rescale,do_normalize", [
    (False, True, True, True), (True, False, True, True), (True, True, False, True), (True, True, True, False),
    (False, False, False, False),
])
def test_parity_with_steps_switched_off(do_resize: bool, do_center_crop: bool, do_rescale: bool,
                                        do_normalize: bool) -> None:
    params = make_params(32, 32, do_resize=do_resize, do_center_crop=do_center_crop, do_rescale=do_rescale,
                         do_normalize=do_normalize)
    assert max_diff(params, IMAGES["odd_37x53"]) <= TOL


def test_clip_image_processor_is_the_pil_backend_without_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert transformers.CLIPImageProcessor is HFClip
    else:
        pytest.skip("torchvision installed: CLIPImageProcessor is the torchvision backend, not compared")


def test_batch_of_images_stacks() -> None:
    pre = ImagePreprocessor(make_params(32, 32))
    batch = pre([IMAGES["tall_30x200"], IMAGES["rgba_64x48"]])
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == np.float32
    assert np.array_equal(batch[1], pre([IMAGES["rgba_64x48"]])[0])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 64), height=st.integers(1, 64), mode=st.sampled_from(["RGB", "L", "RGBA"]),
    seed=st.integers(0, 2**32 - 1), config=st.sampled_from([(336, 336, False), (32, 32, False), (32, 32, True)]),
)
def test_property_random_images_match_transformers(width: int, height: int, mode: str, seed: int,
                                                  config: tuple[int, int, bool]) -> None:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    edge, crop, pad = config
    params = make_params(edge, crop, do_pad=pad)
    out = ImagePreprocessor(params)([image])
    assert out.shape == (1, 3, crop, crop) and np.isfinite(out).all()
    assert float(np.abs(out - hf_pixels(params, image)).max()) <= TOL


# ---------------------------------------------------------------------------------------------- load_image


def _encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixel data: cheap to make, tells decode from header."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _raises(src: Any, fragment: str, **kw: Any) -> ImageError:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak as a warning either
        with pytest.raises(ImageError) as info:
            load_image(src, **kw)
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message and "Traceback" not in message
    return info.value


def test_load_image_sources(tmp_path: Path) -> None:
    src = IMAGES["odd_37x53"]
    path = tmp_path / "x.png"
    src.save(path)
    for item in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), src):
        out = load_image(item)
        assert out.mode == "RGB" and out.size == (37, 53)
        assert np.array_equal(np.asarray(out), np.asarray(src))


def test_load_image_then_preprocess_matches_transformers_on_the_opened_file(tmp_path: Path) -> None:
    params = make_params(32, 32)
    for name, fmt in [("rgba_64x48", "PNG"), ("P_transparency_45x33", "GIF"), ("gray_L_50x70", "JPEG")]:
        path = tmp_path / f"{name}.{fmt.lower()}"
        IMAGES[name].save(path, fmt)
        ours = ImagePreprocessor(params)([load_image(path)])
        with Image.open(path) as opened:
            ref = hf_pixels(params, opened)
        assert float(np.abs(ours - ref).max()) <= TOL, name


@pytest.mark.parametrize("mode", sorted(n for n in IMAGES if n.split("_")[0] in {"rgba", "gray", "P", "LA", "CMYK", "I16"}))
def test_modes_convert_like_transformers(mode: str) -> None:
    image = IMAGES[mode]
    ours = np.asarray(convert_to_rgb(image))
    from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb

    ref = hf_convert_to_rgb(image, return_numpy=True)
    assert ours.dtype == np.uint8 and np.array_equal(ours, ref)
    assert np.array_equal(np.asarray(load_image(image)), ref)


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(load_image(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (40, 20, 3)  # width and height swapped
    top, bottom = out[:20].mean(axis=(0, 1)), out[20:].mean(axis=(0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left (red) half is now on top


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    out = load_image(path)
    assert out.size == (8, 6) and np.asarray(out)[0, 0].tolist() == [255, 0, 0]


def test_missing_directory_empty_and_foreign_files(tmp_path: Path) -> None:
    _raises(tmp_path / "nope.jpg", "no such file")
    _raises(tmp_path, "directory")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _raises(empty, "file is empty")
    _raises(b"", "image data is empty")
    text = tmp_path / "notes.jpg"
    text.write_text("just some text, not an image\n")
    _raises(text, "not a recognised image format")
    _raises(42, "unsupported source type 'int'")
    _raises(Image.new("RGB", (0, 5)), "zero width or height")
    err = _raises(tmp_path / "x.jpg", "cannot read image '")
    assert str(err).startswith(f"cannot read image '{tmp_path / 'x.jpg'}': no such file; ")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_truncated_files_of_each_format(tmp_path: Path, fmt: str) -> None:
    data = _encode(Image.fromarray(_texture(40, 50, 3, 11)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    err = _raises(path, f"file is truncated or corrupt ({fmt}); re-export or re-save the image")
    assert str(err).startswith(f"cannot read image '{path}': ")
    _raises(data[:12], f"truncated or corrupt ({fmt})")  # little more than the signature survived


def test_corrupt_png_data(tmp_path: Path) -> None:
    data = bytearray(_encode(Image.fromarray(_texture(40, 50, 3, 12)), "PNG"))
    data[60:90] = bytes(30)  # clobber the start of the compressed pixel data
    _raises(bytes(data), "truncated or corrupt (PNG)")


_ENCODED = {fmt: _encode(Image.fromarray(_texture(24, 30, 3, 13)), fmt) for fmt in ["PNG", "JPEG", "GIF", "WEBP", "TIFF"]}


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(sorted(_ENCODED)), data=st.data())
def test_property_damaged_files_give_image_error_or_rgb(fmt: str, data: st.DataObject) -> None:
    blob = bytearray(_ENCODED[fmt])
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    blob = blob[: data.draw(st.integers(1, len(blob)))]
    try:
        image = load_image(bytes(blob))
    except ImageError as err:
        assert "\n" not in str(err)
    else:
        assert image.mode == "RGB"


def test_pixel_limit_is_checked_before_decoding() -> None:
    # 9000 x 9000 = 81 MP: over our 64 MP default, under Pillow's own warning limit; there are no pixel data,
    # so a decode would report "truncated" instead.
    _raises(_png_header_only(9000, 9000), "image is too large (9000x9000 = 81000000 pixels, limit 64000000)")
    small = _encode(Image.new("RGB", (100, 100)), "PNG")
    _raises(small, "too large", max_pixels=9999)
    assert load_image(small, max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("side", [10_000, 100_000])  # Pillow's DecompressionBombWarning, then its Error
def test_decompression_bombs_become_image_errors(side: int) -> None:
    _raises(_png_header_only(side, side), "too large", max_pixels=10**12)


def test_bad_max_pixels() -> None:
    _raises(b"x", "max_pixels must be a positive integer", max_pixels=0)


# ---------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize("key,value,fragment", [
    ("image_std", [0.2, 0.0, 0.2], "image_std"),
    ("image_mean", [0.5, 0.5], "image_mean"),
    ("crop_size", [0, 32], "crop_size"),
    ("shortest_edge", True, "shortest_edge"),
    ("resample", 9, "resample"),
    ("do_pad", "yes", "do_pad"),
    ("rescale_factor", float("nan"), "rescale_factor"),
])
def test_bad_params_are_artifact_errors(key: str, value: Any, fragment: str) -> None:
    with pytest.raises(ArtifactError, match=fragment):
        ImagePreprocessor(make_params(**{key: value}))


def test_missing_and_unknown_params() -> None:
    params = make_params()
    del params["image_std"]
    with pytest.raises(ArtifactError, match="missing image_std"):
        ImagePreprocessor(params)
    with pytest.raises(ArtifactError, match="unknown keys extra"):
        ImagePreprocessor({**make_params(), "extra": 1})


def test_preprocessor_call_errors() -> None:
    pre = ImagePreprocessor(make_params(32, 32))
    with pytest.raises(ImageError, match="no images"):
        pre([])
    with pytest.raises(ImageError, match="not a PIL image"):
        pre([np.zeros((4, 4, 3))])  # type: ignore[list-item]
    with pytest.raises(ImageError, match="zero width or height"):
        pre([Image.new("RGB", (3, 0))])
    with pytest.raises(ImageError, match="aspect ratio"):
        pre([Image.new("RGB", (400_000, 1))])
    no_convert = ImagePreprocessor(make_params(32, 32, do_convert_rgb=False))
    with pytest.raises(ImageError, match="mode L"):
        no_convert([IMAGES["gray_L_50x70"]])


# ---------------------------------------------------------------------------------------------- exporter config

LLAVA15_PREPROCESSOR_CONFIG = {  # llava-hf/llava-1.5-7b-hf/preprocessor_config.json
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
    "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}


def _write(folder: Path, name: str, data: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data) if not isinstance(data, str) else data)
    return folder


def test_params_from_preprocessor_config(tmp_path: Path) -> None:
    params = preprocessing_params(_write(tmp_path, "preprocessor_config.json", LLAVA15_PREPROCESSOR_CONFIG))
    assert params == make_params(336, 336, rescale_factor=0.00392156862745098)
    assert json.loads(json.dumps(params)) == params
    assert validate_params(params) == params
    out = ImagePreprocessor(params)([IMAGES["wide_200x30"]])
    assert out.shape == (1, 3, 336, 336)


def test_params_from_processor_config_image_processor_entry(tmp_path: Path) -> None:
    entry = {**LLAVA15_PREPROCESSOR_CONFIG, "image_processor_type": "LlavaImageProcessor", "do_pad": True,
             "size": {"shortest_edge": 32}, "crop_size": 32}
    params = preprocessing_params(_write(tmp_path, "processor_config.json",
                                         {"image_processor": entry, "processor_class": "LlavaProcessor"}))
    assert params["do_pad"] is True and params["shortest_edge"] == 32 and params["crop_size"] == [32, 32]
    assert max_diff(params, IMAGES["tall_30x200"]) <= TOL


def test_params_from_configs_saved_by_transformers(tmp_path: Path) -> None:
    clip = HFClip(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 36})
    clip.save_pretrained(tmp_path / "clip")
    params = preprocessing_params(tmp_path / "clip")
    assert params["shortest_edge"] == 40 and params["crop_size"] == [32, 36] and params["do_pad"] is False
    assert float(np.abs(ImagePreprocessor(params)([IMAGES["odd_37x53"]])
                        - np.asarray(clip(IMAGES["odd_37x53"], return_tensors="np")["pixel_values"])).max()) <= TOL
    llava = HFLlava(do_pad=True, size={"shortest_edge": 32}, crop_size=32)
    _write(tmp_path / "llava", "processor_config.json", {"image_processor": llava.to_dict()})
    params = preprocessing_params(tmp_path / "llava")
    assert params["do_pad"] is True
    assert float(np.abs(ImagePreprocessor(params)([IMAGES["wide_200x30"]])
                        - np.asarray(llava(IMAGES["wide_200x30"], return_tensors="np")["pixel_values"])).max()) <= TOL


def test_preprocessor_config_wins_over_processor_config(tmp_path: Path) -> None:
    _write(tmp_path, "processor_config.json", {"image_processor": {**LLAVA15_PREPROCESSOR_CONFIG,
                                                                   "size": {"shortest_edge": 99}}})
    _write(tmp_path, "preprocessor_config.json", LLAVA15_PREPROCESSOR_CONFIG)
    assert preprocessing_params(tmp_path)["shortest_edge"] == 336


def test_config_defaults_and_legacy_forms(tmp_path: Path) -> None:
    params = preprocessing_params(_write(tmp_path, "preprocessor_config.json", {
        "feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224, "image_mean": 0.5,
        "image_std": 0.5, "do_pad": None,
    }))
    assert params["shortest_edge"] == 224 and params["crop_size"] == [224, 224]
    assert params["image_mean"] == [0.5] * 3 and params["resample"] == 3 and params["do_pad"] is False
    assert params["rescale_factor"] == pytest.approx(1 / 255)


def test_clip_do_pad_is_not_pad_to_square(tmp_path: Path) -> None:
    # transformers' CLIPImageProcessor do_pad pads a batch to its largest image, a no-op after the centre crop
    params = preprocessing_params(_write(tmp_path, "preprocessor_config.json",
                                         {**LLAVA15_PREPROCESSOR_CONFIG, "do_pad": True}))
    assert params["do_pad"] is False


def test_height_width_size(tmp_path: Path) -> None:
    square = {"height": 336, "width": 336}
    llava = {**LLAVA15_PREPROCESSOR_CONFIG, "image_processor_type": "LlavaImageProcessorPil", "do_pad": True,
             "size": square}
    assert preprocessing_params(_write(tmp_path / "a", "preprocessor_config.json", llava))["shortest_edge"] == 336
    clip = {**LLAVA15_PREPROCESSOR_CONFIG, "size": square}
    with pytest.raises(CheckpointError, match="'size'.*aspect ratio"):
        preprocessing_params(_write(tmp_path / "b", "preprocessor_config.json", clip))
    with pytest.raises(CheckpointError, match="'size'"):
        preprocessing_params(_write(tmp_path / "c", "preprocessor_config.json",
                                    {**LLAVA15_PREPROCESSOR_CONFIG, "size": {"longest_edge": 5}}))


@pytest.mark.parametrize("name,data,fragment", [
    ("preprocessor_config.json", {**LLAVA15_PREPROCESSOR_CONFIG, "image_processor_type": "Idefics3ImageProcessor"},
     "'Idefics3ImageProcessor' is not supported; AnchorRT supports CLIPFeatureExtractor, CLIPImageProcessor"),
    ("preprocessor_config.json", {k: v for k, v in LLAVA15_PREPROCESSOR_CONFIG.items()
                                  if k != "image_processor_type"}, "None is not supported"),
    ("preprocessor_config.json", "{not json", "not valid JSON"),
    ("preprocessor_config.json", [1, 2], "must hold a JSON object"),
    ("preprocessor_config.json", {**LLAVA15_PREPROCESSOR_CONFIG, "image_std": [0.2, 0, 0.2]}, "image_std"),
    ("preprocessor_config.json", {**LLAVA15_PREPROCESSOR_CONFIG, "crop_size": {"height": 3}}, "'crop_size'"),
    ("preprocessor_config.json", {**LLAVA15_PREPROCESSOR_CONFIG, "do_resize": "true"}, "'do_resize'"),
    ("processor_config.json", {"processor_class": "LlavaProcessor"}, "no \"image_processor\" object"),
    ("tokenizer.json", {}, "no image-processor config"),
])
def test_bad_checkpoint_configs(tmp_path: Path, name: str, data: Any, fragment: str) -> None:
    with pytest.raises(CheckpointError) as info:
        preprocessing_params(_write(tmp_path, name, data))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_checkpoint_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        preprocessing_params(tmp_path / "missing")
