"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

    patches [N, C*T*P*P], vision_position_ids [N, 2], segment_ids [N] (, window_ids [N], merge_order [N/m²])
        ─► vision ─► image_features [N/m², d]                                     (m = spatial_merge_size, 2)
    input_ids, image_features, image_mask ─► embed ─► inputs_embeds
    inputs_embeds, attention_mask, position_ids [3, B, S] (M-RoPE), past.* ─► decoder ─► logits, present.*

Dynamic resolution: the image processor resizes each image to a multiple of P*m (smart_resize), so the patch count
N = t*h*w varies per image and the language model sees N/m² image-pad tokens per image. Everything data-dependent
that transformers computes from `grid_thw` in Python (the vision tower's 2-D rotary positions, the per-image
attention segments `cu_seqlens`, Qwen2.5's window order and `cu_window_seqlens`) is computed by the runtime in
numpy (runtime/archs/qwen2_vl.py, the same rules) and fed to the graph as small integer tensors:

- `vision_position_ids` [N, 2]: (row, column) of each patch, laid out block-major over m x m merge blocks; the graph
  turns them into cos/sin with the tower's own `inv_freq` (rotary computed in-graph from fed positions).
- `segment_ids` [N]: the image each patch belongs to. transformers runs attention image by image (cu_seqlens);
  the graph runs one attention over all patches with an additive bias that is 0 within a segment and -inf across,
  which is the same softmax (every row sees at least itself).
- Qwen2.5 only: the runtime feeds the patches, and their positions, already in window order (the permutation is per
  merge block, and the patch embedding is per patch, so permuting before it equals transformers' permuting after);
  `window_ids` [N] are the windows of the windowed layers (`cu_window_seqlens`); the full-attention layers
  (`fullatt_block_indexes`) use `segment_ids`; `merge_order` [N/m²] = argsort(window_index) puts the merged tokens
  back in raster order.

The decoder takes M-RoPE position ids [3, B, S] (temporal, height, width; `get_rope_index` in the runtime) and
rotates with `mrope_section`; otherwise it is the Qwen2 decoder (q/k/v biases, GQA) with a KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from anchorrt.exporter.archs.llava import EmbedGraph, GraphSpec
from anchorrt.exporter.registry import register_arch, register_refusal
from anchorrt.runtime.errors import CheckpointError
from torch import nn

DEFAULT_SYSTEM = "You are a helpful assistant."
_SENTINEL = "\x00ANCHORRT_PROMPT\x00"
# The Qwen2-VL chat format for one user turn with one image (the checkpoints' own chat template renders the same).
DEFAULT_PROMPT_TEMPLATE = (
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _segment_bias(ids: torch.Tensor) -> torch.Tensor:
    """[N] segment ids → [1, 1, N, N] additive bias: 0 where query and key share a segment, -inf elsewhere."""
    same = ids[:, None] == ids[None, :]
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(same, zero, torch.full((), float("-inf")))[None, None]


class VisionGraph(nn.Module):
    """The vision tower with attention segments given as ids (see the module docstring), then the patch merger.

        x = patch_embed(patches)                                  # [N, D]
        for each block: x += proj(softmax(q k^T / sqrt(dh) + bias_segments_or_windows) v);  x += mlp(norm2(x))
        merger(x)[merge_order]                                     # [N/m², d]
    """

    def __init__(self, visual: nn.Module, windowed: bool, fullatt_blocks: tuple[int, ...]):
        super().__init__()
        self.visual = visual
        self.windowed = windowed
        self.fullatt_blocks = set(fullatt_blocks)

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos, sin, bias) -> torch.Tensor:
        n = x.shape[0]
        heads = attn.num_heads
        q, k, v = attn.qkv(x).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # each [N, H, dh]
        cos_, sin_ = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [N, 1, dh]
        q = q * cos_ + _rotate_half(q) * sin_
        k = k * cos_ + _rotate_half(k) * sin_
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, N, dh]
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling + bias  # [1, H, N, N]
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v)  # [1, H, N, dh]
        return attn.proj(out[0].transpose(0, 1).reshape(n, -1))

    def forward(self, pixel_values, vision_position_ids, segment_ids, window_ids=None, merge_order=None):
        visual = self.visual
        x = visual.patch_embed(pixel_values)  # [N, D]
        cos, sin = visual.rotary_pos_emb(x, vision_position_ids)  # [N, dh] each
        full = _segment_bias(segment_ids)
        window = _segment_bias(window_ids) if self.windowed else full
        for i, blk in enumerate(visual.blocks):
            bias = full if (not self.windowed or i in self.fullatt_blocks) else window
            x = x + self._attention(blk.attn, blk.norm1(x), cos, sin, bias)
            x = x + blk.mlp(blk.norm2(x))
        merged = visual.merger(x)  # [N/m², d]
        if self.windowed:
            merged = merged[merge_order]
        return merged


class DecoderGraph(nn.Module):
    """The Qwen2 language model with M-RoPE position ids [3, B, S] and a KV cache; logits of the last position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model.model.language_model
        self.head = model.lm_head
        self.num_layers = model.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      cache=cache, use_cache=True)
        logits = self.head(out.last_hidden_state[:, -1:, :])  # [B, 1, V]
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]  # [B, KVH, P+S, D]
        return (logits, *present)


class _EmbedSource(nn.Module):
    """Gives llava.EmbedGraph the `model.language_model.embed_tokens` path it reads."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.model


def _vision_settings(vision) -> dict[str, Any]:
    windowed = hasattr(vision, "fullatt_block_indexes")
    return {
        "patch_size": int(vision.patch_size),
        "temporal_patch_size": int(vision.temporal_patch_size),
        "merge_size": int(vision.spatial_merge_size),
        "in_channels": int(vision.in_channels),
        "windowed": windowed,
        "window_size": int(vision.window_size) if windowed else None,
        "fullatt_block_indexes": [int(i) for i in vision.fullatt_block_indexes] if windowed else [],
    }


# Qwen-VL (v1, Qwen/Qwen-VL-Chat): `QWenLMHeadModel` with `auto_map`, i.e. the checkpoint's own modeling_qwen.py,
# which this project never runs (remote code). Refused from config.json alone, before any weights load.
register_refusal(
    "Qwen-VL (v1) checkpoints (QWenLMHeadModel) need the checkpoint's own remote code, which AnchorRT never runs; "
    "use Qwen2-VL or Qwen2.5-VL instead (e.g. Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct)",
    "QWenLMHeadModel",
)


@register_arch("Qwen2VLForConditionalGeneration")
class Qwen2VLArch:
    """Both generations share the text side (Qwen2 + M-RoPE); Qwen2.5 adds windowed vision attention, RMSNorm and a
    gated MLP in the tower (reused from the checkpoint's modules, so only attention and segments are ours)."""

    model_type = "qwen2_vl"

    def __init__(self, checkpoint, dtype: torch.dtype = torch.float32):
        import transformers

        self.checkpoint = checkpoint
        self.preprocessing_params(checkpoint.path)  # a bad or missing image-processor config fails before weights load
        cls = getattr(transformers, checkpoint.architecture)
        try:
            self.model = cls.from_pretrained(checkpoint.path, dtype=dtype, attn_implementation="sdpa",
                                             use_safetensors=not checkpoint.uses_pickle).eval()
        except Exception as exc:  # noqa: BLE001 - transformers/safetensors raise many types; the user needs one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise CheckpointError(f"cannot load '{checkpoint.path}' as {checkpoint.architecture}: {first[:300]}") from None
        self.config = self.model.config
        self.text = self.config.text_config
        self.vision = self.config.vision_config
        self.settings = _vision_settings(self.vision)

    # -- pre-load checks ----------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: dict, preprocessor: dict | None) -> dict:
        """Pre-load check (issue 13's hook in exporter/registry.py): the image processor is a Qwen2-VL one the
        runtime reproduces, and the decoder's layer count from config.json alone (the released configs keep the
        text fields at the top level; transformers 5 saves them under text_config). -> {"num_layers": L} or {}."""
        from anchorrt.exporter.preprocessing_qwen2_vl import params_from_config

        if preprocessor is None:
            raise CheckpointError("the checkpoint has no image-processor config (preprocessor_config.json or "
                                  "processor_config.json); copy the checkpoint's preprocessor_config.json into it")
        params_from_config(preprocessor, "the checkpoint's image-processor config")
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        layers = text.get("num_hidden_layers")
        if layers is None:
            return {}
        if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
            raise CheckpointError(f"config.json: num_hidden_layers must be a positive integer, got {layers!r}; "
                                  "restore the file")
        return {"num_layers": layers}

    # -- graphs ------------------------------------------------------------------------------------------
    def graphs(self, image_size=None) -> list[GraphSpec]:
        from anchorrt.runtime.archs.qwen2_vl import vision_feeds

        text, s = self.text, self.settings
        dtype = self.model.dtype
        d = text.hidden_size
        patch_dim = s["in_channels"] * s["temporal_patch_size"] * s["patch_size"] ** 2
        # two images of different grids so that no dim is specialised (t, h, w in patches)
        grids = [(1, 4, 6), (1, 8, 4)] if not s["windowed"] else [(1, 8, 12), (1, 4, 4)]
        feeds = vision_feeds(grids, s)
        n = int(sum(t * h * w for t, h, w in grids))
        pixel = torch.zeros(n, patch_dim, dtype=dtype)
        names = ["pixel_values", "vision_position_ids", "segment_ids"]
        args = [pixel, torch.from_numpy(feeds["vision_position_ids"]), torch.from_numpy(feeds["segment_ids"])]
        dyn: list[dict] = [{0: "num_patches"}, {0: "num_patches"}, {0: "num_patches"}]
        if s["windowed"]:
            names += ["window_ids", "merge_order"]
            args += [torch.from_numpy(feeds["window_ids"]), torch.from_numpy(feeds["merge_order"])]
            dyn += [{0: "num_patches"}, {0: "num_image_tokens"}]
        vision = VisionGraph(self.model.model.visual, s["windowed"], tuple(s["fullatt_block_indexes"]))
        n_tokens = n // s["merge_size"] ** 2

        n_layers = text.num_hidden_layers
        kvh = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads
        seq = 3 + n_tokens
        ids = torch.ones(2, seq, dtype=torch.int64)
        img_mask = torch.zeros(2, seq, dtype=torch.bool)
        img_mask[0, 2:2 + n_tokens] = True
        embed_args = (ids, torch.zeros(n_tokens, d, dtype=dtype), img_mask)

        b, sq, p = 2, 5, 3
        past = [torch.zeros(b, kvh, p, self.head_dim, dtype=dtype) for _ in range(2 * n_layers)]
        dec_args = (torch.zeros(b, sq, d, dtype=dtype), torch.ones(b, p + sq, dtype=torch.int64),
                    torch.arange(p, p + sq).repeat(3, b, 1), past)
        past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        present_names = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        bs = {0: "batch", 1: "sequence"}
        return [
            GraphSpec("vision", vision, tuple(args), names, ["image_features"], tuple(dyn)),
            GraphSpec("embed", EmbedGraph(_EmbedSource(self.model)), embed_args,
                      ["input_ids", "image_features", "image_mask"], ["inputs_embeds"],
                      (bs, {0: "num_image_tokens"}, bs)),
            GraphSpec("decoder", DecoderGraph(self.model), dec_args,
                      ["inputs_embeds", "attention_mask", "position_ids", *past_names], ["logits", *present_names],
                      (bs, {0: "batch", 1: "total_length"}, {1: "batch", 2: "sequence"},
                       [{0: "batch", 2: "past_length"}] * len(past_names))),
        ]

    # -- manifest fields ---------------------------------------------------------------------------------
    def manifest_fields(self) -> dict[str, Any]:
        text, cfg, s = self.text, self.config, self.settings
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = text.eos_token_id
        eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        pad = getattr(gen, "pad_token_id", None) if gen is not None else None
        if pad is None:
            pad = text.pad_token_id if text.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        pre = getattr(self, "preprocessing", None) or {}
        max_pixels = int(pre.get("max_pixels", 28 * 28 * 1280))
        unit = (s["patch_size"] * s["merge_size"]) ** 2
        rope = text.rope_parameters or {}
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
                # the side of the largest square image the processor keeps (dynamic resolution: an upper bound)
                "image_size": min(8192, int(max_pixels ** 0.5)),
                "patch_size": s["patch_size"],
            },
            "tokens": {
                "bos_token_id": text.bos_token_id,
                "eos_token_ids": eos_ids,
                "pad_token_id": int(pad),
                "image_token_id": int(cfg.image_token_id),
                # an upper bound: each image has (resized h * w) / (P*m)^2 tokens, computed by the runtime
                "tokens_per_image": max(1, min(max_pixels // unit, text.max_position_embeddings - 1)),
            },
            "qwen2_vl": {
                **s,
                "mrope_section": [int(x) for x in rope.get("mrope_section", [])],
                "vision_start_token_id": int(cfg.vision_start_token_id),
                "vision_end_token_id": int(cfg.vision_end_token_id),
                "video_token_id": int(cfg.video_token_id),
            },
        }

    # -- verify (exporter/verify.py) ----------------------------------------------------------------------
    @staticmethod
    def verify_torch_side(model_dir: Path, attn_implementation: str = "sdpa") -> _TorchSide:
        return _TorchSide(Path(model_dir), attn_implementation)

    # -- `anchorrt generate --backend torch` (anchorrt/cli_mitigation.py) ---------------------------------
    @staticmethod
    def torch_generate(model_dir: Path, images, prompts, max_new_tokens: int, clva=None, sevi=None, iava=None):
        """Greedy generation with the independent references (exporter/reference/qwen2_vl_reference.py) and the
        checkpoint's chat template. -> [(text, new token ids)] per request."""
        from anchorrt.exporter.reference.qwen2_vl_reference import ReferenceIavaQwen2VL, ReferenceQwen2VL
        from anchorrt.runtime.preprocess import load_image

        model_dir = Path(model_dir)
        iava_ref = ReferenceIavaQwen2VL(model_dir) if iava is not None else None
        side = iava_ref.side if iava_ref is not None else _TorchSide(model_dir)
        template = _render_template(side.tokenizer, model_dir)
        pil = [load_image(i) for i in images]
        eos = side.model.generation_config.eos_token_id
        eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        out = []
        if iava_ref is not None:
            for image, prompt in zip(pil, prompts):
                trace = iava_ref.generate(image, prompt, template, alpha=iava.alpha, i=iava.i, lam=iava.lam,
                                     instruction=iava.instruction, max_new_tokens=max_new_tokens,
                                     beta_cut=iava.beta_cut, eos_token_id=eos)
                out.append((side.tokenizer.decode(trace.tokens, skip_special_tokens=True), trace.tokens))
            return out
        inputs = side.inputs(pil, [template.replace("{prompt}", p) for p in prompts])
        ref = ReferenceQwen2VL(side.model)
        tokens = ref.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], max_new_tokens,
                              clva=clva, sevi=sevi, eos_token_id=eos, image_grid_thw=inputs["image_grid_thw"])
        for row in tokens.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append((side.tokenizer.decode(row[:cut], skip_special_tokens=True), row[:cut]))
        return out

    # -- processor ---------------------------------------------------------------------------------------
    @staticmethod
    def load_processor(path: Path):
        """The tokenizer only: `AutoProcessor` on a Qwen2-VL folder imports torchvision for its video half
        (FIELD-NOTES), and the runtime needs nothing else from the processor."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise CheckpointError(f"cannot load the tokenizer of '{path}': {first[:300]}") from None

    def preprocessing_params(self, path: Path) -> dict[str, Any]:
        from anchorrt.exporter.preprocessing_qwen2_vl import qwen2_vl_preprocessing_params

        if getattr(self, "preprocessing", None) is None:
            self.preprocessing = qwen2_vl_preprocessing_params(path)
        return self.preprocessing

    def prompt_template(self, tokenizer) -> dict[str, str]:
        """Render the checkpoint's chat template once with a sentinel, so the runtime needs no Jinja; name the
        video-pad token so that the runtime refuses it in prompts (images only)."""
        out = self._render(tokenizer)
        out["video_placeholder"] = tokenizer.convert_ids_to_tokens(int(self.config.video_token_id))
        return out

    def _render(self, tokenizer) -> dict[str, str]:
        return _render_prompt(tokenizer, self.checkpoint.path)


@register_arch("Qwen2_5_VLForConditionalGeneration")
class Qwen25VLArch(Qwen2VLArch):
    """Qwen2.5-VL: the same graphs; the vision settings (windowed, from its config) switch the window feeds on."""

    model_type = "qwen2_5_vl"


def _render_template(tokenizer, path: Path) -> str:
    return _render_prompt(tokenizer, path)["template"]


def _render_prompt(tokenizer, path: Path) -> dict[str, str]:
    template = _chat_template(path) or getattr(tokenizer, "chat_template", None)
    if template:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
        try:
            rendered = tokenizer.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True,
                                                     tokenize=False)
        except Exception as exc:  # a broken template is the checkpoint's problem: fall back, and say so
            first = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
            return {"template": DEFAULT_PROMPT_TEMPLATE, "source": f"default (chat template failed: {first})"}
        if rendered.count(_SENTINEL) == 1 and rendered.count("<|image_pad|>") == 1:
            return {"template": rendered.replace(_SENTINEL, "{prompt}"), "source": "chat_template"}
    return {"template": DEFAULT_PROMPT_TEMPLATE, "source": "default (Qwen2-VL chat format)"}


class _TorchSide:
    """transformers' side of `verify` for Qwen2-VL: the model, its inputs as Qwen2VLProcessor builds them (the image
    processor, then each image-pad token repeated t*h*w/m² times before tokenizing; the processor itself needs
    torchvision), and a decode step's position ids as transformers' generate makes them (text position + the
    rope deltas of the model's own `get_rope_index` at the prefill)."""

    def __init__(self, model_dir: Path, attn_implementation: str = "sdpa"):
        import transformers
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
        self.model = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32,
                                                                 attn_implementation=attn_implementation).eval()
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.merge = self.model.config.vision_config.spatial_merge_size
        self.image_token_id = self.model.config.image_token_id

    def inputs(self, images, texts) -> dict:
        pixels = self.image_processor(images=images, return_tensors="pt")
        counts = (pixels["image_grid_thw"].prod(-1) // self.merge ** 2).tolist()
        token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        expanded = [text.replace(token, token * int(n)) for text, n in zip(texts, counts)]
        enc = self.tokenizer(expanded, return_tensors="pt", padding=True)
        return {**enc, **pixels, "mm_token_type_ids": (enc["input_ids"] == self.image_token_id).long()}

    def decode_kwargs(self, mask: torch.Tensor) -> dict:
        text = (mask.long().cumsum(-1) - 1)[:, -1:]  # [B, 1]
        return {"position_ids": (text + self.model.model.rope_deltas)[None].expand(3, -1, -1)}  # [3, B, 1]


def _chat_template(path: Path) -> str | None:
    """The processor's chat template: chat_template.jinja, else chat_template.json (how Qwen ships it)."""
    jinja = Path(path) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = Path(path) / "chat_template.json"
    if js.is_file():
        try:
            value = json.loads(js.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return None
        return value if isinstance(value, str) else None
    return None
