"""Torch pieces shared by the architecture modules: the embed and decoder graphs of a Llama-style language model
and their GraphSpecs, and the manifest fields every language model has.

    input_ids, image_features, image_mask ─► embed ─► inputs_embeds ─► decoder(+KV) ─► logits, present.*

- embed:   token embeddings, with image features written at the positions where `image_mask` is true (the
           runtime sets it from the prompt's image-token spans only, so a generated image-token id stays text).
- decoder: the Llama stack with a KV cache; one graph for prefill and decode; logits of the last position only.

LLaVA (exporter/archs/llava.py) and InstructBLIP (exporter/archs/instructblip.py) build these from their own
submodules; the graph inputs and outputs are the same, so the graph passes and the runtime see one contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class GraphSpec:
    role: str
    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple


class EmbedGraph(nn.Module):
    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

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
    def __init__(self, lm: nn.Module, head: nn.Module, num_layers: int):
        super().__init__()
        self.lm = lm
        self.head = head
        self.num_layers = num_layers

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


def head_dim_of(text) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def language_specs(embed_tokens: nn.Module, lm: nn.Module, head: nn.Module, text, tokens_per_image: int,
                   dtype: torch.dtype) -> list[GraphSpec]:
    """The embed and decoder GraphSpecs of a Llama-style text config `text` (tracing inputs included)."""
    d, n_layers, kvh = text.hidden_size, text.num_hidden_layers, text.num_key_value_heads
    head_dim = head_dim_of(text)
    seq = 3 + tokens_per_image
    ids = torch.ones(2, seq, dtype=torch.int64)
    img_mask = torch.zeros(2, seq, dtype=torch.bool)
    img_mask[:, 2:2 + tokens_per_image] = True
    embed_args = (ids, torch.zeros(2, tokens_per_image, d, dtype=dtype), img_mask)

    b, s, p = 2, 5, 3
    past = [torch.zeros(b, kvh, p, head_dim, dtype=dtype) for _ in range(2 * n_layers)]
    dec_args = (torch.zeros(b, s, d, dtype=dtype), torch.ones(b, p + s, dtype=torch.int64),
                torch.arange(p, p + s).repeat(b, 1), past)
    past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    bs = {0: "batch", 1: "sequence"}
    return [
        GraphSpec("embed", EmbedGraph(embed_tokens), embed_args, ["input_ids", "image_features", "image_mask"],
                  ["inputs_embeds"], (bs, {0: "num_images"}, bs)),
        GraphSpec("decoder", DecoderGraph(lm, head, n_layers), dec_args,
                  ["inputs_embeds", "attention_mask", "position_ids", *past_names], ["logits", *present_names],
                  (bs, {0: "batch", 1: "total_length"}, bs, [{0: "batch", 2: "past_length"}] * len(past_names))),
    ]


def text_dims(text) -> dict[str, Any]:
    return {
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "num_layers": text.num_hidden_layers,
        "num_heads": text.num_attention_heads,
        "num_kv_heads": text.num_key_value_heads,
        "head_dim": head_dim_of(text),
        "max_position_embeddings": text.max_position_embeddings,
    }


def special_tokens(config, text, generation_config) -> dict[str, Any]:
    """bos / eos list / pad ids: the generation config's eos first, the text config's otherwise; pad falls back to
    the first eos (what transformers' generate does)."""
    gen = generation_config
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = text.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else text.pad_token_id
    if pad is None:
        pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return {"bos_token_id": text.bos_token_id, "eos_token_ids": eos_ids, "pad_token_id": int(pad)}


def load_error(exc: Exception, path, what: str):
    from anchorrt.runtime.errors import CheckpointError

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return CheckpointError(f"cannot load '{path}' as {what}: {first[:300]}")
