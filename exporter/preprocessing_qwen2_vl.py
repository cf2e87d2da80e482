"""Read a Qwen2-VL / Qwen2.5-VL image-processor config into the runtime's params (runtime/preprocess_qwen2_vl.py).

Where the config lives: `preprocessor_config.json` (how Qwen/Qwen2-VL-2B-Instruct ships it), else the
"image_processor" entry of `processor_config.json` (transformers 5 `save_pretrained`).

Field mapping (absent or null keys take the class defaults of `Qwen2VLImageProcessor`, as transformers does):
`size` {"shortest_edge": min_pixels, "longest_edge": max_pixels}, overridden by top-level `min_pixels` /
`max_pixels` when present (the released checkpoints carry both spellings); defaults 56*56 and 28*28*1280; patch 14,
temporal patch 2, merge 2, bicubic, rescale 1/255, the OpenAI CLIP mean and std.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anchorrt.exporter.preprocessing import PREPROCESSOR_CONFIG, PROCESSOR_CONFIG, _read_json, _triple
from anchorrt.runtime.errors import AnchorError, CheckpointError
from anchorrt.runtime.preprocess_qwen2_vl import validate_qwen2_vl_params

QWEN2_VL_TYPES = frozenset({"Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil"})
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD, "patch_size": 14,
    "temporal_patch_size": 2, "merge_size": 2,
}
_MIN_PIXELS, _MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def read_config(model_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    folder = Path(model_dir)
    pre = folder / PREPROCESSOR_CONFIG
    if pre.is_file():
        return _read_json(pre), str(pre)
    proc = folder / PROCESSOR_CONFIG
    if proc.is_file():
        entry = _read_json(proc).get("image_processor")
        if isinstance(entry, dict):
            return entry, f"{proc} (image_processor)"
    raise CheckpointError(f"no image-processor config in '{folder}' (looked for {PREPROCESSOR_CONFIG} and "
                          f"{PROCESSOR_CONFIG}); save the processor with processor.save_pretrained(folder)")


def qwen2_vl_preprocessing_params(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    config, source = read_config(model_dir)
    return params_from_config(config, source)


def params_from_config(config: dict[str, Any], source: str = "image-processor config") -> dict[str, Any]:
    kind = config.get("image_processor_type")
    if kind not in QWEN2_VL_TYPES:
        raise CheckpointError(f"{source}: image_processor_type {kind!r} is not a Qwen2-VL image processor; "
                              f"expected one of {', '.join(sorted(QWEN2_VL_TYPES))}")

    def get(key: str) -> Any:
        value = config.get(key)
        return _DEFAULTS[key] if value is None else value

    size = config.get("size") if isinstance(config.get("size"), dict) else {}
    min_pixels = config.get("min_pixels") if config.get("min_pixels") is not None else size.get("shortest_edge",
                                                                                                _MIN_PIXELS)
    max_pixels = config.get("max_pixels") if config.get("max_pixels") is not None else size.get("longest_edge",
                                                                                                _MAX_PIXELS)
    params = {key: get(key) for key in _DEFAULTS}
    params.update(min_pixels=min_pixels, max_pixels=max_pixels,
                  image_mean=_triple(get("image_mean"), "image_mean", source),
                  image_std=_triple(get("image_std"), "image_std", source))
    if isinstance(params["rescale_factor"], int) and not isinstance(params["rescale_factor"], bool):
        params["rescale_factor"] = float(params["rescale_factor"])
    try:
        return validate_qwen2_vl_params(params)
    except AnchorError as err:  # the runtime's checks, reported against the config
        raise CheckpointError(f"{source}: {str(err).replace('manifest preprocessing.', '')}") from None
