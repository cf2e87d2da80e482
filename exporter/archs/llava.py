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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from anchorrt.exporter.registry import register_arch
from anchorrt.runtime.errors import CheckpointError
from torch import nn

DEFAULT_PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
_SENTINEL = "\x00ANCHORRT_PROMPT\x00"


@dataclass
class GraphSpec:
    role: str
    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple


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


class EmbedGraph(nn.Module):
    def __init__(self, llava: nn.Module):
        super().__init__()
        self.embed_tokens = llava.model.language_model.embed_tokens

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        # image_mask positions take the image features in order (row-major over the batch), as transformers'
        # masked_scatter does. A zero row is prepended so that non-image positions gather something harmless and a
        # decode step can pass zero images.
        ids = torch.where(image_mask, torch.zeros_like(input_ids), input_ids)  # the image id may be out of vocab
        embeds = self.embed_tokens(ids)  # [B, S, d]
        d = embeds.shape[-1]
        flat = torch.cat([torch.zeros(1, d, dtype=embeds.dtype), image_features.reshape(-1, d)], dim=0)  # [1+N*T, d]
        # 1-based feature index at image positions, else 0. The running count is summed in float32 (exact below
        # 2**24 image tokens per batch) because TensorRT's ONNX parser takes CumSum on floats only.
        mask_f = image_mask.reshape(-1).to(torch.float32)
        index = (torch.cumsum(mask_f, dim=0) * mask_f).to(torch.int64)
        gathered = flat[index].reshape(embeds.shape)
        return torch.where(image_mask.unsqueeze(-1), gathered, embeds)


class DecoderGraph(nn.Module):
    def __init__(self, llava: nn.Module):
        super().__init__()
        self.lm = llava.model.language_model
        self.head = llava.lm_head
        self.num_layers = llava.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        logits = self.head(out.last_hidden_state[:, -1:, :])  # [B, 1, V]: generation needs the last position only
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]  # [B, KVH, P+S, D]
        return (logits, *present)


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
        d = text.hidden_size
        n_layers = text.num_hidden_layers
        kvh = text.num_key_value_heads
        head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads
        self.head_dim = head_dim

        seq = 3 + self.tokens_per_image
        ids = torch.ones(2, seq, dtype=torch.int64)
        img_mask = torch.zeros(2, seq, dtype=torch.bool)
        img_mask[:, 2:2 + self.tokens_per_image] = True
        embed_args = (ids, torch.zeros(2, self.tokens_per_image, d, dtype=dtype), img_mask)

        b, s, p = 2, 5, 3
        past = [torch.zeros(b, kvh, p, head_dim, dtype=dtype) for _ in range(2 * n_layers)]
        dec_args = (torch.zeros(b, s, d, dtype=dtype), torch.ones(b, p + s, dtype=torch.int64),
                    torch.arange(p, p + s).repeat(b, 1), past)
        past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        present_names = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        bs = {0: "batch", 1: "sequence"}
        return [
            GraphSpec("vision", vision, (pixel,), ["pixel_values"], ["image_features"], ({0: "num_images"},)),
            GraphSpec("embed", EmbedGraph(self.model), embed_args, ["input_ids", "image_features", "image_mask"],
                      ["inputs_embeds"], (bs, {0: "num_images"}, bs)),
            GraphSpec("decoder", DecoderGraph(self.model), dec_args,
                      ["inputs_embeds", "attention_mask", "position_ids", *past_names], ["logits", *present_names],
                      (bs, {0: "batch", 1: "total_length"}, bs, [{0: "batch", 2: "past_length"}] * len(past_names))),
        ]

    # -- manifest fields ---------------------------------------------------------------------------------
    def manifest_fields(self) -> dict[str, Any]:
        text = self.text
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = text.eos_token_id
        eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        pad = self.config.pad_token_id if getattr(self.config, "pad_token_id", None) is not None else text.pad_token_id
        if pad is None:
            pad = getattr(gen, "pad_token_id", None) if gen is not None else None
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        return {
            "model_type": self.model_type,
            "architecture": self.checkpoint.architecture,
            "dims": {
                "hidden_size": text.hidden_size,
                "vocab_size": text.vocab_size,
                "num_layers": text.num_hidden_layers,
                "num_heads": text.num_attention_heads,
                "num_kv_heads": text.num_key_value_heads,
                "head_dim": self.head_dim,
                "max_position_embeddings": text.max_position_embeddings,
                "image_size": self.vision.image_size,
                "patch_size": self.vision.patch_size,
                "vision_feature_layer": self.config.vision_feature_layer,
                "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
            },
            "tokens": {
                "bos_token_id": text.bos_token_id,
                "eos_token_ids": eos_ids,
                "pad_token_id": int(pad),
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
