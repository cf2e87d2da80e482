"""One prefill through an explained copy of an artifact (graph_passes/explain.py), returning the attention rows.

    rows = attention_rows(pipe, features, encoded_prompt, mitigation={"clva": True})
    rows.attention   # [L, H, R, K] float32: every layer's attention of the prompt's T rows (the last one last)
    rows.visual      # [K] bool: the image keys (V)

The pipeline's own stages run (prompt padding, the decoder feeds of the baked methods, the KV cache); the graph itself
picks the T rows (METHODS.md: the query rows after the last image position).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from anchorrt.runtime.errors import ArtifactError, PromptError

ATTENTION = "explain.attention"
CLVA_DEBUG = ("clva.zpos", "clva.zneg", "clva.sensitive_heads", "clva.insensitive_heads")


@dataclass
class PassRows:
    attention: np.ndarray  # [L, H, R, K] float32, rows = the T rows of the prompt
    visual: np.ndarray  # [K] bool
    first_t_row: int
    prompt_tokens: int
    graph_debug: dict  # CLVA's own debug outputs of this pass (row 0), where the decoder has them (bake --debug-outputs)


def attention_rows(pipe, features: np.ndarray, encoded, mitigation: dict | None) -> PassRows:
    """The prompt's prefill with `mitigation` (one request's spec, None = off) -> its T rows' attention."""
    if ATTENTION not in pipe.decoder.output_names():
        raise ArtifactError("the decoder has no explain.attention output; open the copy graph_passes.explain."
                            "explained_copy made, not the artifact itself")
    batch = pipe._pad([encoded])  # [1, S], no padding
    s = batch.ids.shape[1]
    image_cols = np.flatnonzero(batch.image_mask[0])
    if not len(image_cols):
        raise PromptError("the prompt has no image position; explain shows attention over an image")
    first_t = int(image_cols.max()) + 1
    if first_t >= s:
        raise PromptError("the prompt has no text after the image (no T row); put the question after the image")
    cache = pipe._new_cache(1, s + 1)
    extra = pipe._extra_inputs(batch, [mitigation])
    fetched = {ATTENTION: None}
    fetched.update({name: None for name in CLVA_DEBUG if name in pipe.decoder.output_names()})
    pipe.prefill(batch, features, cache, extra, fetch=fetched)
    attention = fetched[ATTENTION][0]  # [L, H, R, K]
    if attention.shape[2] != s - first_t:
        raise ArtifactError(f"the explain output has {attention.shape[2]} rows for {s - first_t} T rows; re-make the copy")
    debug = {name: value[0] for name, value in fetched.items() if name != ATTENTION}
    return PassRows(attention, batch.image_mask[0].copy(), first_t, s, debug)
