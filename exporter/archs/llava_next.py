"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, llava-hf/llava-v1.6-*-hf): the three graphs and the manifest.

    tiles [N_tiles, 3, t, t] ─► vision ─► image_features [N_tiles, P, d], image_newline [d]
                                          │ (runtime/archs/llava_next.py: unpad + newline packing, numpy)
                                          ▼
    input_ids, image_mask, packed features [T_total, d] ─► embed ─► inputs_embeds ─► decoder(+KV) ─► logits

- vision:  the CLIP tower on every tile (the base image and the grid tiles alike) → `vision_feature_layer` → CLS
           dropped ("default") → projector; plus the learned `image_newline` vector as a second output, so the
           runtime can pack without torch. The packing depends on each image's size (any-resolution tiling), so it
           lives in the runtime arch module, not in a graph.
- embed:   as LLaVA-1.5's, but the features come flat `[num_image_tokens, d]` (a variable count per image).
- decoder: the language model (Mistral for v1.6-mistral, Llama for v1.6-vicuna) with a KV cache, LLaVA-1.5's graph.

LLaVA-NeXT's `image_newline` positions are image positions (METHODS.md, "Visual positions across architectures";
runtime/archs/llava_next.py says why). LLaVA-NeXT-Video and LLaVA-OneVision are other architectures (their
`architectures` names differ) and are refused before any weights load (exporter/checkpoint.py lists what is
supported); OneVision's anyres-max tiling with its own unpadding and pooling is not covered by this machinery.
"""

from __future__ import annotations

from typing import Any

import torch
from anchorrt.exporter.archs.llava import DecoderGraph, EmbedGraph, GraphSpec, LlavaArch, VisionGraph
from anchorrt.exporter.registry import register_arch
from anchorrt.runtime.errors import CheckpointError
from torch import nn


class NextVisionGraph(nn.Module):
    """Tiles → per-tile projected features, and the image_newline vector."""

    def __init__(self, model: nn.Module, feature_layer, strategy: str):
        super().__init__()
        self.tiles = VisionGraph(model, feature_layer, strategy)
        self.image_newline = model.model.image_newline

    def forward(self, pixel_values: torch.Tensor):
        return self.tiles(pixel_values), self.image_newline * 1.0  # [N, P, d], [d]


@register_arch("LlavaNextForConditionalGeneration")
class LlavaNextArch(LlavaArch):
    model_type = "llava_next"

    @classmethod
    def check_config(cls, config: dict, preprocessor: dict | None = None) -> dict:
        """Pre-load check (exporter/registry.py): the feature strategy from config.json, then LLaVA-1.5's checks
        (image processor, layer count) where the parent class has them. -> facts for the generic checks."""
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise CheckpointError(f"LLaVA-NeXT with vision_feature_select_strategy {strategy!r} is not supported "
                                  "(its tiles are packed without the CLS token: 'default' only)")
        parent = getattr(super(), "check_config", None)
        return dict(parent(config, preprocessor) or {}) if parent is not None else {}

    def _load(self, checkpoint, dtype):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration.from_pretrained(
            checkpoint.path, dtype=dtype, attn_implementation="sdpa", use_safetensors=not checkpoint.uses_pickle,
        ).eval()

    def graphs(self, image_size: tuple[int, int]) -> list[GraphSpec]:
        cfg, text = self.config, self.text
        dtype = self.model.dtype
        h, w = image_size
        vision = NextVisionGraph(self.model, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
        pixel = torch.zeros(3, 3, h, w, dtype=dtype)
        with torch.no_grad():
            feats, _ = vision(pixel)
        self.tokens_per_image = int(feats.shape[1])  # P: one tile's features
        d = text.hidden_size
        self.head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads
        n = 2 * self.tokens_per_image + 3
        ids = torch.ones(2, n + 3, dtype=torch.int64)
        img_mask = torch.zeros(2, n + 3, dtype=torch.bool)
        img_mask[0, 2:2 + n] = True
        img_mask[1, 1:1 + self.tokens_per_image] = True
        embed_args = (ids, torch.zeros(n + self.tokens_per_image, d, dtype=dtype), img_mask)
        specs = super().graphs(image_size)  # LLaVA-1.5's decoder graph and names
        decoder = next(s for s in specs if s.role == "decoder")
        bs = {0: "batch", 1: "sequence"}
        return [
            GraphSpec("vision", vision, (pixel,), ["pixel_values"], ["image_features", "image_newline"],
                      ({0: "num_tiles"},)),
            GraphSpec("embed", EmbedGraph(self.model), embed_args, ["input_ids", "image_features", "image_mask"],
                      ["inputs_embeds"], (bs, {0: "num_image_tokens"}, bs)),
            GraphSpec("decoder", DecoderGraph(self.model), decoder.args, decoder.input_names, decoder.output_names,
                      decoder.dynamic_shapes),
        ]

    def manifest_fields(self) -> dict[str, Any]:
        fields = super().manifest_fields()
        vision = self.vision
        fields["llava_next"] = {
            "image_grid_pinpoints": [[int(a), int(b)] for a, b in self.config.image_grid_pinpoints],
            "patches_per_side": vision.image_size // vision.patch_size,
        }
        return fields
