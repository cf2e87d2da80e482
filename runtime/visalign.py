"""VisAlign at run time: the two embed-graph inputs the fusion needs (torch-free).

An embed graph with VisAlign baked in (`graph_passes/visalign.py`) takes, besides input_ids / image_features /
image_mask:

- `visalign.enable` [batch] bool: which rows are fused (per request; off = the base embeddings exactly);
- `visalign.v_bar` [batch, d]: the mean of the request's projected visual tokens (METHODS.md, VisAlign).

Decode steps carry no image features, so v_bar cannot come from the step's own inputs. It is computed once
per request from the prefill's image features and the same array is fed to the prefill and to every decode
step: every text token of the request, prompt and generated, is fused with one v_bar, as in teacher-forced
training. `VisAlignState` holds those per-call arrays; `Pipeline` creates one per generate call.

    feed = VisAlignFeed.from_manifest(manifest)                  # None: the graph has no VisAlign
    state = visalign_state(feed, mitigation, features, image_mask)  # once per call, after the vision graph
    embed_feed.update(feed.inputs(state, batch, hidden))           # prefill and every decode step
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from anchorrt.runtime.errors import ArtifactError, FlagError

ENABLE_INPUT = "visalign.enable"
V_BAR_INPUT = "visalign.v_bar"
METHOD = "visalign"


@dataclass
class VisAlignState:
    enabled: np.ndarray  # [B] bool
    v_bar: np.ndarray  # [B, d] in the graph's float type


def visual_mean(features: np.ndarray, image_mask: np.ndarray) -> np.ndarray:
    """v_bar per row: the mean of the image-feature rows that fill the row's image positions.

    `features` [N, T, d] fill the true positions of `image_mask` [B, S] in row-major order (as the embed graph and
    transformers' masked_scatter place them), so row b owns the next `image_mask[b].sum()` feature rows; with
    several images that is the mean over all of them. A row without image positions gets zeros (and must not be
    enabled). Accumulated in float32 whatever the graph's dtype."""
    b = image_mask.shape[0]
    d = features.shape[-1]
    flat = features.reshape(-1, d).astype(np.float32, copy=False)  # [N*T, d]
    counts = image_mask.reshape(b, -1).sum(axis=1)  # [B]
    if int(counts.sum()) != flat.shape[0]:
        raise FlagError(f"VisAlign: {int(counts.sum())} image positions but {flat.shape[0]} image-feature rows")
    out = np.zeros((b, d), dtype=np.float32)  # [B, d]
    start = 0
    for row, n in enumerate(counts.tolist()):
        if n:
            out[row] = flat[start:start + n].mean(axis=0)
        start += n
    return out


def requested(mitigation: Any, batch: int, default: bool) -> np.ndarray:
    """Per-row VisAlign flags from `mitigation`: None (the artifact's default), one dict for every request
    (`{"visalign": True}`), or a sequence of one dict-or-None per request. Other methods' keys are left alone."""
    if mitigation is None:
        return np.full(batch, default, dtype=bool)
    if isinstance(mitigation, dict):
        rows: Sequence = [mitigation] * batch
    elif isinstance(mitigation, (list, tuple)):
        if len(mitigation) != batch:
            raise FlagError(f"mitigation has {len(mitigation)} entries for {batch} requests; give one per request")
        rows = mitigation
    else:
        raise FlagError(f"mitigation must be a dict or one dict per request, got {type(mitigation).__name__}")
    flags = np.full(batch, default, dtype=bool)
    for i, row in enumerate(rows):
        if row is None:
            continue
        if not isinstance(row, dict):
            raise FlagError(f"mitigation for request {i} must be a dict, got {type(row).__name__}")
        if METHOD in row:
            value = row[METHOD]
            if not isinstance(value, (bool, np.bool_)):
                raise FlagError(f"mitigation '{METHOD}' for request {i} must be true or false, got {value!r}")
            flags[i] = bool(value)
    return flags


class VisAlignFeed:
    """The VisAlign inputs of one embed graph (its input dtypes and the artifact's default)."""

    def __init__(self, v_bar_dtype: type, default: bool):
        self.v_bar_dtype = v_bar_dtype
        self.default = default

    @classmethod
    def from_manifest(cls, manifest) -> VisAlignFeed | None:
        """From the embed graph's recorded inputs (no session is opened here: backends stay lazy)."""
        inputs = {i["name"]: i for i in manifest.graph("embed")["inputs"]}
        if ENABLE_INPUT not in inputs:
            return None
        if V_BAR_INPUT not in inputs:
            raise ArtifactError(f"the embed graph has {ENABLE_INPUT} but no {V_BAR_INPUT}; re-export")
        spec = manifest.mitigation.get(METHOD, {}).get("inputs", {}).get(ENABLE_INPUT, {})
        dtype = np.float16 if inputs[V_BAR_INPUT].get("dtype") == "float16" else np.float32
        return cls(dtype, bool(spec.get("default", True)))

    def start(self, mitigation: Any, features: np.ndarray, image_mask: np.ndarray) -> VisAlignState:
        enabled = requested(mitigation, image_mask.shape[0], self.default)
        v_bar = visual_mean(features, image_mask)
        no_image = enabled & ~image_mask.any(axis=1)
        if no_image.any():
            raise FlagError(f"VisAlign is on for request {int(np.flatnonzero(no_image)[0])}, which has no image; "
                            "v_bar is the mean of the request's visual tokens")
        return VisAlignState(enabled, v_bar.astype(self.v_bar_dtype))

    def inputs(self, state: VisAlignState | None, batch: int, hidden: int) -> dict[str, np.ndarray]:
        """The embed feed's VisAlign entries. Without a state (a caller driving the stages itself that did not
        start one) every row is off: the base embeddings, never a fusion with a made-up v_bar."""
        if state is None:
            return {ENABLE_INPUT: np.zeros(batch, dtype=bool), V_BAR_INPUT: np.zeros((batch, hidden), self.v_bar_dtype)}
        return {ENABLE_INPUT: state.enabled, V_BAR_INPUT: state.v_bar}


def visalign_state(feed: VisAlignFeed | None, mitigation: Any, features: np.ndarray,
                   image_mask: np.ndarray) -> VisAlignState | None:
    """The per-call state, or None when the embed graph has no VisAlign (then asking for it is an error)."""
    if feed is None:
        if requested(mitigation, image_mask.shape[0], False).any():
            raise FlagError("this artifact has no VisAlign fusion; export a VisAlign checkpoint or "
                            "`anchorrt bake OUT --visalign visalign.safetensors`")
        return None
    return feed.start(mitigation, features, image_mask)
