"""Qwen2-VL / Qwen2.5-VL in the torch-free runtime: vision-graph feeds from the patch grids, and M-RoPE positions.

Everything here is numpy and mirrors what transformers computes in Python from `image_grid_thw` (5.x:
`vision_utils.get_vision_position_ids`, `get_vision_window_index`, `get_vision_cu_seqlens`, and the models'
`get_rope_index`), so that the exported graphs (exporter/archs/qwen2_vl.py) need no data-dependent shapes:

- `vision_position_ids` [N, 2]: (row, column) of each patch, block-major over m x m merge blocks, repeated per frame.
- `segment_ids` [N]: which attention segment (image frame) a patch is in (transformers' `cu_seqlens`).
- Qwen2.5: `window_index` orders the merged tokens window by window (windows of `window_size / P / m` merged
  tokens a side, the last ones cut at the grid's edge); the patches are fed in that order, `window_ids` [N] are the
  windows (`cu_window_seqlens`), `merge_order` = argsort(window_index) restores raster order after the merger.
- `rope_index`: M-RoPE ids [3, B, S] of a prompt (text: one running index on all three axes; an image span:
  t, h, w grids of the merged tokens offset by the running index, which then advances by max(h, w)), padding
  positions 0 (left padding), and `delta` = max position + 1 - real length, so decode step k of a row is at
  real_length + k + delta on all three axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from anchorrt.runtime.archs import PromptLayout, RuntimeArch, VisualInput, _input_dtype, register_runtime
from anchorrt.runtime.errors import ArtifactError, ImageError, PromptError
from anchorrt.runtime.preprocess_qwen2_vl import Qwen2VLPreprocessor

Grid = tuple[int, int, int]  # (t, h, w) in patches


def vision_position_ids(grids: Sequence[Grid], merge: int) -> np.ndarray:
    """[N, 2] int64 (h, w) patch coordinates, block-major over merge x merge blocks, as transformers lays them out."""
    out = []
    for t, h, w in grids:
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


def segment_ids(grids: Sequence[Grid]) -> np.ndarray:
    """[N] int64: one segment per frame of each image (transformers' cu_seqlens = cumsum of h*w repeated t times)."""
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    return np.repeat(np.arange(len(lengths)), lengths).astype(np.int64)


def window_index(grids: Sequence[Grid], merge: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(window_index [N/m²], cu_window_seqlens) exactly as transformers' `get_vision_window_index`: each image's
    merged-token grid padded up to whole windows (by a whole extra window when already a multiple, as transformers
    pads), windows visited row by row, padding dropped, boundaries counted in patches; empty windows dropped."""
    win = window_size // merge // patch_size
    unit = merge * merge
    index, cu, offset = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = win - gh % win, win - gw % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = np.full((t, gh + pad_h, gw + pad_w), -100, dtype=np.int64)
        padded[:, :gh, :gw] = idx
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * gh * gw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # torch.unique_consecutive
    return np.concatenate(index).astype(np.int64), cu_arr[keep]


def vision_feeds(grids: Sequence[Grid], settings: Mapping, pixel_values: np.ndarray | None = None) -> dict:
    """The vision graph's inputs for images with these grids. `settings`: the manifest's "qwen2_vl" entry.
    `pixel_values` [N, C*T*P*P] (from the preprocessor, raster order) is permuted into window order for Qwen2.5."""
    merge = int(settings["merge_size"])
    feeds = {"vision_position_ids": vision_position_ids(grids, merge), "segment_ids": segment_ids(grids)}
    if pixel_values is not None:
        feeds["pixel_values"] = pixel_values
    if settings.get("windowed"):
        order, cu = window_index(grids, merge, int(settings["window_size"]), int(settings["patch_size"]))
        unit = merge * merge
        patch_order = (order[:, None] * unit + np.arange(unit)).reshape(-1)  # merged-token order → patch order
        feeds["vision_position_ids"] = feeds["vision_position_ids"][patch_order]
        feeds["segment_ids"] = feeds["segment_ids"][patch_order]  # per-image segments stay contiguous
        feeds["window_ids"] = np.repeat(np.arange(len(cu) - 1), np.diff(cu)).astype(np.int64)
        feeds["merge_order"] = np.argsort(order, kind="stable").astype(np.int64)
        if pixel_values is not None:
            feeds["pixel_values"] = pixel_values[patch_order]
    return feeds


def tokens_per_image(grid: Grid, merge: int) -> int:
    t, h, w = grid
    return t * h * w // (merge * merge)


def rope_index(image_mask: np.ndarray, attention_mask: np.ndarray, grids: Sequence[Sequence[Grid]],
               merge: int) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids [3, B, S] int64 and deltas [B] for a left-padded batch.

    `image_mask` [B, S]: image-pad positions; each run of consecutive image positions is one image, taking the next
    grid of that row's `grids[b]` (transformers groups `mm_token_type_ids` the same way)."""
    b, s = image_mask.shape
    pos = np.zeros((3, b, s), dtype=np.int64)
    deltas = np.zeros(b, dtype=np.int64)
    for r in range(b):
        real = attention_mask[r].astype(bool)
        kinds = image_mask[r][real]
        pieces, current, k, start, it = [], 0, 0, 0, iter(grids[r])
        n = len(kinds)
        while start < n:
            end = start
            while end < n and kinds[end] == kinds[start]:
                end += 1
            if not kinds[start]:
                pieces.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
                current += end - start
            else:
                try:
                    t, h, w = next(it)
                except StopIteration:
                    raise PromptError(f"row {r} has more image spans than images; pass one image per span") from None
                gt, gh, gw = t, h // merge, w // merge
                if gt * gh * gw != end - start:
                    raise PromptError(f"row {r}: an image span of {end - start} tokens does not match its grid "
                                      f"{t}x{h}x{w} ({gt * gh * gw} tokens); rebuild the prompt from the image")
                tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh) + current, np.arange(gw) + current,
                                         indexing="ij")
                pieces.append(np.stack([tt.reshape(-1) + current, hh.reshape(-1), ww.reshape(-1)]))
                current += max(h, w) // merge
                k += 1
            start = end
        llm = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
        pos[:, r, real] = llm
        deltas[r] = (llm.max() + 1 - n) if n else 0
    return pos, deltas


def check_settings(settings: object) -> dict:
    """Validate the manifest's "qwen2_vl" entry (bounded ints, a known layout) and return it."""
    if not isinstance(settings, dict):
        raise ArtifactError("manifest field 'qwen2_vl' is missing or not an object; re-export the model")
    for key, limit in (("patch_size", 1024), ("temporal_patch_size", 64), ("merge_size", 64), ("in_channels", 16)):
        v = settings.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= limit:
            raise ArtifactError(f"manifest field 'qwen2_vl.{key}' is invalid ({v!r}); re-export the model")
    if not isinstance(settings.get("windowed"), bool):
        raise ArtifactError("manifest field 'qwen2_vl.windowed' is invalid; re-export the model")
    if settings["windowed"]:
        v = settings.get("window_size")
        if not isinstance(v, int) or isinstance(v, bool) or v < settings["patch_size"] * settings["merge_size"]:
            raise ArtifactError(f"manifest field 'qwen2_vl.window_size' is invalid ({v!r}); re-export the model")
    return settings


# -- the runtime architecture (runtime/archs/__init__.py's seam) ----------------------------------------------------

@register_runtime("qwen2_vl", "qwen2_5_vl")
class Qwen2VLRuntime(RuntimeArch):
    """Dynamic resolution: each image takes t*h*w/m² image-pad positions (its grid after smart_resize); the vision
    feeds are built from the grids at encode time (so IAVA's repeated images stay separate attention segments);
    positions are M-RoPE [3, B, S] (`rope_index`); decode steps continue at last + 1 on all three axes."""

    def __init__(self, manifest, open_graph):
        super().__init__(manifest, open_graph)
        self.settings = check_settings(manifest.data.get("qwen2_vl"))
        self.merge = self.settings["merge_size"]
        self.image_processor = Qwen2VLPreprocessor(manifest.preprocessing)
        self.vision = open_graph("vision")

    def preprocess(self, images: Sequence, first_index: int = 0) -> VisualInput:
        if len(images) == 0:
            raise ImageError("no images to preprocess: expected a non-empty list of PIL images; pass at least one")
        parts = [self.image_processor.preprocess_one(image, first_index + i) for i, image in enumerate(images)]
        patches = np.concatenate([p for p, _ in parts])  # [sum of patches, C*T*P*P], raster order per image
        grids = np.asarray([g for _, g in parts], dtype=np.int64)  # [N, 3]
        counts = [tokens_per_image(tuple(g), self.merge) for g in grids.tolist()]
        return VisualInput({"pixel_values": patches}, counts, {"grid_thw": grids})

    def encode(self, visual: VisualInput, texts: Sequence[str] | None = None) -> np.ndarray:
        """One vision call per image: attention never crosses images, so this gives the same features as one call
        over all of them while the graph's [heads, N, N] attention scores stay per image (memory grows with the
        square of the patch count)."""
        grids = [tuple(g) for g in np.asarray(visual.extra["grid_thw"]).tolist()]
        pixels = visual.feeds["pixel_values"]
        dtype = _input_dtype(self.vision, "pixel_values")
        names = {i.name for i in self.vision.session.get_inputs()}
        out, start = [], 0
        for grid in grids:
            n = int(np.prod(grid))
            feeds = vision_feeds([grid], self.settings, pixels[start:start + n])
            feeds["pixel_values"] = feeds["pixel_values"].astype(dtype)
            out.append(self.vision.run({k: v for k, v in feeds.items() if k in names}, ["image_features"])
                       ["image_features"])  # [n / m², d]: this image's merged tokens in raster order
            start += n
        if start != len(pixels):
            raise ImageError(f"{len(pixels)} patches for image grids that need {start}; preprocess the images again")
        return np.concatenate(out)  # [total image tokens, d], images in order

    def prefill_positions(self, layout: PromptLayout) -> tuple[np.ndarray, np.ndarray]:
        grid_thw = np.asarray(layout.visual.extra["grid_thw"])
        grids = [[tuple(grid_thw[i]) for i in row] for row in layout.images]
        positions, deltas = rope_index(layout.image_mask, layout.attention_mask, grids, self.merge)  # [3, B, S]
        last = layout.attention_mask.sum(-1).astype(np.int64) - 1 + deltas  # [B] each row's largest position
        return positions, last

    def decode_positions(self, last: np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.asarray(last, dtype=np.int64)[None, :, None], (3, len(last), 1)).copy()  # [3,B,1]
