"""Tiny random-weight LLaVA checkpoints built in code, for tests, benchmarks and the demo.

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
        PreTrainedTokenizerFast,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = train_tokenizer(vocab_size=300 + spec.vocab_extra)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"
    image_token_id = raw.token_to_id("<image>")
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
