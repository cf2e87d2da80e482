"""The PyTorch reference of VisAlign: the transformers LLaVA model with the fusion on every text embedding.

This is what the trainer trains and what the ONNX graphs are checked against. It shares no code with the
graph pass: the pass splits `W` into `W_e e + W_v v_bar` in ONNX ops, this module concatenates and applies
`nn.Linear(2d, d)` as the paper draws it (`fusion.py`), and the LLM is transformers' own.

One pass (prefill, a decode step, or a teacher-forced training sequence):

    input_ids ── embed_tokens ──► e [B,S,d]      (image positions: the projected visual tokens, in order)
    pixel_values ── vision tower + projector ──► features [N,T,d] ──► v_bar [B,d]   (prefill / training only)
    e, v_bar ── fusion on text positions of enabled rows ──► e' [B,S,d] ── LLM (+KV) ──► logits

Interpretations:
- v_bar is the mean of the projected visual tokens placed in the row (all of its images), computed where the
  image features are (the prefill or a training sequence) and returned, so decode steps reuse the same v_bar:
  a generated token is fused exactly as the same token is in teacher-forced training.
- Every non-image position is a text position, padding included (padding is masked out of attention anyway).
- Image positions are `input_ids == image_token_id` in a pass with pixel values and none in a pass without
  (a generated token with the image token's id stays text), as in the runtime.
- Position ids are `cumsum(attention_mask) - 1` (left padding), as transformers' generate and the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from anchorrt.exporter.visalign.fusion import VisAlignFusion
from torch import nn


@dataclass
class VisAlignOutput:
    logits: torch.Tensor  # [B, S', V] (S' = the positions asked for)
    past_key_values: object
    v_bar: torch.Tensor  # [B, d]: feed it back to the decode steps


class VisAlignLlava(nn.Module):
    def __init__(self, hf_model: nn.Module, fusion: VisAlignFusion):
        super().__init__()
        self.hf = hf_model
        self.fusion = fusion
        config = hf_model.config
        self.image_token_id = int(getattr(config, "image_token_id", None) or config.image_token_index)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32, init: str = "identity",
                        seed: int = 0) -> VisAlignLlava:
        """Load a LLaVA folder; its VisAlign weights when it has them, else a new fusion (`init`)."""
        from anchorrt.exporter.visalign.checkpoint import load_fusion_weights
        from transformers import LlavaForConditionalGeneration

        hf = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype)
        loaded = load_fusion_weights(model_dir)
        if loaded is not None:
            fusion = VisAlignFusion.from_weights(loaded[1])
            fusion.init = loaded[0].init
        else:
            fusion = VisAlignFusion(hf.config.text_config.hidden_size, init=init, seed=seed)
        return cls(hf, fusion.to(dtype)).eval()

    # -- pieces ---------------------------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> projected visual tokens [N, T, d] (transformers' vision tower + projector)."""
        out = self.hf.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        return torch.stack(list(out), dim=0)  # [N, T, d]

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor | None,
              v_bar: torch.Tensor | None, enable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (e' [B, S, d], v_bar [B, d] or None). `features` fill `image_mask` in row-major order; `v_bar` is
        computed from them when not given."""
        embed_tokens = self.hf.get_input_embeddings()
        e = embed_tokens(input_ids.masked_fill(image_mask, 0))  # [B, S, d]; the image id may be out of vocab
        if features is not None and features.numel():
            mask3 = image_mask[..., None]  # [B, S, 1]
            e = e.masked_scatter(mask3, features.reshape(-1, e.shape[-1]).to(e.dtype))
            if v_bar is None:  # the mean of the row's own visual tokens
                count = image_mask.sum(-1, keepdim=True).clamp(min=1).to(e.dtype)  # [B, 1]
                v_bar = (e * mask3).sum(1) / count  # [B, d]
        if v_bar is None:
            if bool(enable.any()):
                raise ValueError("VisAlign needs v_bar in a pass without image features: pass the prefill's v_bar")
            return e, None
        fuse_here = enable[:, None] & ~image_mask  # [B, S]
        return self.fusion(e, v_bar, fuse_here), v_bar

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                v_bar: torch.Tensor | None = None, enable: bool | torch.Tensor = True, past_key_values=None,
                position_ids: torch.Tensor | None = None, use_cache: bool = False,
                logits_to_keep: int = 0) -> VisAlignOutput:
        """input_ids [B, S]; attention_mask [B, P+S]; enable: bool or [B] bool. logits_to_keep=0: every position."""
        b, s = input_ids.shape
        if features is None and pixel_values is not None:
            features = self.image_features(pixel_values)
        if image_mask is None:
            image_mask = (input_ids == self.image_token_id) if features is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        enable = torch.as_tensor(enable, dtype=torch.bool).expand(b) if not torch.is_tensor(enable) else enable.bool()
        embeds, v_bar = self.embed(input_ids, image_mask, features, v_bar, enable)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]  # [B, S]
        out = self.hf(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)
        return VisAlignOutput(out.logits, out.past_key_values, v_bar)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                 max_new_tokens: int, enable: bool | torch.Tensor = True, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int = 0) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy decoding with a KV cache. -> (new tokens per row, each up to and including its first stop token;
        the last-position logits of every pass [B, V])."""
        from transformers import DynamicCache

        eos = set([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []))
        out = self.forward(input_ids, attention_mask, pixel_values=pixel_values, enable=enable,
                           past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        b = input_ids.shape[0]
        rows: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        all_logits = []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()  # [B, V]
            all_logits.append(logits)
            token = logits.argmax(-1)  # [B]
            for i in range(b):
                if not done[i]:
                    rows[i].append(int(token[i]))
                    done[i] = int(token[i]) in eos
            if all(done) or step == max_new_tokens - 1:
                break
            token = torch.where(torch.tensor(done), pad_token_id, token)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            out = self.forward(token[:, None], attention_mask, v_bar=out.v_bar, enable=enable,
                               past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        return rows, all_logits
