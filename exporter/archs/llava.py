"""LLaVA-1.5 (`LlavaForConditionalGeneration`): the three graphs and the manifest fields.

    pixel_values ─► vision ─► image_features ─┐
    input_ids, image_mask ─────────────────► embed ─► inputs_embeds ─► decoder(+KV) ─► logits, present.*

- vision:  CLIP tower → hidden state of `vision_feature_layer` (int or list, concatenated) → drop CLS when the
           strategy is "default" → multimodal projector.  [N,3,H,W] → [N,T,d]
- embed:   token embeddings, with image features written at the positions where `image_mask` is true (the
           runtime sets it from the prompt's image-token spans only, so a generated image-token id stays text).
- decoder: the Llama stack with a KV cache; one graph for prefill and decode; logits of the last position only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from anchorrt.exporter.archs import _common
from anchorrt.exporter.archs._common import GraphSpec, language_specs
from anchorrt.exporter.registry import register_arch
from anchorrt.runtime.errors import CheckpointError
from torch import nn

DEFAULT_PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
_SENTINEL = "\x00ANCHORRT_PROMPT\x00"


class VisionGraph(nn.Module):
    def __init__(self, llava: nn.Module, feature_layer: int | list[int], strategy: str):
        super().__init__()
        self.tower = llava.model.vision_tower
        self.projector = llava.model.multi_modal_projector
        self.feature_layer = feature_layer
        self.strategy = strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        picked = [hidden[i] for i in layers]  # each [N, 1+P, dv]
        if self.strategy == "default":
            picked = [h[:, 1:] for h in picked]  # drop CLS
        feats = torch.cat(picked, dim=-1)
        return self.projector(feats)  # [N, T, d]


class EmbedGraph(_common.EmbedGraph):
    def __init__(self, llava: nn.Module):
        super().__init__(llava.model.language_model.embed_tokens)


class DecoderGraph(_common.DecoderGraph):
    def __init__(self, llava: nn.Module):
        super().__init__(llava.model.language_model, llava.lm_head, llava.config.text_config.num_hidden_layers)


@register_arch("LlavaForConditionalGeneration")
class LlavaArch:
    model_type = "llava"

    def __init__(self, checkpoint, dtype: torch.dtype = torch.float32):
        self.checkpoint = checkpoint
        try:
            self.model = self._load(checkpoint, dtype)
        except Exception as exc:  # noqa: BLE001 - transformers/safetensors raise many types; the user needs one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise CheckpointError(f"cannot load '{checkpoint.path}' as LLaVA: {first[:300]}") from None
        self.config = self.model.config
        self.text = self.config.text_config
        self.vision = self.config.vision_config

    def _load(self, checkpoint, dtype):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(
            checkpoint.path, dtype=dtype, attn_implementation="sdpa", use_safetensors=not checkpoint.uses_pickle,
        ).eval()

    @classmethod
    def check_config(cls, config: dict, preprocessor: dict | None) -> dict:
        """Pre-load check (exporter/registry.py): the image processor is one the runtime reproduces, and the
        decoder's layer count, from config.json alone. transformers' LlavaConfig fills a missing text_config with
        Llama defaults, so a missing count is left unknown here rather than guessed."""
        from anchorrt.exporter.preprocessing import params_from_config

        if preprocessor is None:
            raise CheckpointError("the checkpoint has no image-processor config (preprocessor_config.json or "
                                  "processor_config.json); save the processor with processor.save_pretrained(folder)")
        params_from_config(preprocessor, "the checkpoint's image-processor config")
        text = config.get("text_config")
        layers = text.get("num_hidden_layers") if isinstance(text, dict) else None
        if layers is None:
            return {}
        if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
            raise CheckpointError(f"config.json: text_config.num_hidden_layers must be a positive integer, got "
                                  f"{layers!r}; restore the file")
        return {"num_layers": layers}

    # -- graphs ------------------------------------------------------------------------------------------
    def graphs(self, image_size: tuple[int, int]) -> list[GraphSpec]:
        cfg, text = self.config, self.text
        dtype = self.model.dtype
        h, w = image_size
        vision = VisionGraph(self.model, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
        pixel = torch.zeros(2, 3, h, w, dtype=dtype)
        with torch.no_grad():
            feats = vision(pixel)
        self.tokens_per_image = int(feats.shape[1])
        self.head_dim = _common.head_dim_of(text)
        return [
            GraphSpec("vision", vision, (pixel,), ["pixel_values"], ["image_features"], ({0: "num_images"},)),
            *language_specs(self.model.model.language_model.embed_tokens, self.model.model.language_model,
                            self.model.lm_head, text, self.tokens_per_image, dtype),
        ]

    # -- manifest fields ---------------------------------------------------------------------------------
    def manifest_fields(self) -> dict[str, Any]:
        text = self.text
        tokens = _common.special_tokens(self.config, text, getattr(self.model, "generation_config", None))
        return {
            "model_type": self.model_type,
            "architecture": self.checkpoint.architecture,
            "dims": {
                **_common.text_dims(text),
                "image_size": self.vision.image_size,
                "patch_size": self.vision.patch_size,
                "vision_feature_layer": self.config.vision_feature_layer,
                "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
            },
            "tokens": {
                **tokens,
                "image_token_id": int(self.config.image_token_id),
                "tokens_per_image": self.tokens_per_image,
            },
        }

    def prompt_template(self, processor) -> dict[str, str]:
        """Render the checkpoint's chat template once with a sentinel, so the runtime needs no Jinja."""
        template = getattr(processor, "chat_template", None) if processor is not None else None
        if template:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
            try:
                rendered = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # a broken template is the checkpoint's problem: fall back, and say so
                first = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
                return {"template": DEFAULT_PROMPT_TEMPLATE, "source": f"default (chat template failed: {first})"}
            if rendered.count(_SENTINEL) == 1:
                out = {"template": rendered.replace(_SENTINEL, "{prompt}"), "source": "chat_template"}
                separator = _image_separator(processor, rendered)
                if separator is not None:
                    out["image_separator"] = separator
                return out
        return {"template": DEFAULT_PROMPT_TEMPLATE, "source": "default (LLaVA-1.5 conversation format)"}


def _image_separator(processor, one: str) -> str | None:
    """What the chat template puts between two consecutive images of one message (LLaVA-1.5: "\n" after each
    "<image>"; interleave: nothing): the template rendered with two images, less the one-image rendering. The
    runtime expands the template's image placeholder to k placeholders joined by it. None: not derivable."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
    image = getattr(processor, "image_token", None) or "<image>"
    try:
        two = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot take two images: one image per prompt
        return None
    if one.count(image) != 1 or two.count(image) != 2:
        return None
    first = two.index(image) + len(image)
    separator = two[first:two.index(image, first)]
    joined = one.replace(image, image + separator + image)
    return separator if joined == two else None


def load_processor(path: Path):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"cannot load the processor/tokenizer of '{path}': {first[:300]}") from None
