"""Train the demo LLaVA of the synthetic world (`runtime/eval/world.py`): 18 minutes on 2 shared CPU cores.

The model is a real `LlavaForConditionalGeneration` (CLIP ViT + GELU projector + Llama), saved as a Hugging Face
folder that `anchorrt export` reads unchanged: fp16 safetensors, a word-level tokenizer over the world's
vocabulary (a transformers fast tokenizer), and a LlavaProcessor with the LLaVA-1.5 chat template.

The recipe follows the one the prototype found to work (../shared/FIELD-NOTES.md, "Training a tiny demo VLM"):
joint training from scratch left yes/no at chance, so the model learns to see before it learns to talk.

    stage 1  vision   ViT + throw-away linear heads on its patch tokens (the features LLaVA uses):
                      per-patch shape (object patches) and colour (with a background class), cross-entropy
    stage 2  align    ViT frozen; projector output -> embedding of "<colour>" + "<shape>" on object patches
                      (cosine), so image tokens start out looking like the words that name them
    stage 3  llava    ViT frozen; projector + Llama on answer tokens (first answer token weighted), yes/no
                      questions only for the first `yes_no_steps`, then captions mixed in; plus linear probes on
                      the hidden state at the last prompt position:
                        layer `probe_layer`: what is asked (shape a, shape b, colour, side, question kind) -
                          the prototype's probe; without it yes/no stayed at chance
                        layer `look_layer`: what the image shows for it (colour and column of shape a, column of
                          shape b, whether a is left of b, which shapes are drawn) - the lookup the answer needs,
                          supervised directly; in a trial run it made existence learn in ~400 steps. Implied
                          objects (runtime/eval/world.py) are not drawn: the look targets leave them out while
                          the answers include them, so the answer head learns the prior on top of what it sees
                      Each step asks `per_image` questions about each of `llava_images` images: the image
                      prefix runs once and every question continues from its keys/values (`grouped_forward`,
                      equal to the full sequences to ~3e-7), ~3x the answers per second of compute.

Every batch is drawn from `numpy.random.default_rng([seed, stage, step])`, so a run is a function of the seed
(and of the thread count: set it, as `train()` does, to get bit-identical weights).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from anchorrt.runtime.eval.world import COLOUR_NAMES, SHAPES, SIDES, World, vocabulary
from torch import nn

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
KINDS = ("existence", "color", "position", "caption")


@dataclass(frozen=True)
class DemoSpec:
    """Model sizes and the training schedule (defaults: the shipped demo model)."""

    seed: int = 0
    threads: int = 2
    # model
    image_size: int = 64
    patch_size: int = 8  # 64 image tokens
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    hidden: int = 128
    layers: int = 8
    heads: int = 16  # head_dim 8: CLVA/SEVI classify heads within a layer and need many of them
    intermediate: int = 256
    # stage 1
    vision_steps: int = 150
    vision_batch: int = 48
    vision_lr: float = 2e-3
    # stage 2
    align_steps: int = 100
    align_batch: int = 48
    align_lr: float = 2e-3
    # stage 3
    llava_steps: int = 1000
    llava_images: int = 16
    per_image: int = 4  # questions per image in a step (shared prefix)
    llava_lr: float = 1.5e-3
    warmup: int = 50
    yes_no_steps: int = 200
    kind_mix: tuple[float, float, float, float] = (0.3, 0.2, 0.3, 0.2)  # existence, color, position, caption
    answer_weight: float = 4.0
    probe_layer: int = 3  # what is asked
    look_layer: int = 5  # what the image holds for it
    probe_weight: float = 1.0
    # held-out check (questions per family) at the end of training, and every `check_every` steps if > 0
    check_questions: int = 200
    check_every: int = 200


# ------------------------------------------------------------------------------------------------ checkpoint parts

def build_tokenizer():
    """Word-level tokenizer over the world's vocabulary: lower case, words and single punctuation marks."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = SPECIAL_TOKENS + vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, none before . , ?
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def build_model(spec: DemoSpec, tok):
    """An untrained LlavaForConditionalGeneration of `spec`'s sizes, and its LlavaProcessor."""
    from anchorrt.exporter.testing import LLAVA_CHAT_TEMPLATE
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tokens_per_image = (spec.image_size // spec.patch_size) ** 2
    text_config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        head_dim=spec.hidden // spec.heads, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), image_token_index=ids["<image>"],
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=tokens_per_image,
    )
    config.pad_token_id = ids["<pad>"]
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["</s>"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=CLIP_MEAN.tolist(), image_std=CLIP_STD.tolist(),
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


def prompt_template(processor) -> str:
    """The chat template rendered once around a sentinel (what the exporter stores): '... {prompt} ...'."""
    sentinel = "\x00PROMPT\x00"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sentinel}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False).replace(sentinel, "{prompt}")


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float32, CLIP-normalised (the image is already the model's size)."""
    x = (images.astype(np.float64) / 255.0).astype(np.float32)
    return torch.from_numpy(((x - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2).copy())


# ------------------------------------------------------------------------------------------------ batches

class Encoder:
    """Prompt/answer -> token ids exactly as the runtime builds them (template, <s>, image token expanded)."""

    def __init__(self, tok, template: str, tokens_per_image: int):
        self.tok, self.template, self.tokens_per_image = tok, template, tokens_per_image
        self.image_id, self.eos_id, self.pad_id = (tok.token_to_id(t) for t in ("<image>", "</s>", "<pad>"))
        self._cache: dict[str, list[int]] = {}

    def prompt(self, text: str) -> list[int]:
        if text not in self._cache:
            ids = self.tok.encode(self.template.replace("{prompt}", text)).ids
            at = ids.index(self.image_id)
            self._cache[text] = ids[:at] + [self.image_id] * self.tokens_per_image + ids[at + 1:]
        return self._cache[text]

    def answer(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids + [self.eos_id]

    @property
    def prefix_length(self) -> int:
        """Tokens up to the last image token: the part of every prompt that does not depend on the question."""
        ids = self.prompt("x")
        return len(ids) - ids[::-1].index(self.image_id)


@dataclass
class Batch:
    """Full sequences, one per question (the inference layout; used for the held-out check)."""

    pixel_values: torch.Tensor  # [B, 3, H, W]
    input_ids: torch.Tensor  # [B, S] right padded
    attention_mask: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S] next token at each position, -100 where no loss
    last_prompt: torch.Tensor  # [B] position that predicts the first answer token


@dataclass
class GroupBatch:
    """`per_image` questions about each of N images: the shared prefix (template head + image tokens) runs once
    per image and each question's suffix continues from its cached keys/values, so one step sees
    N x per_image answers for little more than N sequences of compute."""

    pixel_values: torch.Tensor  # [N, 3, H, W]
    prefix_ids: torch.Tensor  # [N, P]
    suffix_ids: torch.Tensor  # [N*K, S] right padded
    suffix_mask: torch.Tensor  # [N*K, S]
    targets: torch.Tensor  # [N*K, S] next token, -100 where no loss
    weights: torch.Tensor  # [N*K, S]
    last_prompt: torch.Tensor  # [N*K] suffix position that predicts the first answer token
    probes: dict[str, torch.Tensor]  # name -> [N*K] class ids ("presence": [N*K, shapes] 0/1)
    kinds: list[str]
    per_image: int


# What the question asks, read at layer `probe_layer` (the prototype's probe), and what the image holds for it,
# read at layer `look_layer` (a decomposition of the answer: see the module docstring).
QUESTION_PROBES = {"shape_a": len(SHAPES) + 1, "shape_b": len(SHAPES) + 1, "colour": len(COLOUR_NAMES) + 1,
                   "side": len(SIDES) + 1, "kind": len(KINDS)}
LOOK_PROBES = {"colour_of_a": len(COLOUR_NAMES) + 1, "x_of_a": 9, "x_of_b": 9, "a_left_of_b": 3}


def _probe_targets(scene, qa) -> dict[str, int]:
    """Question targets from the text; look targets from what is drawn (implied objects are not visible)."""
    def column(shape: str | None) -> int:  # 0: not asked or not drawn; 1-8: the 8-px column of the centre
        if not shape or not scene.shows(shape):
            return 0
        return 1 + min(7, int(scene.find(shape).x // 8))

    has_a = bool(qa.shape_a) and scene.shows(qa.shape_a)
    both = has_a and bool(qa.shape_b) and scene.shows(qa.shape_b)
    return {
        "shape_a": SHAPES.index(qa.shape_a) + 1 if qa.shape_a else 0,
        "shape_b": SHAPES.index(qa.shape_b) + 1 if qa.shape_b else 0,
        "colour": COLOUR_NAMES.index(qa.colour) + 1 if qa.colour else 0,
        "side": next((i + 1 for i, s in enumerate(SIDES) if f" {s} side" in qa.prompt), 0),
        "kind": KINDS.index(qa.kind),
        "colour_of_a": COLOUR_NAMES.index(scene.find(qa.shape_a).colour) + 1 if has_a else 0,
        "x_of_a": column(qa.shape_a),
        "x_of_b": column(qa.shape_b),
        "a_left_of_b": (1 if scene.find(qa.shape_a).x < scene.find(qa.shape_b).x else 2) if both else 0,
    }


def group_batch(world: World, rng: np.random.Generator, enc: Encoder, n_images: int, per_image: int, mix,
                answer_weight: float) -> GroupBatch:
    scenes = [world.sample_scene(rng) for _ in range(n_images)]
    p = np.asarray(mix) / np.sum(mix)
    qas = []
    for scene in scenes:
        kinds = [KINDS[int(k)] for k in rng.choice(len(KINDS), per_image, p=p)]
        kinds = [k if k != "caption" or k not in kinds[:i] else "existence" for i, k in enumerate(kinds)]
        qas += [world.training_qa(rng, scene, k) for k in kinds]  # at most one caption per image
    images = np.stack([world.render(s)[0] for s in scenes])
    n_prefix = enc.prefix_length
    suffixes = []
    for qa in qas:
        ids = enc.prompt(qa.prompt)
        suffixes.append((ids[n_prefix:], enc.answer(qa.answer)))
    prefix = torch.tensor([enc.prompt(qas[0].prompt)[:n_prefix]] * n_images)
    s = max(len(q) + len(a) for q, a in suffixes)
    b = len(qas)
    ids = torch.full((b, s), enc.pad_id, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.long)
    targets = torch.full((b, s), -100, dtype=torch.long)
    weights = torch.zeros(b, s)
    for i, ((q, a), qa) in enumerate(zip(suffixes, qas)):
        seq = q + a
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        targets[i, len(q) - 1:len(seq) - 1] = torch.tensor(a)
        weights[i, len(q) - 1:len(seq) - 1] = 1.0
        if qa.kind != "caption":
            weights[i, len(q) - 1] = answer_weight
    owners = [scenes[i // per_image] for i in range(b)]
    rows = [_probe_targets(sc, qa) for sc, qa in zip(owners, qas)]
    probes = {k: torch.tensor([r[k] for r in rows]) for k in (*QUESTION_PROBES, *LOOK_PROBES)}
    probes["presence"] = torch.tensor([[float(sc.shows(sh)) for sh in SHAPES] for sc in owners])
    return GroupBatch(pixel_values(images), prefix, ids, mask, targets, weights,
                      torch.tensor([len(q) - 1 for q, _ in suffixes]), probes, [qa.kind for qa in qas], per_image)


def make_batch(enc: Encoder, images: np.ndarray, qas) -> Batch:
    seqs = [(enc.prompt(qa.prompt), enc.answer(qa.answer)) for qa in qas]
    s = max(len(p) + len(a) for p, a in seqs)
    b = len(seqs)
    ids = torch.full((b, s), enc.pad_id, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.long)
    targets = torch.full((b, s), -100, dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
        targets[i, len(p) - 1:len(p) + len(a) - 1] = torch.tensor(a)
    return Batch(pixel_values(images), ids, mask, targets, torch.tensor([len(p) - 1 for p, _ in seqs]))


# ------------------------------------------------------------------------------------------------ model pieces

def patch_batch(world: World, spec: DemoSpec, stage: int, step: int, n: int):
    """`n` training scenes of `stage`'s `step` (rng [seed, stage, step]) -> pixel values and the per-patch shape and
    colour labels, flattened to [n * patches]."""
    rng = np.random.default_rng([spec.seed, stage, step])
    scenes = [world.sample_scene(rng) for _ in range(n)]
    rendered = [world.render(s) for s in scenes]
    labels = [world.patch_labels(s, idx, spec.patch_size) for s, (_, idx) in zip(scenes, rendered)]
    shape_t = torch.from_numpy(np.stack([x[0] for x in labels])).flatten()
    colour_t = torch.from_numpy(np.stack([x[1] for x in labels])).flatten()
    return pixel_values(np.stack([r[0] for r in rendered])), shape_t, colour_t


def vision_features(model, pixel: torch.Tensor) -> torch.Tensor:
    """The patch tokens LLaVA feeds the projector (vision_feature_layer -1, CLS dropped): [B, P, dv]."""
    hidden = model.model.vision_tower(pixel, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def language_forward(model, batch: Batch, image_embeds: torch.Tensor, image_id: int):
    """Llama over token embeddings with the projected image tokens written in; -> (logits, hidden states)."""
    lm = model.model.language_model
    embeds = _embed(lm, batch.input_ids, image_embeds, image_id)
    out = lm(inputs_embeds=embeds, attention_mask=batch.attention_mask, output_hidden_states=True)
    return model.lm_head(out.last_hidden_state), out.hidden_states


def grouped_forward(model, batch: GroupBatch, image_embeds: torch.Tensor, image_id: int):
    """Prefix once per image, every question's suffix from the prefix cache; -> suffix (logits, hidden states).

        prefix  [N, P]   "<s> user : <image> x 64"        -> keys/values per layer [N, H, P, D]
                                                          repeat_interleave per_image -> [N*K, H, P, D]
        suffix  [N*K, S] "question assistant : answer"   positions P..P+S-1, attends to its image's prefix
    """
    from transformers import DynamicCache

    lm = model.model.language_model
    n, p = batch.prefix_ids.shape
    k = batch.per_image
    prefix = lm(inputs_embeds=_embed(lm, batch.prefix_ids, image_embeds, image_id), use_cache=True)
    cache = DynamicCache(ddp_cache_data=[(layer.keys.repeat_interleave(k, 0), layer.values.repeat_interleave(k, 0))
                                         for layer in prefix.past_key_values.layers])
    b, s = batch.suffix_ids.shape
    mask = torch.cat([torch.ones(b, p, dtype=batch.suffix_mask.dtype), batch.suffix_mask], dim=1)  # [N*K, P+S]
    positions = (p + torch.arange(s)).expand(b, s)
    out = lm(inputs_embeds=lm.embed_tokens(batch.suffix_ids), attention_mask=mask, position_ids=positions,
             past_key_values=cache, use_cache=True, output_hidden_states=True)
    return model.lm_head(out.last_hidden_state), out.hidden_states


def _embed(lm, ids: torch.Tensor, image_embeds: torch.Tensor, image_id: int) -> torch.Tensor:
    is_image = ids == image_id  # [B, S]
    embeds = lm.embed_tokens(torch.where(is_image, torch.zeros_like(ids), ids))  # [B, S, d]
    return embeds.masked_scatter(is_image[..., None], image_embeds.to(embeds.dtype))


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------------------ stages

Log = Callable[[str], None]


def train_vision(model, world: World, spec: DemoSpec, log: Log) -> None:
    """Per-patch shape and colour classification on the patch tokens LLaVA uses (dense labels learn fast;
    an image-level presence head max-pooled over patches learned far slower in a trial run)."""
    dv = spec.vision_hidden
    heads = nn.ModuleDict({"shape": nn.Linear(dv, len(SHAPES)), "colour": nn.Linear(dv, len(COLOUR_NAMES) + 1)})
    tower = model.model.vision_tower
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=spec.vision_lr, weight_decay=0.01)
    tower.train()
    t0 = time.perf_counter()
    for step in range(spec.vision_steps):
        pixels, shape_t, colour_t = patch_batch(world, spec, 1, step, spec.vision_batch)
        feats = vision_features(model, pixels).flatten(0, 1)  # [B*P, dv]
        shape_logits, colour_logits = heads["shape"](feats), heads["colour"](feats)
        on = shape_t > 0  # the shape loss on object patches only: background patches (most of them) would
        loss_shape = F.cross_entropy(shape_logits[on], shape_t[on] - 1)  # swamp it; the colour head has a background
        loss_colour = F.cross_entropy(colour_logits, colour_t)  # class and so learns where objects are
        loss = loss_shape + loss_colour
        for g in opt.param_groups:
            g["lr"] = spec.vision_lr * _schedule(step, spec.vision_steps, spec.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == spec.vision_steps - 1:
            acc = (shape_logits[on].argmax(-1) == shape_t[on] - 1).float().mean().item()
            log(f"vision {step:4d}/{spec.vision_steps} loss shape {loss_shape.item():.3f} colour {loss_colour.item():.3f}"
                f"; object-patch shape accuracy {acc:.2f} {time.perf_counter() - t0:.0f} s")
    tower.eval()
    tower.requires_grad_(False)


def train_align(model, world: World, spec: DemoSpec, tok, log: Log) -> None:
    projector = model.model.multi_modal_projector
    embed = model.model.language_model.embed_tokens.weight  # [V, d]
    shape_ids = torch.tensor([tok.token_to_id(s) for s in SHAPES])
    colour_ids = torch.tensor([tok.token_to_id(c) for c in COLOUR_NAMES])
    opt = torch.optim.AdamW(projector.parameters(), lr=spec.align_lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(spec.align_steps):
        pixels, shape_t, colour_t = patch_batch(world, spec, 2, step, spec.align_batch)
        with torch.no_grad():
            feats = vision_features(model, pixels)
        out = projector(feats).flatten(0, 1)  # [B*P, d]
        on = shape_t > 0
        target = (embed[shape_ids[shape_t[on] - 1]] + embed[colour_ids[colour_t[on] - 1]]).detach()
        loss = (1 - F.cosine_similarity(out[on], target, dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 40 == 0 or step == spec.align_steps - 1:
            log(f"align  {step:4d}/{spec.align_steps} loss {loss.item():.3f} {time.perf_counter() - t0:.0f} s")


def train_llava(model, world: World, spec: DemoSpec, enc: Encoder, log: Log) -> None:
    d = spec.hidden
    heads = nn.ModuleDict({**{k: nn.Linear(d, n) for k, n in {**QUESTION_PROBES, **LOOK_PROBES}.items()},
                           "presence": nn.Linear(d, len(SHAPES))})
    params = [p for n, p in model.named_parameters() if p.requires_grad and "vision_tower" not in n]
    params += list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=spec.llava_lr, weight_decay=0.01)
    model.model.language_model.train()
    yes_no_mix = (*spec.kind_mix[:3], 0.0)
    t0 = time.perf_counter()
    for step in range(spec.llava_steps):
        rng = np.random.default_rng([spec.seed, 3, step])
        mix = yes_no_mix if step < spec.yes_no_steps else spec.kind_mix
        batch = group_batch(world, rng, enc, spec.llava_images, spec.per_image, mix, spec.answer_weight)
        with torch.no_grad():
            feats = vision_features(model, batch.pixel_values)
        logits, hidden = grouped_forward(model, batch, model.model.multi_modal_projector(feats), enc.image_id)
        on = batch.targets >= 0
        nll = F.cross_entropy(logits[on], batch.targets[on], reduction="none")
        w = batch.weights[on]
        loss_lm = (nll * w).sum() / w.sum()
        rows = torch.arange(len(batch.last_prompt))
        h_question = hidden[spec.probe_layer][rows, batch.last_prompt]  # [N*K, d]
        h_look = hidden[spec.look_layer][rows, batch.last_prompt]  # [N*K, d]
        loss_question = sum(F.cross_entropy(heads[k](h_question), batch.probes[k]) for k in QUESTION_PROBES)
        loss_look = sum(F.cross_entropy(heads[k](h_look), batch.probes[k]) for k in LOOK_PROBES)
        loss_look = loss_look + F.binary_cross_entropy_with_logits(heads["presence"](h_look), batch.probes["presence"])
        loss = loss_lm + spec.probe_weight * (loss_question + loss_look)
        for g in opt.param_groups:
            g["lr"] = spec.llava_lr * _schedule(step, spec.llava_steps, spec.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == spec.llava_steps - 1:
            yn = torch.tensor([k != "caption" for k in batch.kinds])
            first = logits[rows, batch.last_prompt].argmax(-1)
            acc = (first == batch.targets[rows, batch.last_prompt])[yn].float().mean().item()
            log(f"llava  {step:4d}/{spec.llava_steps} loss {loss_lm.item():.3f} probes: question "
                f"{loss_question.item():.3f} look {loss_look.item():.3f}; batch yes/no acc {acc:.2f} "
                f"{time.perf_counter() - t0:.0f} s")
        if spec.check_every and step and step % spec.check_every == 0:
            check = held_out_check(model, world, replace(spec, check_questions=100), enc)
            log(f"llava  {step:4d} held-out yes/no: " + ", ".join(f"{k} {v:.2f}" for k, v in check.items()))
            model.model.language_model.train()
    model.eval()


# ------------------------------------------------------------------------------------------------ held-out check

@torch.no_grad()
def held_out_check(model, world: World, spec: DemoSpec, enc: Encoder) -> dict[str, float]:
    """Yes/no accuracy on fresh training-distribution questions (seed stream 4), by family, plus the
    false-positive rate on "partner absent" existence questions (anchor in the image, its partner not).
    A quick in-training look; the reported numbers come from `anchorrt eval` on the exported model."""
    from anchorrt.runtime.eval.world import PAIRS, QA, existence_question

    rng = np.random.default_rng([spec.seed, 4])
    yes_id, no_id = enc.tok.token_to_id("yes"), enc.tok.token_to_id("no")
    out: dict[str, float] = {}
    for kind in ("existence", "color", "position", "partner_absent"):
        scenes, qas = [], []
        while len(qas) < spec.check_questions:
            if kind == "partner_absent":
                anchor = list(PAIRS)[int(rng.integers(len(PAIRS)))]
                shapes = world.sample_shapes(rng, int(rng.integers(1, 4)), 0.0, required=[anchor],
                                             exclude=[PAIRS[anchor]])
                scene = world.sample_scene(rng, shapes=shapes)
                qa = QA(existence_question(PAIRS[anchor]), "no", "existence", PAIRS[anchor])
            else:
                scene = world.sample_scene(rng)
                qa = world.training_qa(rng, scene, kind)
                if qa.kind != kind:
                    continue
            scenes.append(scene)
            qas.append(qa)
        right = 0
        for i in range(0, len(qas), 50):
            images = np.stack([world.render(s)[0] for s in scenes[i:i + 50]])
            batch = make_batch(enc, images, qas[i:i + 50])
            image_embeds = model.model.multi_modal_projector(vision_features(model, batch.pixel_values))
            logits, _ = language_forward(model, batch, image_embeds, enc.image_id)
            first = logits[torch.arange(len(batch.last_prompt)), batch.last_prompt]
            says_yes = first[:, yes_id] > first[:, no_id]
            truth = torch.tensor([q.answer == "yes" for q in qas[i:i + 50]])
            right += int((says_yes == truth).sum())
        out[kind] = right / len(qas)
    return out


# ------------------------------------------------------------------------------------------------ entry point

def train(out_dir: str | Path, spec: DemoSpec = DemoSpec(), log: Log = print) -> dict:
    """Train the demo model and write the Hugging Face folder to `out_dir` (fp16 safetensors). Returns the
    training record (spec, timings, held-out check) that is also written to `out_dir/training.json`."""
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    out = Path(out_dir)
    world = World()
    tok = build_tokenizer()
    model, processor = build_model(spec, tok)
    enc = Encoder(tok, prompt_template(processor), (spec.image_size // spec.patch_size) ** 2)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters; vocabulary {tok.get_vocab_size()} words; "
        f"{spec.layers} layers x {spec.heads} heads; {enc.tokens_per_image} image tokens")
    times, cpu = {}, {}
    for name, stage in (("vision", lambda: train_vision(model, world, spec, log)),
                        ("align", lambda: train_align(model, world, spec, tok, log)),
                        ("llava", lambda: train_llava(model, world, spec, enc, log))):
        t, c = time.perf_counter(), time.process_time()
        stage()
        times[f"{name}_s"], cpu[f"{name}_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    check = held_out_check(model, world, spec, enc)
    log("held-out yes/no accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in check.items()))
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    # cpu seconds / threads ~ the wall time on otherwise idle cores (the wall time depends on what else runs)
    record = {"spec": asdict(spec), "parameters": n_params, "seconds": {k: round(v, 1) for k, v in times.items()},
              "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
              "held_out_check": check, "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
