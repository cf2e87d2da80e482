"""Qwen2-VL's numpy preprocessing and grid arithmetic against transformers (no export: fast).

- pixel values and grids bit-identical to transformers' Qwen2-VL image processor (the PIL backend, what
  `AutoImageProcessor` gives without torchvision) at image sizes below min_pixels, above max_pixels, odd aspect
  ratios, RGBA and greyscale inputs;
- smart_resize equal to transformers' on a sweep of sizes; the 200:1 refusal;
- vision position ids, window index / cu_window_seqlens equal to transformers' `vision_utils`;
- M-RoPE positions equal to transformers' `get_rope_index` with left padding and two image sizes in one batch;
- the exporter's vision module (fed ids instead of cu_seqlens) equals transformers' vision tower, Qwen2-VL and
  Qwen2.5-VL (windowed), on images of different grids in one call;
- the config reader's defaults and refusals.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from anchorrt.exporter.preprocessing_qwen2_vl import params_from_config, qwen2_vl_preprocessing_params
from anchorrt.runtime.archs.qwen2_vl import rope_index, vision_feeds, vision_position_ids, window_index
from anchorrt.runtime.errors import ArtifactError, CheckpointError, ImageError
from anchorrt.runtime.preprocess_qwen2_vl import Qwen2VLPreprocessor, smart_resize, validate_qwen2_vl_params
from PIL import Image

CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16,
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen-pre")
    (path / "preprocessor_config.json").write_text(json.dumps(CONFIG))
    return path


def _images():
    rng = np.random.default_rng(3)
    sizes = [(56, 56), (30, 40), (90, 141), (480, 640), (28, 300), (113, 57)]
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    out.append(Image.fromarray(rng.integers(0, 256, (70, 70, 4), dtype=np.uint8), "RGBA"))
    out.append(Image.fromarray(rng.integers(0, 256, (64, 100), dtype=np.uint8), "L"))
    return out


def test_pixels_and_grids_bit_identical_to_transformers(processor_dir):
    from transformers import AutoImageProcessor

    hf = AutoImageProcessor.from_pretrained(processor_dir)
    ours = Qwen2VLPreprocessor(qwen2_vl_preprocessing_params(processor_dir))
    grids = set()
    for image in _images():
        ref = hf(images=[image], return_tensors="np")
        pixels, (grid,) = ours([image])
        assert pixels.dtype == np.float32 and pixels.shape == ref["pixel_values"].shape
        assert np.array_equal(pixels, ref["pixel_values"]), image.size
        assert [list(grid)] == ref["image_grid_thw"].tolist()
        grids.add(grid)
    assert len(grids) >= 4  # the sizes exercise min_pixels, max_pixels and plain rounding


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for h in (1, 13, 28, 41, 55, 56, 100, 333, 1000, 4000):
        for w in (7, 28, 99, 256, 1024):
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(ImageError, match="200"):
                    smart_resize(h, w, 28, 3136, 1003520)
                continue
            for lo, hi in ((3136, 1003520), (3136, 12544), (100 * 100, 200 * 200)):
                assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_vision_grid_helpers_match_transformers():
    import torch
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    grids = [(1, 4, 6), (1, 8, 12), (1, 2, 14), (2, 6, 4)]
    ref = get_vision_position_ids(torch.tensor(grids), 2)
    assert np.array_equal(vision_position_ids(grids, 2), ref.numpy())
    for window in (56, 112):
        order, cu = window_index(grids, 2, window, 14)
        ref_order, ref_cu = get_vision_window_index(torch.tensor(grids), 2, window, 14)
        assert np.array_equal(order, ref_order.numpy()) and np.array_equal(cu, ref_cu.numpy().astype(np.int64))


def test_rope_index_matches_transformers_with_left_padding():
    import torch
    import transformers

    config = transformers.Qwen2VLConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "intermediate_size": 32, "vocab_size": 64, "rope_scaling": {"type": "mrope",
                                                                                 "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2}, image_token_id=5)
    model = transformers.Qwen2VLModel(config)
    grids = [(1, 4, 6), (1, 8, 4)]  # 6 and 8 image tokens
    rows = [[1, 2, 3] + [5] * 6 + [7, 8], [9] + [5] * 8 + [4, 4, 4, 4]]
    s = max(map(len, rows))
    ids = np.zeros((2, s), np.int64)
    mask = np.zeros((2, s), np.int64)
    for i, r in enumerate(rows):
        ids[i, s - len(r):], mask[i, s - len(r):] = r, 1
    image_mask = ids == 5
    ref_pos, ref_delta = model.get_rope_index(torch.from_numpy(ids), torch.from_numpy(image_mask.astype(np.int64)),
                                              image_grid_thw=torch.tensor(grids), attention_mask=torch.from_numpy(mask))
    pos, delta = rope_index(image_mask, mask, [[grids[0]], [grids[1]]], 2)
    assert np.array_equal(pos, ref_pos.numpy())
    assert np.array_equal(delta, ref_delta.numpy()[:, 0])
    assert len(set(delta.tolist())) == 2  # the two image sizes give different rope deltas


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_vision_module_matches_transformers_tower(version, tmp_path):
    """The exported vision module (segment / window ids, merge order) = transformers' tower, per image segment."""
    import torch
    import transformers
    from anchorrt.exporter.archs.qwen2_vl import VisionGraph, _vision_settings
    from anchorrt.exporter.testing import TinyQwen2VLSpec

    spec = TinyQwen2VLSpec(version=version)
    vision = {"depth": 4, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_heads": 2}
    if version == "2":
        cfg = transformers.Qwen2VLVisionConfig(**vision, embed_dim=32, hidden_size=64)
        tower = transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel(cfg)
    else:
        cfg = transformers.Qwen2_5_VLVisionConfig(**vision, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                                  window_size=spec.window_size, fullatt_block_indexes=[1, 3])
        tower = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel(cfg)
    tower.eval()
    settings = _vision_settings(cfg)
    grids = [(1, 4, 6), (1, 8, 12), (1, 2, 14)]
    n = sum(t * h * w for t, h, w in grids)
    pixels = np.random.default_rng(0).standard_normal((n, 3 * 2 * 14 * 14)).astype(np.float32)
    feeds = vision_feeds(grids, settings, pixels)
    names = ["pixel_values", "vision_position_ids", "segment_ids"] + (["window_ids", "merge_order"]
                                                                      if settings["windowed"] else [])
    with torch.no_grad():
        ref = tower(torch.from_numpy(pixels), grid_thw=torch.tensor(grids)).pooler_output
        out = VisionGraph(tower, settings["windowed"], tuple(settings["fullatt_block_indexes"]))(
            *[torch.from_numpy(feeds[k]) for k in names])
    assert out.shape == ref.shape == (n // 4, 64)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


def test_config_reader_defaults_and_refusals():
    params = params_from_config({"image_processor_type": "Qwen2VLImageProcessor"})
    assert (params["min_pixels"], params["max_pixels"], params["patch_size"], params["merge_size"]) == \
        (56 * 56, 28 * 28 * 1280, 14, 2)
    sized = params_from_config({"image_processor_type": "Qwen2VLImageProcessorFast",
                                "size": {"shortest_edge": 100, "longest_edge": 200000}})
    assert (sized["min_pixels"], sized["max_pixels"]) == (100, 200000)
    with pytest.raises(CheckpointError, match="not a Qwen2-VL image processor"):
        params_from_config({"image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(CheckpointError, match="max_pixels"):
        params_from_config({"image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 10})
    with pytest.raises(ArtifactError, match="image_std"):
        validate_qwen2_vl_params({**params, "image_std": [0.0, 1.0, 1.0]})


def test_pre_load_check_config():
    """issue 13's pre-load hook: facts from config.json (flat, as the released checkpoints; or text_config), the
    image processor checked, refusals in one line."""
    from anchorrt.exporter.archs.qwen2_vl import Qwen2VLArch, Qwen25VLArch

    assert Qwen2VLArch.check_config({"num_hidden_layers": 28}, dict(CONFIG)) == {"num_layers": 28}
    assert Qwen25VLArch.check_config({"text_config": {"num_hidden_layers": 36}}, dict(CONFIG)) == {"num_layers": 36}
    assert Qwen2VLArch.check_config({}, dict(CONFIG)) == {}
    with pytest.raises(CheckpointError, match="no image-processor config"):
        Qwen2VLArch.check_config({"num_hidden_layers": 28}, None)
    with pytest.raises(CheckpointError, match="not a Qwen2-VL image processor"):
        Qwen2VLArch.check_config({"num_hidden_layers": 28}, {"image_processor_type": "SiglipImageProcessor"})
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        Qwen2VLArch.check_config({"num_hidden_layers": "28"}, dict(CONFIG))


def test_feeds_of_several_images_equal_one_call_per_image():
    """The runtime runs the vision graph image by image; attention segments make one call over several images
    equivalent (checked here on the feeds: positions and segments of a concatenation are the per-image ones)."""
    grids = [(1, 4, 6), (1, 8, 12)]
    settings = {"merge_size": 2, "patch_size": 14, "windowed": True, "window_size": 56}
    both = vision_feeds(grids, settings)
    first, second = vision_feeds(grids[:1], settings), vision_feeds(grids[1:], settings)
    assert np.array_equal(both["vision_position_ids"], np.concatenate([first["vision_position_ids"],
                                                                       second["vision_position_ids"]]))
    assert np.array_equal(both["merge_order"], np.concatenate([first["merge_order"], second["merge_order"] + 6]))
    assert len(set(both["segment_ids"][:24]) & set(both["segment_ids"][24:])) == 0
