"""Read a checkpoint's image-processor config into the runtime's preprocessing params (plain JSON, no transformers).

The params dict is stored in the artifact manifest under "preprocessing" and drives
`anchorrt.runtime.preprocess.ImagePreprocessor`. Schema:

    {"do_convert_rgb": bool, "do_pad": bool, "do_resize": bool, "shortest_edge": int, "resample": int,
     "do_center_crop": bool, "crop_size": [height, width], "do_rescale": bool, "rescale_factor": float,
     "do_normalize": bool, "image_mean": [3 floats], "image_std": [3 floats]}

Where the config lives: `preprocessor_config.json` (how llava-hf/llava-1.5-7b-hf ships it) is read first, else the
"image_processor" entry of `processor_config.json` (how transformers 5 `save_pretrained` writes it).

How fields map (a key that is absent or null takes the transformers class default, as transformers does):
- `image_processor_type` must be CLIPImageProcessor, LlavaImageProcessor or SiglipImageProcessor (or their
  Fast/Pil variants; the legacy `feature_extractor_type` CLIPFeatureExtractor is accepted too).
- SiglipImageProcessor (llava-interleave, SigLIP towers): `size` {"height": h, "width": w} resizes to exactly
  h x w (`resize_to`), no centre crop; class defaults 224 x 224, bicubic, mean = std = 0.5 (transformers'
  IMAGENET_STANDARD_MEAN/STD), as `SiglipImageProcessorPil` declares them.
- `do_pad` means LLaVA's pad-to-square only for LlavaImageProcessor. For CLIPImageProcessor transformers' `do_pad`
  pads a *batch* to its largest image after normalisation, which changes nothing for a single image or after a centre
  crop, so it maps to `do_pad: false`.
- `size`: {"shortest_edge": n} or a bare int n (transformers reads an int as the shortest edge for CLIP/LLaVA)
  -> `shortest_edge: n`. {"height": h, "width": w} squashes the image to h x w without keeping the aspect ratio,
  which the runtime implements only where it is the same thing as a shortest-edge resize: h == w after LLaVA's
  pad-to-square (a square resized to s x s either way). Anything else is a CheckpointError naming `size`.
- `crop_size`: {"height": h, "width": w}, an int n (-> n x n), or [h, w].
- `image_mean` / `image_std`: 3 numbers, or one number used for all 3 channels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anchorrt.runtime.errors import CheckpointError
from anchorrt.runtime.preprocess import validate_params

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"

CLIP_TYPES = frozenset({
    "CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor",
})
LLAVA_TYPES = frozenset({"LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil"})
SIGLIP_TYPES = frozenset({"SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil"})
LLAVA_NEXT_TYPES = frozenset({"LlavaNextImageProcessor", "LlavaNextImageProcessorFast", "LlavaNextImageProcessorPil"})
SUPPORTED_TYPES = CLIP_TYPES | LLAVA_TYPES | SIGLIP_TYPES | LLAVA_NEXT_TYPES
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # the class default

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD and the class defaults of CLIPImageProcessor / LlavaImageProcessor
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True, "do_pad": False, "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
}
_SIGLIP_DEFAULTS: dict[str, Any] = {
    **_DEFAULTS, "size": {"height": 224, "width": 224}, "do_center_crop": False, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def preprocessing_params(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the runtime preprocessing params of the Hugging Face checkpoint folder `model_dir`.

    Raises `CheckpointError` when the folder or its image-processor config is missing, unreadable, of an unsupported
    processor type, or holds a value the runtime cannot reproduce.
    """
    entry, source = image_processor_config(model_dir)
    if entry is None:
        raise CheckpointError(f"no image-processor config in '{Path(model_dir)}' (looked for {PREPROCESSOR_CONFIG} and "
                              f"{PROCESSOR_CONFIG}); save the processor with processor.save_pretrained(folder)")
    return params_from_config(entry, source)


def image_processor_config(model_dir: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, str]:
    """The raw image-processor config of a checkpoint folder and where it came from: `preprocessor_config.json`,
    else the "image_processor" entry of `processor_config.json`; (None, folder) when neither file exists. Plain
    JSON, no transformers: the exporter's pre-load check (exporter/registry.py `check_config`) reads it."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder '{folder}' does not exist; pass the folder of a Hugging Face "
                              "checkpoint")
    pre = folder / PREPROCESSOR_CONFIG
    if pre.is_file():
        return _read_json(pre), str(pre)
    proc = folder / PROCESSOR_CONFIG
    if proc.is_file():
        data = _read_json(proc)
        entry = data.get("image_processor")
        if not isinstance(entry, dict):
            raise CheckpointError(f"'{proc}' has no \"image_processor\" object; re-save the processor with "
                                  "transformers (processor.save_pretrained) or add a preprocessor_config.json")
        return entry, f"{proc} (image_processor)"
    return None, str(folder)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read '{path}': {err}; check the file") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{path}' is not valid JSON (line {err.lineno}: {err.msg}); fix or re-save it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' must hold a JSON object, got {type(data).__name__}; fix or re-save it")
    return data


def params_from_config(config: Mapping[str, Any], source: str = "image-processor config") -> dict[str, Any]:
    """Map one image-processor config object (the JSON dict) to the params dict; `source` names it in errors."""
    kind = config.get("image_processor_type") or config.get("feature_extractor_type")
    supported = ", ".join(sorted(SUPPORTED_TYPES))
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"{source}: image_processor_type {kind!r} is not supported; AnchorRT supports "
                              f"{supported}")
    defaults = _SIGLIP_DEFAULTS if kind in SIGLIP_TYPES else _DEFAULTS

    def get(key: str) -> Any:
        value = config.get(key)
        return defaults[key] if value is None else value

    def flag(key: str) -> bool:
        value = get(key)
        if not isinstance(value, bool):
            raise CheckpointError(f"{source}: '{key}' must be true or false, got {value!r}; fix the config")
        return value

    do_pad = flag("do_pad") if kind in LLAVA_TYPES else False
    do_resize = flag("do_resize")
    if kind in SIGLIP_TYPES:
        return _siglip_params(get, flag, do_resize, source)
    if kind in LLAVA_NEXT_TYPES:
        return _llava_next_params(config, get, flag, source)
    params: dict[str, Any] = {
        "do_convert_rgb": flag("do_convert_rgb"),
        "do_pad": do_pad,
        "do_resize": do_resize,
        "shortest_edge": _shortest_edge(get("size"), do_pad, do_resize, source),
        "resample": _int(get("resample"), "resample", source),
        "do_center_crop": flag("do_center_crop"),
        "crop_size": _crop_size(get("crop_size"), source),
        "do_rescale": flag("do_rescale"),
        "rescale_factor": _number(get("rescale_factor"), "rescale_factor", source),
        "do_normalize": flag("do_normalize"),
        "image_mean": _triple(get("image_mean"), "image_mean", source),
        "image_std": _triple(get("image_std"), "image_std", source),
    }
    # the runtime's own checks (positive sizes, std > 0, resample code...), reported against the config
    return validate_params(params, source=source, error=CheckpointError, fix="fix the config")


def _llava_next_params(config: Mapping[str, Any], get, flag, source: str) -> dict[str, Any]:
    """LlavaNextImageProcessor: per tile the CLIP steps (shortest-edge resize and centre crop, identities on a
    tile of crop size), plus `image_grid_pinpoints` and the base image's `base_size` for the runtime's tiling
    (runtime/archs/llava_next.py). Its `do_pad` pads a batch's tile counts, which the runtime does not need."""
    size, crop = get("size"), _crop_size(get("crop_size"), source)
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        base = [_int(size["height"], "size.height", source), _int(size["width"], "size.width", source)]
        edge = min(base)
    else:
        edge = _shortest_edge(size, False, True, source)
        base = [edge, edge]
    if not (flag("do_resize") and flag("do_center_crop")) or crop[0] != crop[1] or base != crop or edge != crop[0]:
        raise CheckpointError(f"{source}: LLaVA-NeXT tiling is supported with square tiles (size = crop_size, "
                              f"do_resize and do_center_crop true), got size {size!r}, crop_size {crop}; "
                              "use the checkpoint's original processor config")
    pins = config.get("image_grid_pinpoints") or _NEXT_PINPOINTS
    if not isinstance(pins, list) or not pins or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and v > 0 and v % crop[0] == 0 for v in p)
            for p in pins):
        raise CheckpointError(f"{source}: 'image_grid_pinpoints' must be [height, width] pairs, multiples of the tile "
                              f"size {crop[0]}, got {pins!r}; fix the config")
    params: dict[str, Any] = {
        "do_convert_rgb": flag("do_convert_rgb"), "do_pad": False, "do_resize": True, "shortest_edge": edge,
        "resample": _int(get("resample"), "resample", source), "do_center_crop": True, "crop_size": crop,
        "do_rescale": flag("do_rescale"), "rescale_factor": _number(get("rescale_factor"), "rescale_factor", source),
        "do_normalize": flag("do_normalize"), "image_mean": _triple(get("image_mean"), "image_mean", source),
        "image_std": _triple(get("image_std"), "image_std", source),
    }
    out = validate_params(params, source=source, error=CheckpointError, fix="fix the config")
    out["image_grid_pinpoints"] = [list(p) for p in pins]  # read by exporter/archs/llava_next.py into the manifest
    return out


def _siglip_params(get, flag, do_resize: bool, source: str) -> dict[str, Any]:
    size = get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or set(size) != {"height", "width"}:
        raise CheckpointError(f"{source}: 'size' {size!r} is not supported for SiglipImageProcessor; use "
                              "{\"height\": h, \"width\": w}")
    height, width = _int(size["height"], "size.height", source), _int(size["width"], "size.width", source)
    if flag("do_center_crop"):
        raise CheckpointError(f"{source}: do_center_crop is not supported for SiglipImageProcessor (the class has "
                              "no crop); set it to false")
    params: dict[str, Any] = {
        "do_convert_rgb": flag("do_convert_rgb"), "do_pad": False, "do_resize": do_resize,
        "shortest_edge": min(height, width), "resample": _int(get("resample"), "resample", source),
        "do_center_crop": False, "crop_size": [height, width], "do_rescale": flag("do_rescale"),
        "rescale_factor": _number(get("rescale_factor"), "rescale_factor", source),
        "do_normalize": flag("do_normalize"), "image_mean": _triple(get("image_mean"), "image_mean", source),
        "image_std": _triple(get("image_std"), "image_std", source), "resize_to": [height, width],
    }
    return validate_params(params, source=source, error=CheckpointError, fix="fix the config")


def _int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{source}: '{key}' must be an integer, got {value!r}; fix the config")
    return value


def _number(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{source}: '{key}' must be a number, got {value!r}; fix the config")
    return float(value)


def _triple(value: Any, key: str, source: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * 3
    if not isinstance(value, list) or len(value) != 3:
        raise CheckpointError(f"{source}: '{key}' must be 3 numbers (one per RGB channel), got {value!r}; "
                              "fix the config")
    return [_number(v, key, source) for v in value]


def _shortest_edge(size: Any, do_pad: bool, do_resize: bool, source: str) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, dict):
        keys = set(size)
        if keys == {"shortest_edge"}:
            return _int(size["shortest_edge"], "size.shortest_edge", source)
        if keys == {"height", "width"}:
            height = _int(size["height"], "size.height", source)
            width = _int(size["width"], "size.width", source)
            if not do_resize:  # never used
                return min(height, width)
            if height == width and do_pad:
                return height
            raise CheckpointError(
                f"{source}: 'size' {size} resizes without keeping the aspect ratio, which the AnchorRT runtime does "
                "not implement (only {\"shortest_edge\": n}, or a square height/width after LLaVA's do_pad); "
                "use the size the model was trained with as {\"shortest_edge\": n}")
    raise CheckpointError(f"{source}: 'size' {size!r} is not supported; use {{\"shortest_edge\": n}}")


def _crop_size(crop: Any, source: str) -> list[int]:
    if isinstance(crop, int) and not isinstance(crop, bool):
        return [crop, crop]
    if isinstance(crop, dict) and set(crop) == {"height", "width"}:
        return [_int(crop["height"], "crop_size.height", source), _int(crop["width"], "crop_size.width", source)]
    if isinstance(crop, list) and len(crop) == 2:
        return [_int(crop[0], "crop_size[0]", source), _int(crop[1], "crop_size[1]", source)]
    raise CheckpointError(f"{source}: 'crop_size' {crop!r} is not supported; use {{\"height\": h, \"width\": w}} "
                          "or an integer")
