"""Independent PyTorch reference of LLaVA-1.5 with CLVA and SEVI, the thing the ONNX graph passes are checked against.

The Llama decoder is re-implemented here in explicit PyTorch from the Hugging Face module *weights* only
(embedding, RMSNorm, q/k/v/o projections, rotary embedding recomputed from `rope_theta`, grouped-query
`repeat_kv`, eager attention with explicit `QK^T/sqrt(d)` logits, mask, softmax, SwiGLU MLP, final norm,
lm_head). Only the vision tower + projector are called from the HF model (`get_image_features`): neither
method touches them. The same code covers Qwen2 language models (LLaVA-Interleave): their q/k/v projections carry
a bias, which `_linear` applies from the module's own `bias`, and tied embeddings are the same tensor as `lm_head`.
For LLaVA-NeXT, `get_image_features(pixel_values, image_sizes)` is transformers' own tiling layout (unpad, one
`image_newline` per grid row), independent of the runtime's numpy packing (runtime/archs/llava_next.py). Nothing here is shared with the export code or the graph passes, so parity between
the two is not a tautology. Everything runs in fp32 on the CPU.

Per layer, per pass (prefill or one decode step):

    x ──RMSNorm──► q,k,v ──rope──► logits = q k^T / sqrt(d)          [B, H, S, K]
                                      │
                                      ├─► probs = softmax(logits + mask)      "unedited attention":
                                      │       │                                CLVA statistics (l_neg, l_pos)
                                      │       │                                and SEVI classification read this
                                      │   SEVI (layers >= start_layer, last row): edit logits, softmax again
                                      │       │
                                      │   CLVA (drift layers, T rows): A * w / sum(A * w)      eqs. 10-11
                                      ▼       ▼
                                    attn @ v ──o_proj──► + residual ──RMSNorm──► MLP ──► + residual

CLVA (paper `clva-cross-layer-visual-anchors.txt`, eqs. 1-4 and 8-11; METHODS.md steps 1-7) and SEVI
(METHODS.md section SEVI) are in `clva.py` / `sevi.py` as pure per-row functions; this module finds the
S / V / T regions, collects the statistics at the right layers and applies the edits.

Interpretations made here (beyond METHODS.md's own "precise readings"):
- Regions are per batch row, on key columns of the left-padded layout (same order as positions):
  V = `visual_mask`, T rows = non-pad query rows after the row's last V column. A row without any image
  has no T rows and no "after the image": CLVA and SEVI leave such a row unchanged.
- `visual_mask` defaults to `input_ids == image_token_id` only in a pass without a cache (the prompt);
  tokens of a pass with a cache are generated tokens and never visual (METHODS.md step 7), whatever their
  id. Chunked prefill or teacher-forced recomputation must pass `visual_mask` explicitly. The cache keeps
  the visual mask of every position it holds.
- "Unedited attention" means the softmax of the layer's own unmodified logits (+ mask); the hidden states
  that enter the layer do carry the edits of earlier layers. With both methods on, SEVI's edit (pre-softmax)
  comes first and CLVA re-weights the result; both read their statistics from the unedited softmax.
- Masked keys: softmax over visible keys only (mask = -inf); a fully padded query row (left padding in the
  prefill) has no visible key and gets all-zero attention instead of NaN (HF gives such rows uniform
  attention; their outputs are never used and differ only there). SEVI edits the raw scaled logits and the
  mask is applied after the edit (see `sevi.py` for why this equals editing masked logits).
- CLVA anchor statistics in float64; attention, re-weighting and the decoder in fp32.
- `freeze_anchors`: the anchors (Zpos, Zneg) of the first pass of a row that has T rows (normally the
  prefill) are stored in the cache and reused by every later pass of that row.
- Layer choices (CLVA l_neg/l_pos/drift_layers, SEVI start_layer) are fixed at export in the graphs, so
  enabled rows of one batch must agree on them; the numeric parameters may differ per row.
- The reference needs left padding: a row whose last column is padding is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .clva import (
    ClvaParams,
    ReferenceFlagError,
    anchor_mask,
    anchor_weights,
    reweight,
    select_heads,
    visual_intensity,
)
from .sevi import NOT_CLASSIFIED, SeviParams, classify_heads, edit_logits


@dataclass
class FrozenAnchors:
    """CLVA anchors kept for `freeze_anchors` rows. `present[b]` says whether row b has stored anchors."""

    present: torch.Tensor  # [B] bool
    zpos: torch.Tensor  # [B, P] bool
    zneg: torch.Tensor  # [B, P] bool
    sensitive_heads: torch.Tensor  # [B, H] bool
    insensitive_heads: torch.Tensor  # [B, H] bool

    def extended(self, length: int) -> FrozenAnchors:
        """A copy over `length` key positions: new positions are never visual, so never marked."""
        grow = torch.zeros(self.zpos.shape[0], length - self.zpos.shape[1], dtype=torch.bool)  # [B, new]
        return FrozenAnchors(self.present.clone(), torch.cat([self.zpos, grow], 1), torch.cat([self.zneg, grow], 1),
                             self.sensitive_heads.clone(), self.insensitive_heads.clone())


@dataclass
class RefCache:
    """KV cache of the reference: post-rotary keys and values per layer, plus what the methods must remember."""

    keys: list[torch.Tensor]  # per layer [B, KVH, P, Dh]
    values: list[torch.Tensor]  # per layer [B, KVH, P, Dh]
    visual_mask: torch.Tensor  # [B, P] bool: image-token positions, remembered across decode steps
    frozen_anchors: FrozenAnchors | None = None

    @property
    def length(self) -> int:
        return self.visual_mask.shape[1]


@dataclass
class RefOutput:
    logits: torch.Tensor  # [B, S, V] for every query position of the pass
    cache: RefCache
    debug: dict


@dataclass
class _LayerWeights:
    input_norm: torch.Tensor
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    post_norm: torch.Tensor
    gate: torch.nn.Linear
    up: torch.nn.Linear
    down: torch.nn.Linear


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, S, Dh], cos/sin [B, S, Dh]: rotate the two halves of each head (the Llama/HF layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [B, n, S, Dh]
    return x * cos[:, None] + rotated * sin[:, None]


def _masked_softmax(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """logits [B, H, S, K], visible [B, 1, S, K] bool -> probabilities; rows with no visible key are all zero."""
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)  # [B, H, S, K]
    return torch.where(visible.any(-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype))


def _per_row(spec, batch: int, parse, method: str) -> list:
    """None / one setting for all rows / one setting-or-None per row -> list of parsed settings (None = off)."""
    if spec is None:
        return [None] * batch
    if isinstance(spec, (dict, ClvaParams, SeviParams)):
        return [parse(spec)] * batch
    if isinstance(spec, (list, tuple)):
        if len(spec) != batch:
            raise ReferenceFlagError(f"{method}: got {len(spec)} per-row settings for a batch of {batch}")
        return [None if s is None else parse(s) for s in spec]
    raise ReferenceFlagError(f"{method}: expected None, a dict or a list of dict/None, got {type(spec).__name__}")


def _common(rows: list, key, method: str):
    """The layer choice shared by the enabled rows (fixed at export in the graphs), or None if all are off."""
    choices = {key(r) for r in rows if r is not None}
    if len(choices) > 1:
        raise ReferenceFlagError(f"{method}: enabled rows disagree on the layer choice {sorted(choices)}; "
                                 "it is fixed at export, only the numeric parameters may differ per row")
    return choices.pop() if choices else None


class ReferenceLlava:
    """LLaVA-1.5 decoder in explicit PyTorch with CLVA and SEVI (see the module docstring)."""

    def __init__(self, hf_model):
        hf_model = hf_model.float().eval()
        self.hf = hf_model  # kept for the vision tower + projector only
        config, text = hf_model.config, hf_model.config.text_config
        if text.hidden_act != "silu":
            raise NotImplementedError(f"reference MLP is SwiGLU with silu; config says {text.hidden_act!r}")
        rope = getattr(text, "rope_parameters", None) or {"rope_type": "default", "rope_theta": text.rope_theta}
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"reference implements plain RoPE only; config has {rope}")
        lm = hf_model.model.language_model
        self.image_token_id = int(getattr(config, "image_token_id", None) or config.image_token_index)
        pad = text.pad_token_id if text.pad_token_id is not None else getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.eps = text.rms_norm_eps
        self.embed = lm.embed_tokens.weight  # [V, D]
        self.final_norm = lm.norm.weight  # [D]
        self.lm_head = hf_model.lm_head  # [V, D]
        self.layers = [
            _LayerWeights(layer.input_layernorm.weight, layer.self_attn.q_proj, layer.self_attn.k_proj,
                          layer.self_attn.v_proj, layer.self_attn.o_proj, layer.post_attention_layernorm.weight,
                          layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
            for layer in lm.layers
        ]
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32)  # [Dh/2]
        self.inv_freq = 1.0 / (float(rope["rope_theta"]) ** (dims / self.head_dim))  # [Dh/2]

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ReferenceLlava:
        import json

        import transformers

        # LLaVA-1.5 or LLaVA-NeXT (or any class with the same language-model layout): the checkpoint's own class
        arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
        return cls(getattr(transformers, arch).from_pretrained(str(model_dir), dtype=torch.float32))

    # ----------------------------------------------------------------------------------------- pieces

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, S, Dh/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [B, S, Dh]
        return angles.cos(), angles.sin()

    def _positions(self, input_ids, attention_mask, past: int, visual, cache) -> torch.Tensor:
        """Position ids as transformers' generate makes them: cumsum of the mask - 1, pads clamped to 0. [B, S]
        (exporter/reference/qwen2_vl_reference.py overrides this with M-RoPE.)"""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
               image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed[input_ids]  # [B, S, D]
        if pixel_values is None:
            return h
        # LLaVA-NeXT: transformers' own tiling layout (pack_image_features: unpad, image_newline after each row),
        # not the runtime's numpy packing (runtime/archs/llava_next.py), so parity checks that too.
        kw = {} if image_sizes is None else {"image_sizes": image_sizes}
        features = self.hf.model.get_image_features(pixel_values=pixel_values.float(), return_dict=True,
                                                    **kw).pooler_output
        features = torch.cat(list(features), dim=0)  # [N * n_img_tokens, D]
        slots = input_ids == self.image_token_id  # [B, S]
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{int(slots.sum())} image tokens in input_ids but {features.shape[0]} image features")
        h = h.clone()
        h[slots] = features.to(h.dtype)  # row-major order: images fill the image tokens in reading order
        return h

    def _visual_mask(self, input_ids, seen, cache, visual_mask) -> torch.Tensor:
        batch, total = seen.shape
        if visual_mask is not None:
            if tuple(visual_mask.shape) != (batch, total):
                raise ValueError(f"visual_mask must be [B, P+S] = {(batch, total)}, got {tuple(visual_mask.shape)}")
            return visual_mask.bool() & seen
        if cache is None:  # the prompt pass: image tokens are where the image goes
            new = input_ids == self.image_token_id  # [B, S]
        else:  # generated tokens are always in T, even with the image token's id
            new = torch.zeros_like(input_ids, dtype=torch.bool)
        past = cache.visual_mask if cache is not None else new[:, :0]
        return torch.cat([past, new], dim=1) & seen  # [B, K]

    def _clva_anchors(self, rows, active, stats, choice, t_rows, visual, frozen: FrozenAnchors | None):
        """Steps 1-4 for every active row (or the stored anchors of a frozen row); returns weights and debug."""
        l_neg, l_pos, _ = choice
        batch, total = visual.shape
        heads = self.num_heads
        zpos = torch.zeros(batch, total, dtype=torch.bool)  # [B, K]
        zneg = torch.zeros(batch, total, dtype=torch.bool)  # [B, K]
        sensitive = torch.zeros(batch, heads, dtype=torch.bool)  # [B, H]
        insensitive = torch.zeros(batch, heads, dtype=torch.bool)  # [B, H]
        phi_pos = torch.zeros(batch, heads, dtype=torch.float64)  # [B, H]
        phi_neg = torch.zeros(batch, heads, dtype=torch.float64)  # [B, H]
        from_frozen = torch.zeros(batch, dtype=torch.bool)  # [B]
        weights = torch.ones(batch, total)  # [B, K]
        for b, params in enumerate(rows):
            if not bool(active[b]):
                continue
            if params.freeze_anchors and frozen is not None and bool(frozen.present[b]):
                zpos[b], zneg[b] = frozen.zpos[b], frozen.zneg[b]
                sensitive[b], insensitive[b] = frozen.sensitive_heads[b], frozen.insensitive_heads[b]
                from_frozen[b] = True
            else:
                phi_neg[b] = visual_intensity(stats[l_neg][b], t_rows[b], visual[b])  # eq. 1 at l_neg
                phi_pos[b] = visual_intensity(stats[l_pos][b], t_rows[b], visual[b])  # eq. 1 at l_pos
                insensitive[b] = select_heads(phi_neg[b], params.lam)[1]  # eq. 3 at l_neg
                sensitive[b] = select_heads(phi_pos[b], params.lam)[0]  # eq. 2 at l_pos
                # The last query row of a pass with T rows is a T row (T is the tail of the sequence).
                zpos[b] = anchor_mask(stats[l_pos][b, :, -1], sensitive[b], visual[b], params.tau)  # eqs. 4, 8, 9
                zneg[b] = anchor_mask(stats[l_neg][b, :, -1], insensitive[b], visual[b], params.tau)
            weights[b] = anchor_weights(zpos[b], zneg[b], params.alpha, params.beta)  # eq. 10's factor
        debug = {"active": active, "zpos": zpos, "zneg": zneg, "sensitive_heads": sensitive,
                 "insensitive_heads": insensitive, "phi_pos": phi_pos, "phi_neg": phi_neg,
                 "from_frozen": from_frozen, "weights": weights}
        return weights, debug

    def _store_frozen(self, rows, clva_debug, frozen: FrozenAnchors | None, batch: int, total: int):
        """Keep the anchors of `freeze_anchors` rows first computed in this pass, for every later pass.
        `frozen` is this pass's own copy (already `total` long), so it is updated in place."""
        new = [b for b, p in enumerate(rows) if p is not None and p.freeze_anchors and clva_debug is not None
               and bool(clva_debug["active"][b]) and not bool(clva_debug["from_frozen"][b])]
        if not new:
            return frozen
        if frozen is None:
            no_keys = torch.zeros(batch, total, dtype=torch.bool)  # [B, K]
            no_heads = torch.zeros(batch, self.num_heads, dtype=torch.bool)  # [B, H]
            frozen = FrozenAnchors(torch.zeros(batch, dtype=torch.bool), no_keys, no_keys.clone(), no_heads,
                                   no_heads.clone())
        for b in new:
            frozen.present[b] = True
            frozen.zpos[b], frozen.zneg[b] = clva_debug["zpos"][b], clva_debug["zneg"][b]
            frozen.sensitive_heads[b] = clva_debug["sensitive_heads"][b]
            frozen.insensitive_heads[b] = clva_debug["insensitive_heads"][b]
        return frozen

    @staticmethod
    def _sevi_layer(rows, layer: int, logits, probs, has_image, last_image):
        """SEVI on the last query row of one layer; returns the edited raw logits and this layer's debug."""
        batch, heads = logits.shape[:2]
        edited = logits.clone()  # [B, H, S, K]
        classes = torch.full((batch, heads), NOT_CLASSIFIED, dtype=torch.int8)  # [B, H]
        step1 = torch.zeros(batch, dtype=torch.bool)  # [B]
        step2 = torch.zeros(batch, dtype=torch.bool)  # [B]
        for b, params in enumerate(rows):
            if params is None or layer < params.start_layer or not bool(has_image[b]):
                continue
            row_classes = classify_heads(probs[b, :, -1], int(last_image[b]), params.kappa)  # [H]
            edited[b, :, -1], step1[b], step2[b] = edit_logits(logits[b, :, -1], row_classes, params.omega)
            classes[b] = row_classes.to(torch.int8)
        return edited, {"head_class": classes, "step1": step1, "step2": step2}

    # ---------------------------------------------------------------------------------------- forward

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: RefCache | None = None,
                clva: dict | list | None = None, sevi: dict | list | None = None,
                visual_mask: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None) -> RefOutput:
        """One decoder pass. input_ids [B, S]; attention_mask [B, P+S] over the cache and this pass (left
        padding); clva / sevi: None, one dict for all rows, or one dict-or-None per row. -> logits [B, S, V]."""
        batch, seq = input_ids.shape
        past = 0 if cache is None else cache.length
        total = past + seq
        if attention_mask is None:
            attention_mask = torch.ones(batch, total, dtype=torch.long)
        if tuple(attention_mask.shape) != (batch, total):
            raise ValueError(f"attention_mask must be [B, P+S] = {(batch, total)}, got {tuple(attention_mask.shape)}")
        seen = attention_mask.bool()  # [B, K]
        if not bool(seen[:, -1].all()):
            raise ValueError("the reference expects left padding: every row's last column must be a real token")

        clva_rows = _per_row(clva, batch, lambda s: ClvaParams.from_spec(s, self.num_layers), "CLVA")
        sevi_rows = _per_row(sevi, batch, lambda s: SeviParams.from_spec(s, self.num_layers), "SEVI")
        clva_choice = _common(clva_rows, ClvaParams.layer_choice, "CLVA")
        sevi_start = _common(sevi_rows, lambda p: p.start_layer, "SEVI")

        visual = self._visual_mask(input_ids, seen, cache, visual_mask)  # [B, K]
        key_cols = torch.arange(total)  # [K]
        query_cols = key_cols[past:]  # [S]
        has_image = visual.any(-1)  # [B]
        last_image = torch.where(visual, key_cols, -1).max(-1).values  # [B]  -1 when the row has no image
        t_rows = has_image[:, None] & (query_cols[None, :] > last_image[:, None]) & seen[:, past:]  # [B, S]
        visible = (key_cols[None, None, :] <= query_cols[None, :, None]) & seen[:, None, :]  # [B, S, K]
        visible = visible[:, None]  # [B, 1, S, K]

        positions = self._positions(input_ids, attention_mask, past, visual, cache)  # [B, S] ([3, B, S]: M-RoPE)
        cos, sin = self._rope(positions)  # [B, S, Dh]
        h = self._embed(input_ids, pixel_values, image_sizes)  # [B, S, D]

        # A pass with no T row leaves CLVA off for that row (METHODS.md step 1).
        clva_active = torch.tensor([p is not None for p in clva_rows]) & t_rows.any(-1)  # [B]
        clva_rows_sel = (clva_active[:, None] & t_rows)[:, None, :, None]  # [B, 1, S, 1]
        stats: dict[int, torch.Tensor] = {}
        weights = clva_debug = None
        sevi_debug: dict[int, dict] = {}
        frozen = cache.frozen_anchors if cache is not None else None
        frozen = frozen.extended(total) if frozen is not None else None  # a copy: the old cache stays as it was
        rep = self.num_heads // self.num_kv_heads
        new_keys, new_values = [], []

        for index, lw in enumerate(self.layers):
            x = _rms_norm(h, lw.input_norm, self.eps)  # [B, S, D]
            q = _linear(x, lw.q).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, Dh]
            k = _linear(x, lw.k).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, Dh]
            v = _linear(x, lw.v).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, Dh]
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            if cache is not None:
                k = torch.cat([cache.keys[index], k], dim=2)  # [B, KVH, K, Dh]
                v = torch.cat([cache.values[index], v], dim=2)  # [B, KVH, K, Dh]
            new_keys.append(k)
            new_values.append(v)
            # Grouped-query attention: query head h reads kv head h // rep; "heads" below are query heads.
            k_heads = k.repeat_interleave(rep, dim=1)  # [B, H, K, Dh]
            v_heads = v.repeat_interleave(rep, dim=1)  # [B, H, K, Dh]
            logits = (q @ k_heads.transpose(-1, -2)) * self.head_dim ** -0.5  # [B, H, S, K]  eq. 7
            probs = _masked_softmax(logits, visible)  # [B, H, S, K]  the unedited attention
            attn = probs

            if sevi_start is not None and index >= sevi_start:
                edited, sevi_debug[index] = self._sevi_layer(sevi_rows, index, logits, probs, has_image, last_image)
                attn = _masked_softmax(edited, visible)  # [B, H, S, K]

            if clva_choice is not None:
                l_neg, l_pos, drift = clva_choice
                if index in (l_neg, l_pos):
                    stats[index] = probs
                if index == max(l_neg, l_pos):  # both anchor layers have run, no drift layer yet
                    weights, clva_debug = self._clva_anchors(clva_rows, clva_active, stats, clva_choice, t_rows,
                                                             visual, frozen)
                if index in drift:
                    w = weights[:, None, None, :]  # [B, 1, 1, K]
                    attn = torch.where(clva_rows_sel, reweight(attn, w), attn)  # eqs. 10-11, T rows only

            out = (attn @ v_heads).transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)  # [B, S, H*Dh]
            h = h + _linear(out, lw.o)  # [B, S, D]
            x = _rms_norm(h, lw.post_norm, self.eps)
            h = h + _linear(F.silu(_linear(x, lw.gate)) * _linear(x, lw.up), lw.down)  # [B, S, D]

        logits = _linear(_rms_norm(h, self.final_norm, self.eps), self.lm_head)  # [B, S, V]
        frozen = self._store_frozen(clva_rows, clva_debug, frozen, batch, total)
        new_cache = RefCache(new_keys, new_values, visual, frozen)
        debug = {"visual_mask": visual, "t_rows": t_rows, "positions": positions,
                 "clva": clva_debug, "sevi": sevi_debug or None}
        return RefOutput(logits, new_cache, debug)

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, attention_mask: torch.Tensor,
                 max_new_tokens: int, clva=None, sevi=None, eos_token_id: int | list[int] | None = None,
                 image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding -> new tokens [B, n <= max_new_tokens]. After a row emits EOS it receives the pad
        token (as transformers does); decoding stops when every row has finished."""
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           dtype=torch.long)  # [n_eos]
        out = self.forward(input_ids, pixel_values, attention_mask, clva=clva, sevi=sevi, image_sizes=image_sizes)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)  # [B]
        tokens = []
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)  # [B]
            token = torch.where(finished, self.pad_token_id, token)
            tokens.append(token)
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)  # [B, K+1]
            out = self.forward(token[:, None], None, attention_mask, cache=out.cache, clva=clva, sevi=sevi)
        return torch.stack(tokens, dim=1) if tokens else input_ids[:, :0]
