"""Independent PyTorch reference of InstructBLIP (Vicuna/Llama) with CLVA inside the Q-Former cross-attention.

The Q-Former is re-implemented here in explicit PyTorch from the Hugging Face module *weights* only (BERT-style
post-LayerNorm layers: embeddings + LayerNorm, self-attention over [queries; instruction] with the padding mask,
cross-attention of the query rows to the image tokens in every `cross_attention_frequency`-th layer, the query
and text feed-forward branches, the language projection). The vision tower is called from the HF model (no method
touches it); the language model is `ReferenceLlava`'s explicit Llama decoder (SEVI there; its own CLVA is not used
for InstructBLIP). Nothing here is shared with the export code or graph_passes/clva_qformer.py.

Q-Former layer (post-LN, as BERT):

    [queries; text] ──self-attn(mask)──► +res, LN ──► query rows ──cross-attn(image tokens)──► +res, LN
                                                                   │ probs [N,H,Q,K]: l_neg/l_pos statistics
                                                                   │ drift layers: A * w / sum(A * w)  eq. 14
                                        query rows ─► FFN_query ─► +res, LN;  text rows ─► FFN ─► +res, LN

CLVA (paper appendix B.1, eq. 14; METHODS.md CLVA) with the reading graph_passes/clva_qformer.py documents: rows =
all learned queries, V = the patch keys (CLS excluded), M = mean over the query rows, the per-row functions of
`clva.py` (float64 statistics, population std, strict thresholds), the multiplicative form (eqs. 10-11).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .clva import ReferenceFlagError, anchor_mask, anchor_weights, reweight, select_heads, visual_intensity
from .iava import ReferenceIava
from .llava_reference import ReferenceLlava, _LayerWeights


@dataclass(frozen=True)
class QFormerClva:
    """One image's CLVA settings in the Q-Former; layer choices (Q-Former layer indices) are shared by the batch."""

    alpha: float = 14.0
    beta: float = 0.9
    tau: float = 2.0
    lam: float = 1.0
    l_neg: int | None = None
    l_pos: int | None = None
    drift_layers: tuple[int, ...] | None = None


def default_layers(num_layers: int, cross: list[int], l_neg=None, l_pos=None, drift=None):
    """l_neg: the first cross-attention layer; l_pos: the last cross-attention layer <= L//2 - 2 (else the first);
    drift: the cross-attention layers after both. Checked as the pass checks them."""
    l_neg = cross[0] if l_neg is None else int(l_neg)
    if l_pos is None:
        below = [c for c in cross if c <= num_layers // 2 - 2]
        l_pos = below[-1] if below else cross[0]
    if l_neg not in cross or l_pos not in cross:
        raise ReferenceFlagError(f"CLVA anchor layers ({l_neg}, {l_pos}) must be cross-attention layers {cross}")
    first = max(l_neg, int(l_pos))
    drift = tuple(c for c in cross if c > first) if drift is None else tuple(sorted(int(x) for x in drift))
    if not drift or any(x not in cross or x <= first for x in drift):
        raise ReferenceFlagError(f"CLVA drift layers {list(drift)} must be cross-attention layers after {first}")
    return l_neg, int(l_pos), drift


@dataclass
class ImageInputs:
    """What the reference's `_embed` needs per image: pixels, the Q-Former's instruction, CLVA per image."""

    pixel_values: torch.Tensor  # [N, 3, H, W]
    qformer_input_ids: torch.Tensor  # [N, Lq]
    qformer_attention_mask: torch.Tensor  # [N, Lq]
    clva: list | None = None  # per image: QFormerClva or None


class ReferenceQFormer:
    def __init__(self, hf_model):
        self.hf = hf_model
        qf = hf_model.qformer
        cfg = qf.config
        self.num_layers, self.heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.layer_norm_eps
        self.cross = [i for i in range(self.num_layers) if i % cfg.cross_attention_frequency == 0]
        if cfg.hidden_act != "gelu":
            raise NotImplementedError(f"reference Q-Former implements exact gelu; config says {cfg.hidden_act!r}")
        self.query_tokens = hf_model.query_tokens  # [1, Q, dq]
        self.word = qf.embeddings.word_embeddings.weight
        self.pos = qf.embeddings.position_embeddings.weight
        self.emb_ln = qf.embeddings.layernorm
        self.layers = qf.encoder.layer
        self.proj = hf_model.language_projection

    def _ln(self, x, ln):
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, self.eps)

    def _heads(self, x, linear):
        n, s, _ = x.shape
        return F.linear(x, linear.weight, linear.bias).view(n, s, self.heads, self.head_dim).transpose(1, 2)

    def _attend(self, probs, v):
        n, _, s, _ = probs.shape
        return (probs @ v).transpose(1, 2).reshape(n, s, self.heads * self.head_dim)

    @torch.no_grad()
    def forward(self, image_embeds, input_ids, attention_mask, clva: list | None = None):
        """image_embeds [N, K, dv], input_ids/attention_mask [N, Lq] -> (projected query outputs [N, Q, d], debug)."""
        n, k = image_embeds.shape[:2]
        q = self.query_tokens.shape[1]
        text = self.word[input_ids] + self.pos[torch.arange(input_ids.shape[1])][None]
        h = self._ln(torch.cat([self.query_tokens.expand(n, -1, -1), text], dim=1), self.emb_ln)  # [N, Q+Lq, dq]
        keep = torch.cat([torch.ones(n, q, dtype=torch.bool), attention_mask.bool()], dim=1)  # [N, Q+Lq]
        self_bias = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]  # [N, 1, 1, Q+Lq]
        rows = clva if clva is not None else [None] * n
        on = [p for p in rows if p is not None]
        choice = None
        if on:
            choices = {default_layers(self.num_layers, self.cross, p.l_neg, p.l_pos, p.drift_layers) for p in on}
            if len(choices) > 1:
                raise ReferenceFlagError("CLVA: images disagree on the Q-Former layer choice (fixed at export)")
            choice = choices.pop()
        patches = torch.ones(k, dtype=torch.bool)
        patches[0] = False  # CLS is not a patch
        stats, weights, debug = {}, None, {"zpos": {}, "zneg": {}, "sensitive": {}, "insensitive": {}}
        for index, layer in enumerate(self.layers):
            a = layer.attention
            logits = (self._heads(h, a.attention.query) @ self._heads(h, a.attention.key).transpose(-1, -2))
            probs = torch.softmax(logits * self.head_dim ** -0.5 + self_bias, dim=-1)
            out = self._attend(probs, self._heads(h, a.attention.value))
            h = self._ln(F.linear(out, a.output.dense.weight, a.output.dense.bias) + h, a.output.LayerNorm)
            hq, ht = h[:, :q], h[:, q:]
            if index in self.cross:
                c = layer.crossattention
                kk = self._heads(image_embeds, c.attention.key)  # [N, H, K, Dh]
                logits = (self._heads(hq, c.attention.query) @ kk.transpose(-1, -2)) * self.head_dim ** -0.5
                probs = torch.softmax(logits, dim=-1)  # [N, H, Q, K] unedited
                if choice is not None:
                    l_neg, l_pos, drift = choice
                    if index in (l_neg, l_pos):
                        stats[index] = probs
                    if index == max(l_neg, l_pos):
                        weights = self._anchors(rows, stats, l_neg, l_pos, patches, debug)
                    if index in drift:
                        probs = torch.stack([reweight(probs[b], weights[b]) if rows[b] is not None else probs[b]
                                             for b in range(n)])  # eq. 14 with eq. 11's renormalisation
                out = self._attend(probs, self._heads(image_embeds, c.attention.value))
                hq = self._ln(F.linear(out, c.output.dense.weight, c.output.dense.bias) + hq, c.output.LayerNorm)
            hq = self._ffn(hq, layer.intermediate_query, layer.output_query)
            ht = self._ffn(ht, layer.intermediate, layer.output) if ht.shape[1] else ht
            h = torch.cat([hq, ht], dim=1)
        return self.proj(h[:, :q]), debug

    def _ffn(self, x, inter, out):
        y = F.gelu(F.linear(x, inter.dense.weight, inter.dense.bias))
        return self._ln(F.linear(y, out.dense.weight, out.dense.bias) + x, out.LayerNorm)

    def _anchors(self, rows, stats, l_neg, l_pos, patches, debug):
        n, heads, q, k = stats[l_neg].shape
        all_rows = torch.ones(q, dtype=torch.bool)
        weights = torch.ones(n, k)
        for b, p in enumerate(rows):
            if p is None:
                continue
            _, insens = select_heads(visual_intensity(stats[l_neg][b], all_rows, patches), p.lam)
            sens, _ = select_heads(visual_intensity(stats[l_pos][b], all_rows, patches), p.lam)
            # "last row": the mean over the query rows (graph_passes/clva_qformer.py)
            zneg = anchor_mask(stats[l_neg][b].double().mean(1), insens, patches, p.tau)
            zpos = anchor_mask(stats[l_pos][b].double().mean(1), sens, patches, p.tau)
            weights[b] = anchor_weights(zpos, zneg, p.alpha, p.beta)
            debug["zpos"][b], debug["zneg"][b], debug["sensitive"][b], debug["insensitive"][b] = zpos, zneg, sens, insens
        return weights


class ReferenceInstructBlip(ReferenceLlava):
    """InstructBLIP = HF vision tower + ReferenceQFormer (CLVA) + ReferenceLlava's Llama decoder (SEVI)."""

    def __init__(self, hf_model):
        hf_model = hf_model.float().eval()
        self.hf = hf_model
        config, text = hf_model.config, hf_model.config.text_config
        lm = hf_model.language_model
        self.image_token_id = int(config.image_token_index)
        pad = text.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.eps = text.rms_norm_eps
        self.embed = lm.model.embed_tokens.weight
        self.final_norm = lm.model.norm.weight
        self.lm_head = lm.lm_head
        self.layers = [
            _LayerWeights(layer.input_layernorm.weight, layer.self_attn.q_proj, layer.self_attn.k_proj,
                          layer.self_attn.v_proj, layer.self_attn.o_proj, layer.post_attention_layernorm.weight,
                          layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
            for layer in lm.model.layers
        ]
        rope = getattr(text, "rope_parameters", None) or {"rope_type": "default", "rope_theta": text.rope_theta}
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32)
        self.inv_freq = 1.0 / (float(rope["rope_theta"]) ** (dims / self.head_dim))
        self.qformer = ReferenceQFormer(hf_model)
        self.last_qformer_debug = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ReferenceInstructBlip:
        from transformers import InstructBlipForConditionalGeneration

        return cls(InstructBlipForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32))

    @torch.no_grad()
    def image_features(self, images: ImageInputs) -> torch.Tensor:
        embeds = self.hf.vision_model(images.pixel_values.float()).last_hidden_state  # [N, K, dv]
        feats, self.last_qformer_debug = self.qformer.forward(embeds, images.qformer_input_ids,
                                                              images.qformer_attention_mask, images.clva)
        return feats  # [N, Q, d]

    def _embed(self, input_ids: torch.Tensor, pixel_values, image_sizes=None) -> torch.Tensor:
        """`image_sizes` (LLaVA-NeXT's, the base class's signature) is unused: the images are an ImageInputs."""
        h = self.embed[input_ids]
        if pixel_values is None:
            return h
        features = self.image_features(pixel_values).reshape(-1, h.shape[-1])  # pixel_values: an ImageInputs
        slots = input_ids == self.image_token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{int(slots.sum())} image tokens in input_ids but {features.shape[0]} image features")
        h = h.clone()
        h[slots] = features.to(h.dtype)
        return h


class ReferenceIavaInstructBlip(ReferenceIava):
    """IAVA's reference (exporter/reference/iava.py) on InstructBLIP: the 32 query outputs are V; the general
    instruction G goes through the processor as the query does, so the Q-Former reads G (its own visual tokens)."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoProcessor, InstructBlipForConditionalGeneration

        self.model = InstructBlipForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager").eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.image_token_id = self.model.config.image_token_index

    def _attentions(self, out):
        return out.language_model_outputs.attentions

    def _past(self, out):  # the full model's prefill output, or the language model's own (decode steps)
        return getattr(out, "language_model_outputs", None).past_key_values if hasattr(out, "language_model_outputs") \
            else out.past_key_values

    def _text_model(self):
        return self.model.language_model


__all__ = ["ReferenceIavaInstructBlip", "ImageInputs", "QFormerClva", "ReferenceInstructBlip", "ReferenceQFormer", "default_layers"]
