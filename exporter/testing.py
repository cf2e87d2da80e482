"""Tiny random-weight LLaVA checkpoints (LLaVA-1.5; LLaVA-Interleave: Qwen2 + SigLIP) built in code, for tests, benchmarks and the demo.

Nothing is downloaded: the tokenizer is a small BPE trained here on a fixed corpus, the weights are
seeded random numbers, and the folder is written exactly as Hugging Face writes a LLaVA-1.5 checkpoint
(config.json, model.safetensors, tokenizer files, processor config with a chat template), so the real
loading code is what reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The LLaVA-1.5 chat template, reduced to what a single-turn conversation with images needs.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = [
    "What is in the image? Describe the content of the image.",
    "Is there a dog in the image? Is there a cat in the picture? Yes. No.",
    "A red circle is left of a blue square on a green background.",
    "The star is above the triangle. The diamond is small and yellow.",
    "USER: ASSISTANT: Please describe this image in detail.",
    "There are two shapes: a cross and a circle. How many objects are there?",
    "the a an of in on is are there this that what which where left right above below",
    "0 1 2 3 4 5 6 7 8 9 10 one two three four five red green blue yellow purple orange",
]


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of a tiny LLaVA. Defaults: 8 layers so that CLVA's l_pos (L//2-2 = 2) differs from l_neg (0)."""

    layers: int = 8
    hidden: int = 64
    heads: int = 8
    kv_heads: int = 8
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    max_position_embeddings: int = 512
    vocab_extra: int = 200
    seed: int = 0
    do_pad: bool = False
    vocab_size: int | None = None  # the language model's vocabulary, padded beyond the tokenizer's (benchmarks)

    @property
    def image_tokens(self) -> int:
        n = (self.image_size // self.patch_size) ** 2
        return n if self.vision_feature_select_strategy == "default" else n + 1


def train_tokenizer(vocab_size: int):
    """A byte-level BPE with LLaMA-style special tokens and an `<image>` token, trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


def _llava_tokenizer(vocab_extra: int):
    """The tiny LLaVA-style tokenizer (BPE trained in code, LLaVA's special tokens, `<image>` as the processor's
    image token, left padding) -> (tokenizers.Tokenizer, PreTrainedTokenizerFast, image token id)."""
    from transformers import PreTrainedTokenizerFast

    raw = train_tokenizer(vocab_size=300 + vocab_extra)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"
    return raw, tokenizer, raw.token_to_id("<image>")


def build_tiny_llava(path: str | Path, spec: TinyLlavaSpec = TinyLlavaSpec()) -> Path:
    """Write a random-weight LlavaForConditionalGeneration checkpoint folder to `path` and return it."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw, tokenizer, image_token_id = _llava_tokenizer(spec.vocab_extra)
    vocab = max(raw.get_vocab_size(), spec.vocab_size or 0)

    text_config = LlamaConfig(
        vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-5,
        bos_token_id=raw.token_to_id("<s>"), eos_token_id=raw.token_to_id("</s>"), pad_token_id=raw.token_to_id("<pad>"),
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), image_token_index=image_token_id,
        vision_feature_layer=spec.vision_feature_layer, vision_feature_select_strategy=spec.vision_feature_select_strategy,
        projector_hidden_act="gelu", image_seq_length=spec.image_tokens,
    )
    config.pad_token_id = text_config.pad_token_id
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random weights large enough that logits are not all alike
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.generation_config.pad_token_id = text_config.pad_token_id
    model.save_pretrained(path, safe_serialization=True)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.vision_feature_select_strategy, chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    if spec.do_pad:  # the original LLaVA pads to a square with the mean colour ("image_aspect_ratio": "pad")
        cfg_path = path / "processor_config.json"  # transformers 5 keeps the image processor config here
        cfg = json.loads(cfg_path.read_text())
        cfg["image_processor"].update(image_processor_type="LlavaImageProcessor", do_pad=True)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


# llava-hf/llava-interleave-qwen-0.5b-hf's chat format (ChatML): every image of a message first, then its text.
INTERLEAVE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyInterleaveSpec:
    """A tiny llava-hf/llava-interleave-qwen-0.5b-hf: Qwen2 language model (q/k/v bias, tied embeddings, no
    pad_token_id in the config, tokenizer pad token <|endoftext|> != EOS <|im_end|>), SigLIP vision tower (no CLS,
    "full" strategy, last layer), SiglipImageProcessor (resize to height x width, mean = std = 0.5)."""

    layers: int = 6
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    max_position_embeddings: int = 512
    vocab_extra: int = 200
    seed: int = 3

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def train_chatml_tokenizer(vocab_size: int):
    """A byte-level BPE with Qwen2's special tokens (no BOS) and an `<image>` token, trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4 + ["user assistant system"] * 4, trainer=trainer)
    return tok


def _randomize(model, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():  # random weights large enough that logits are not all alike
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02 if "proj" not in name else 0.2)


def build_tiny_llava_interleave(path: str | Path, spec: TinyInterleaveSpec = TinyInterleaveSpec()) -> Path:
    """Write a random-weight LLaVA-Interleave (Qwen2 + SigLIP) checkpoint folder to `path` and return it. The
    config mirrors llava-hf/llava-interleave-qwen-0.5b-hf's structure: text model_type qwen2 with
    tie_word_embeddings, vision model_type siglip_vision_model with vision_use_head false, no pad_token_id."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
        Qwen2Config,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = train_chatml_tokenizer(vocab_size=300 + spec.vocab_extra)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"
    image_token_id = raw.token_to_id("<image>")
    text_config = Qwen2Config(
        vocab_size=raw.get_vocab_size(), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        bos_token_id=raw.token_to_id("<|endoftext|>"), eos_token_id=raw.token_to_id("<|im_end|>"),
        tie_word_embeddings=True, use_sliding_window=False, sliding_window=spec.max_position_embeddings,
        max_window_layers=spec.layers,
    )
    text_config.pad_token_id = None  # as the real checkpoint: none in the config
    vision_config = SiglipVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=spec.patch_size,
        vision_use_head=False,
    )
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), image_token_index=image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
        image_seq_length=spec.image_tokens, tie_word_embeddings=True,
    )
    config.pad_token_id = None
    model = LlavaForConditionalGeneration(config).eval()
    _randomize(model, spec.seed)
    model.tie_weights()
    model.generation_config.pad_token_id = None
    model.generation_config.eos_token_id = text_config.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    image_processor = SiglipImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size}, resample=3, image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="full", chat_template=INTERLEAVE_CHAT_TEMPLATE, num_additional_image_tokens=0,
    )
    processor.save_pretrained(path)
    return path


MISTRAL_CHAT_TEMPLATE = (  # llava-hf/llava-v1.6-mistral-7b-hf's format, reduced to one user turn
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TinyNextSpec:
    """A tiny llava-hf/llava-v1.6-mistral-7b-hf: Mistral language model, CLIP tower ("default" strategy, layer -2),
    image_grid_pinpoints scaled from [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] to 32-pixel
    tiles, an image_newline parameter, LlavaNextImageProcessor."""

    layers: int = 6
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    max_position_embeddings: int = 1024
    vocab_extra: int = 200
    seed: int = 5
    text_model: str = "mistral"  # "llama": llava-hf/llava-v1.6-vicuna-7b-hf's form (Llama, the LLaVA-1.5 chat format)

    @property
    def pinpoints(self) -> list[list[int]]:
        t = self.image_size
        return [[t, 2 * t], [2 * t, t], [2 * t, 2 * t], [3 * t, t], [t, 3 * t]]


def build_tiny_llava_next(path: str | Path, spec: TinyNextSpec = TinyNextSpec()) -> Path:
    """Write a random-weight LlavaNextForConditionalGeneration checkpoint folder to `path` and return it."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw, tokenizer, image_token_id = _llava_tokenizer(spec.vocab_extra)
    text_class = {"mistral": MistralConfig, "llama": LlamaConfig}[spec.text_model]
    text_config = text_class(
        vocab_size=raw.get_vocab_size(), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
        bos_token_id=raw.token_to_id("<s>"), eos_token_id=raw.token_to_id("</s>"),
        pad_token_id=raw.token_to_id("<pad>"), tie_word_embeddings=False,
        **({"sliding_window": None} if spec.text_model == "mistral" else {}),
    )
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    config = LlavaNextConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_grid_pinpoints=spec.pinpoints, image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        use_image_newline_parameter=True, tie_word_embeddings=False,
    )
    config.pad_token_id = text_config.pad_token_id
    model = LlavaNextForConditionalGeneration(config).eval()
    _randomize(model, spec.seed)
    import torch

    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 0.5)
    model.generation_config.pad_token_id = text_config.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        image_grid_pinpoints=spec.pinpoints, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=MISTRAL_CHAT_TEMPLATE if spec.text_model == "mistral" else LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path


def externalise_first_initializer(graph: Path, location: str, data_file: Path | None) -> str:
    """Rewrite `graph` so that its first sizeable initializer lives in external data at `location` (its bytes written
    to `data_file` when given): how the security tests and scripts/security_report.py forge artifacts whose external
    data points anywhere. Returns the tensor's name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.HasField("raw_data") and len(t.raw_data) >= 16)
    raw = numpy_helper.to_array(tensor).tobytes()
    if data_file is not None:
        data_file.write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(graph))
    return tensor.name


def tree_paths(obj, prefix: tuple = ()):
    """Every key path of a JSON-like tree (dicts and lists), the root's () first: what manifest fuzzers forge."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from tree_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from tree_paths(v, prefix + (i,))


# -- InstructBLIP (Vicuna) ------------------------------------------------------------------------------------------

_QFORMER_CORPUS = _CORPUS + ["[CLS] [SEP] describe the image briefly. answer yes or no. what colour is it?"]


@dataclass(frozen=True)
class TinyInstructBlipSpec:
    """Sizes of a tiny InstructBLIP-Vicuna, mirroring the structure of Salesforce/instructblip-vicuna-7b's config
    (vision_config EVA ViT with qkv_bias, qformer_config BERT with cross-attention every 2nd layer,
    text_config llama, num_query_tokens, image_token_index). Defaults: 8 LM layers as TinyLlavaSpec; 4 Q-Former
    layers so that there are two cross-attention layers (0 and 2) and CLVA's anchor layer differs from its
    re-weighted layer."""

    layers: int = 8
    hidden: int = 64
    heads: int = 8
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    qformer_hidden: int = 32
    qformer_layers: int = 4
    qformer_heads: int = 4
    cross_attention_frequency: int = 2
    num_query_tokens: int = 32
    max_position_embeddings: int = 512
    vocab_extra: int = 200
    seed: int = 0


# -- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------------------------

# The Qwen2-VL chat template (as Qwen/Qwen2-VL-2B-Instruct ships it in chat_template.json), without its image and
# video counters (add_vision_id), which a single-image prompt never shows.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_VL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


@dataclass(frozen=True)
class TinyQwen2VLSpec:
    """Sizes of a tiny Qwen2-VL ("2") or Qwen2.5-VL ("2.5"), shaped like Qwen/Qwen2-VL-2B-Instruct and
    Qwen/Qwen2.5-VL-3B-Instruct: GQA (12/2 and 16/2 heads there), q/k/v biases, tied embeddings, M-RoPE with
    mrope_section [16, 24, 24] of a 64-frequency head (here [2, 3, 3] of 8), patch 14, temporal patch 2, merge 2;
    Qwen2.5: windowed vision attention (window 112 = 4 merged tokens there, 56 = 2 here) with full-attention blocks
    [7, 15, 23, 31] of 32 (here [1, 3] of 4), RMSNorm and a gated SiLU MLP in the tower."""

    version: str = "2"
    layers: int = 8
    hidden: int = 128
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 256
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_depth: int = 0  # 0: 2 for Qwen2-VL, 4 for Qwen2.5-VL
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 56
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16
    max_position_embeddings: int = 1024
    vocab_extra: int = 200
    seed: int = 0


def train_wordpiece_tokenizer(vocab_size: int = 400):
    """A BERT-style uncased WordPiece ([PAD]=0, [UNK], [CLS], [SEP], [MASK], then the bert-base-uncased extra
    [DEC] bos token that InstructBLIP's Q-Former tokenizer carries), trained here on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                               "[MASK]"], show_progress=False)
    tok.train_from_iterator(_QFORMER_CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(["[DEC]"])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def build_tiny_instructblip(path: str | Path, spec: TinyInstructBlipSpec = TinyInstructBlipSpec()) -> Path:
    """Write a random-weight InstructBlipForConditionalGeneration (Vicuna/Llama LM) checkpoint folder to `path`:
    config.json, model.safetensors, the LM tokenizer at the top level, the Q-Former's BERT tokenizer under
    `qformer_tokenizer/`, and the BLIP image processor config, as InstructBlipProcessor.save_pretrained writes them.
    FIELD-NOTES: random init leaves `query_tokens` at zero (all queries alike), so they are drawn at random here."""
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = train_tokenizer(vocab_size=300 + spec.vocab_extra)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )  # no image_token attribute: InstructBlipProcessor registers "<image>" itself, as with the real checkpoint
    tokenizer.padding_side = "left"
    qraw = train_wordpiece_tokenizer()
    qtokenizer = BertTokenizerFast(tokenizer_object=qraw, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]", bos_token="[DEC]", do_lower_case=True)
    image_token_id = raw.token_to_id("<image>")

    text_config = LlamaConfig(
        vocab_size=raw.get_vocab_size(), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
        bos_token_id=raw.token_to_id("<s>"), eos_token_id=raw.token_to_id("</s>"), pad_token_id=raw.token_to_id("<pad>"),
        tie_word_embeddings=False,
    )
    vision_config = InstructBlipVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=spec.patch_size,
        layer_norm_eps=1e-6, qkv_bias=True,
    )
    qformer_config = InstructBlipQFormerConfig(
        vocab_size=qraw.get_vocab_size(), hidden_size=spec.qformer_hidden, num_hidden_layers=spec.qformer_layers,
        num_attention_heads=spec.qformer_heads, intermediate_size=spec.qformer_hidden * 4,
        cross_attention_frequency=spec.cross_attention_frequency, encoder_hidden_size=spec.vision_hidden,
        max_position_embeddings=spec.max_position_embeddings, pad_token_id=0,
    )
    config = InstructBlipConfig(
        vision_config=vision_config.to_dict(), qformer_config=qformer_config.to_dict(),
        text_config=text_config.to_dict(), num_query_tokens=spec.num_query_tokens, image_token_index=image_token_id,
    )
    torch.manual_seed(spec.seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # random weights large enough that logits and attention are not all alike
        for name, p in model.named_parameters():
            if name == "query_tokens":
                p.normal_(0.0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif "class_embedding" in name or "position_embedding" in name:
                p.normal_(0.0, 0.5)
    model.generation_config.pad_token_id = text_config.pad_token_id
    model.generation_config.bos_token_id = text_config.bos_token_id
    model.generation_config.eos_token_id = text_config.eos_token_id
    model.save_pretrained(path, safe_serialization=True)

    image_processor = BlipImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size}, resample=3, do_rescale=True, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      qformer_tokenizer=qtokenizer, num_query_tokens=spec.num_query_tokens)
    processor.save_pretrained(path)
    return path


def train_qwen_tokenizer(vocab_size: int):
    """A byte-level BPE with Qwen2's special tokens (no BOS is added, as Qwen2's tokenizer does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN2_VL_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4 + ["system user assistant You are a helpful assistant."] * 4, trainer=trainer)
    return tok


def build_tiny_qwen2_vl(path: str | Path, spec: TinyQwen2VLSpec = TinyQwen2VLSpec()) -> Path:
    """Write a random-weight Qwen2VLForConditionalGeneration (spec.version "2") or Qwen2_5_VLForConditionalGeneration
    ("2.5") checkpoint folder: config.json, model.safetensors, tokenizer files, preprocessor_config.json and
    chat_template.json as the Qwen checkpoints ship them (no processor_config.json: Qwen2VLProcessor needs
    torchvision to save, FIELD-NOTES)."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    if spec.version not in ("2", "2.5"):
        raise ValueError(f"TinyQwen2VLSpec.version must be '2' or '2.5', got {spec.version!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = train_qwen_tokenizer(vocab_size=300 + spec.vocab_extra)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.padding_side = "left"
    ids = {t: raw.token_to_id(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    head_dim = spec.hidden // spec.heads
    if 2 * sum(spec.mrope_section) != head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text = {
        "vocab_size": raw.get_vocab_size(), "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu", "max_position_embeddings": spec.max_position_embeddings, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": spec.max_position_embeddings,
        "max_window_layers": spec.layers, "attention_dropout": 0.0,
        "rope_scaling": {"type": "mrope", "mrope_section": list(spec.mrope_section)},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
    }
    common = {"patch_size": spec.patch_size, "spatial_merge_size": spec.merge_size, "in_channels": 3,
              "temporal_patch_size": spec.temporal_patch_size, "num_heads": spec.vision_heads}
    if spec.version == "2":
        cls_name, cfg_cls = "Qwen2VLForConditionalGeneration", transformers.Qwen2VLConfig
        vision = {**common, "depth": spec.vision_depth or 2, "embed_dim": spec.vision_hidden, "mlp_ratio": 4,
                  "hidden_size": spec.hidden, "hidden_act": "quick_gelu"}
    else:
        cls_name, cfg_cls = "Qwen2_5_VLForConditionalGeneration", transformers.Qwen2_5_VLConfig
        vision = {**common, "depth": spec.vision_depth or 4, "hidden_size": spec.vision_hidden,
                  "intermediate_size": spec.vision_hidden * 3, "out_hidden_size": spec.hidden, "hidden_act": "silu",
                  "window_size": spec.window_size, "fullatt_block_indexes": list(spec.fullatt_block_indexes),
                  "tokens_per_second": 2}
    config = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    config.architectures = [cls_name]
    torch.manual_seed(spec.seed)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # random weights large enough that logits are not all alike; with tied embeddings a
        for name, p in model.named_parameters():  # larger embedding std makes greedy decoding repeat one token
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels, "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size, "merge_size": spec.merge_size, "do_convert_rgb": True,
        "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2))
    return path
