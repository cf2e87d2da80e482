"""InstructBLIP with a Llama/Vicuna language model (`InstructBlipForConditionalGeneration`): four graphs.

    pixel_values ─► vision ─► image_embeds [N, 1+P, dv] ─┐
    qformer_input_ids, qformer_attention_mask ────────► qformer ─► image_features [N, Q, d] ─┐
    input_ids, image_mask ───────────────────────────────────────────────────────────► embed ─► decoder(+KV) ─► logits

- vision:  the EVA ViT: patch + class embeddings, encoder, post-layernorm; every token (CLS included) is a key of
           the Q-Former's cross-attention, as in transformers' `get_image_features`.
- qformer: the `Q` learned query tokens followed by the instruction (the prompt, tokenized by the Q-Former's BERT
           WordPiece tokenizer: [CLS] text [SEP]) go through the BERT-style Q-Former; the query rows cross-attend to
           the image tokens in every `cross_attention_frequency`-th layer; the Q query outputs go through the
           language projection. METHODS.md "Visual positions": these Q outputs are `V` in the language model.
- embed, decoder: the Llama language model, as for LLaVA (exporter/archs/_common.py).

Prompt (transformers' InstructBlipProcessor): `Q` image tokens, then the LM tokenizer's encoding of the raw prompt
(BOS first); no chat template. The manifest records this under "instructblip" for the runtime module
(runtime/archs/instructblip.py), and the artifact ships the Q-Former tokenizer as `qformer_tokenizer.json`.

Only decoder-only language models: the Flan-T5 variants (encoder-decoder) are refused by `check_config`, from
config.json, before any weight is read.
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

QFORMER_TOKENIZER_FILE = "qformer_tokenizer.json"
SUPPORTED_TEXT_MODELS = ("llama",)


class VisionGraph(nn.Module):
    def __init__(self, blip: nn.Module):
        super().__init__()
        self.vision = blip.vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values).last_hidden_state  # [N, 1+P, dv], after the post-layernorm


class QFormerGraph(nn.Module):
    def __init__(self, blip: nn.Module):
        super().__init__()
        self.query_tokens = blip.query_tokens  # [1, Q, dq]
        self.qformer = blip.qformer
        self.projection = blip.language_projection

    def forward(self, image_embeds: torch.Tensor, qformer_input_ids: torch.Tensor,
                qformer_attention_mask: torch.Tensor) -> torch.Tensor:
        n = image_embeds.shape[0]
        queries = self.query_tokens.expand(n, -1, -1)
        q = queries.shape[1]
        mask = torch.cat([torch.ones(n, q, dtype=qformer_attention_mask.dtype), qformer_attention_mask], dim=1)
        # every image token is visible to every query (transformers passes an all-ones mask: adding 0 changes nothing)
        out = self.qformer(input_ids=qformer_input_ids, attention_mask=mask, query_embeds=queries,
                           encoder_hidden_states=image_embeds, encoder_attention_mask=None)
        return self.projection(out.last_hidden_state[:, :q, :])  # [N, Q, d]


@register_arch("InstructBlipForConditionalGeneration")
class InstructBlipArch:
    model_type = "instructblip"

    @classmethod
    def check_config(cls, config: dict, preprocessor: dict | None) -> dict:
        """Pre-load check (exporter/registry.py, before any weight is read): a decoder-only Llama language model
        (Flan-T5 refused), the image-token index, and an image processor the runtime reproduces (BLIP's). -> the
        decoder's layer count and which methods go into another graph (CLVA: the Q-Former, whose layers its
        `--clva-*` choices name; the Q-Former pass checks those)."""
        from anchorrt.exporter.preprocessing import params_from_config

        cls._check_language_model(config)
        if preprocessor is None:
            raise CheckpointError("the checkpoint has no image-processor config (preprocessor_config.json or "
                                  "processor_config.json); save the processor with processor.save_pretrained(folder)")
        params_from_config(preprocessor, "the checkpoint's image-processor config")
        facts: dict[str, Any] = {"method_graphs": {"clva": "qformer"}}
        layers = config["text_config"].get("num_hidden_layers")
        if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0:
            facts["num_layers"] = layers
        return facts

    @staticmethod
    def _check_language_model(config: dict) -> None:
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        kind = text.get("model_type", "opt")  # transformers' default text config for InstructBLIP is OPT
        if kind not in SUPPORTED_TEXT_MODELS:
            extra = " (an encoder-decoder: Flan-T5 InstructBLIP is not supported)" if kind in ("t5", "mt5", "umt5") \
                else ""
            raise CheckpointError(f"InstructBLIP with a '{kind}' language model{extra} cannot be exported; AnchorRT "
                                  "exports the Vicuna/Llama variants (e.g. Salesforce/instructblip-vicuna-7b)")
        if not isinstance(config.get("image_token_index"), int):
            raise CheckpointError("this InstructBLIP config.json has no 'image_token_index' (a checkpoint saved by "
                                  "transformers < 4.47); re-save it with a current transformers or use the hub's "
                                  "updated Salesforce/instructblip-vicuna-7b")

    @staticmethod
    def verify_torch_side(model_dir):
        """verify's torch side (exporter/verify.py): the default one, with the decode steps on the language model
        (InstructBLIP's own forward needs pixel_values at every call)."""
        from anchorrt.exporter.verify import TransformersSide

        class _Side(TransformersSide):
            @property
            def step_model(self):
                return self.model.language_model

        return _Side("InstructBlipForConditionalGeneration", model_dir)

    def __init__(self, checkpoint, dtype: torch.dtype = torch.float32):
        from transformers import InstructBlipForConditionalGeneration

        self._check_language_model(checkpoint.config)  # export runs check_config before loading
        self.checkpoint = checkpoint
        try:
            self.model = InstructBlipForConditionalGeneration.from_pretrained(
                checkpoint.path, dtype=dtype, attn_implementation="sdpa", use_safetensors=not checkpoint.uses_pickle,
            ).eval()
        except Exception as exc:  # noqa: BLE001 - transformers/safetensors raise many types; the user needs one line
            raise _common.load_error(exc, checkpoint.path, "InstructBLIP") from None
        # The Q-Former runs in the eager form (MatMul / Softmax) so that CLVA's Q-Former pass finds its cross-attention
        self.model.qformer.config._attn_implementation = "eager"
        self.config = self.model.config
        self.text = self.config.text_config
        self.vision = self.config.vision_config
        self.qformer = self.config.qformer_config

    @property
    def num_query_tokens(self) -> int:
        return int(self.config.num_query_tokens)

    def graphs(self, image_size: tuple[int, int]) -> list[GraphSpec]:
        dtype = self.model.dtype
        h, w = image_size
        vision = VisionGraph(self.model)
        pixel = torch.zeros(2, 3, h, w, dtype=dtype)
        with torch.no_grad():
            embeds = vision(pixel)
        lq = 5
        q_args = (embeds, torch.ones(2, lq, dtype=torch.int64), torch.ones(2, lq, dtype=torch.int64))
        self.tokens_per_image = self.num_query_tokens
        lm = self.model.language_model  # LlamaForCausalLM
        return [
            GraphSpec("vision", vision, (pixel,), ["pixel_values"], ["image_embeds"], ({0: "num_images"},)),
            GraphSpec("qformer", QFormerGraph(self.model), q_args,
                      ["image_embeds", "qformer_input_ids", "qformer_attention_mask"], ["image_features"],
                      ({0: "num_images"}, {0: "num_images", 1: "qformer_sequence"},
                       {0: "num_images", 1: "qformer_sequence"})),
            *language_specs(lm.model.embed_tokens, lm.model, lm.lm_head, self.text, self.tokens_per_image, dtype),
        ]

    def manifest_fields(self) -> dict[str, Any]:
        tokens = _common.special_tokens(self.config, self.text, getattr(self.model, "generation_config", None))
        patches = (self.vision.image_size // self.vision.patch_size) ** 2
        return {
            "model_type": self.model_type,
            "architecture": self.checkpoint.architecture,
            "dims": {
                **_common.text_dims(self.text),
                "image_size": self.vision.image_size,
                "patch_size": self.vision.patch_size,
            },
            "tokens": {**tokens, "image_token_id": int(self.config.image_token_index),
                       "tokens_per_image": self.num_query_tokens},
            "instructblip": {
                "num_query_tokens": self.num_query_tokens,
                "image_tokens": patches + 1,  # keys of the cross-attention: CLS + patches
                "qformer_layers": self.qformer.num_hidden_layers,
                "qformer_heads": self.qformer.num_attention_heads,
                "cross_attention_frequency": self.qformer.cross_attention_frequency,
                "cross_attention_layers": cross_attention_layers(self.qformer.num_hidden_layers,
                                                                 self.qformer.cross_attention_frequency),
                "qformer_max_length": self.qformer.max_position_embeddings,
                "qformer_tokenizer": QFORMER_TOKENIZER_FILE,
                "prompt_order": "image_tokens_then_bos",
                "method_graphs": {"clva": "qformer"},  # METHODS.md: InstructBLIP's CLVA runs inside the Q-Former
            },
        }

    def prompt_template(self, processor) -> dict[str, str]:
        """InstructBlipProcessor feeds the raw prompt to both tokenizers (no chat template)."""
        return {"template": "{prompt}", "source": "InstructBlipProcessor (raw prompt, image tokens before BOS)"}

    def write_extra_files(self, processor, folder: Path) -> None:
        """The Q-Former's WordPiece tokenizer, as tokenizers JSON, for the runtime's instruction encoding."""
        qtok = getattr(processor, "qformer_tokenizer", None)
        backend = getattr(qtok, "backend_tokenizer", None) or getattr(qtok, "_tokenizer", None)
        if backend is None:
            raise CheckpointError(f"'{self.checkpoint.path}' has no fast Q-Former tokenizer (qformer_tokenizer/); "
                                  "save the InstructBlipProcessor with transformers")
        backend.save(str(folder / QFORMER_TOKENIZER_FILE))


def cross_attention_layers(num_layers: int, frequency: int) -> list[int]:
    """Q-Former layers with cross-attention (transformers: `layer_idx % cross_attention_frequency == 0`)."""
    return [i for i in range(num_layers) if i % frequency == 0]
