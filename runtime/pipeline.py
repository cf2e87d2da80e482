"""The torch-free generation pipeline: preprocess → vision → embed → prefill → decode loop.

    pipe = Pipeline.from_dir("out/llava", providers=["CPUExecutionProvider"])
    result = pipe.generate("cat.jpg", "What is in the image?", max_new_tokens=32)
    print(result.text)

A batch of (image, prompt) requests is left-padded into one batch.

Threads: one Pipeline may be shared by any number of threads. Each generate call owns everything it changes (its
KV cache, IOBinding objects, random generators, flag arrays, VisAlign state, timings); the Pipeline's attributes
are set in __init__ and only read afterwards; onnxruntime's `InferenceSession.run` is safe to call concurrently, and
each session is built once under a lock. tests/test_concurrency.py runs one Pipeline from 8 threads with mixed
prompts, flags and seeds and requires the outputs of serial runs, token for token.

What differs between architectures (image preprocessing, the vision stage(s), image-token counts per image,
position ids) is the `RuntimeArch` module that the manifest's `model_type` names (runtime/archs/__init__.py);
this module is the generic loop around it. A request may carry several images (a list): its prompt gets one
image span per image, and the methods see all of them as `V` (METHODS.md, "Visual positions across
architectures").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from anchorrt.runtime.archs import PromptLayout, VisualInput, runtime_for
from anchorrt.runtime.backend import GPU_PROVIDERS, make_backend
from anchorrt.runtime.errors import ArtifactError, BackendError, FlagError, ImageError
from anchorrt.runtime.iava import (
    PROBE_ENABLE,
    PROBE_OUTPUT,
    IavaParams,
    append_token,
    compacted_mask,
    compaction_allowed,
    contrastive_scores,
    parse_iava,
    select_irrelevant,
)
from anchorrt.runtime.kv_cache import KVCache
from anchorrt.runtime.manifest import Manifest
from anchorrt.runtime.mitigation import decoder_feeds, mitigation_specs, parse_request
from anchorrt.runtime.preprocess import load_image
from anchorrt.runtime.prompt import EncodedPrompt, PromptBuilder
from anchorrt.runtime.sampling import SamplingConfig, select_tokens
from anchorrt.runtime.visalign import VisAlignFeed, VisAlignState, requested, visalign_state

TokenCallback = Callable[[int, int, str], None]  # (request index, token id, new text piece)

_BASE_DECODER_INPUTS = {"inputs_embeds", "attention_mask", "position_ids"}
_UNREAD = object()  # Pipeline._logits_spec before the decoder was asked
# Prompt tokens per decoder call in a prefill (fused form, methods off): llama.cpp's default batch. Measured on the
# issue-18 bench decoder (2100 tokens, 1 thread, CPU time): one pass 12.55 s, chunks of 1024 12.33, 512 11.95,
# 256 12.33; identical logits. It also bounds the attention's [B, H, chunk, total] scratch.
PREFILL_CHUNK = 512


@dataclass
class Request:
    image: Any  # path, bytes or PIL image; or a list of them (several images, one span each in the prompt)
    prompt: str
    mitigation: dict | None = None  # this request's flags, e.g. {"clva": {"alpha": 14}, "sevi": True}; None: the call's


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    timings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # per-method information, e.g. details["iava"]["irrelevant"]


@dataclass
class _Batch:
    ids: np.ndarray  # [B, S] int64, left padded
    attention_mask: np.ndarray  # [B, S] int64
    image_mask: np.ndarray  # [B, S] bool
    prompt_lengths: list[int]
    spans: list[list[tuple[int, int]]] | None = None  # per row: (start, end) of each image's positions
    images: list[list[int]] | None = None  # per row: global indices of its images (into the VisualInput)
    visual: VisualInput | None = None

    def layout(self) -> PromptLayout:
        spans = self.spans if self.spans is not None else [_spans(m) for m in self.image_mask]
        images = self.images if self.images is not None else [[] for _ in spans]
        return PromptLayout(self.ids, self.attention_mask, self.image_mask, spans, images, self.visual)

    def rows(self, start: int, stop: int) -> _Batch:
        """Rows start..stop-1 (IAVA splits its [G..., Q...] batch)."""
        sl = slice(start, stop)
        return _Batch(self.ids[sl], self.attention_mask[sl], self.image_mask[sl], self.prompt_lengths[sl],
                      None if self.spans is None else self.spans[sl], None if self.images is None else self.images[sl],
                      self.visual)


def _spans(image_mask_row: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of true positions (adjacent images' spans merge: only used without records)."""
    m = np.concatenate([[False], np.asarray(image_mask_row, bool), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(m))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def refuse_fp32_fused_on_gpu(manifest: Manifest, providers: Sequence[str]) -> None:
    """BackendError when a GPU provider is asked to run the fused form in fp32. onnxruntime's CUDA
    GroupQueryAttention is fp16/bf16 only; measured on an H200 (onnxruntime-gpu 1.31.1), ORT then ran it on the CPU
    between copies of the device-resident cache and from the first decode step the logits were off by ~3 (the
    prefill's within 1e-6). Known from the manifest, so callers check it before any session loads weights."""
    if any(p in GPU_PROVIDERS for p in providers) and manifest.attention_form == "gqa" and manifest.kv_precision != "fp16":
        raise BackendError(
            f"'{manifest.folder.name}' runs its fused GroupQueryAttention and KV cache in fp32, and onnxruntime's "
            "CUDA kernel is fp16/bf16 only; for the GPU re-export it with `anchorrt export --precision fp16` (or "
            "export fp32 with `--attention unfused`)")


class Pipeline:
    def __init__(self, manifest: Manifest, providers: Sequence | None = None, allow_fallback: bool = False,
                 intra_op_threads: int | None = None, max_image_pixels: int | None = None):
        names = [p if isinstance(p, str) else p[0] for p in (providers or [])]
        refuse_fp32_fused_on_gpu(manifest, names[:1])  # before any session
        self.manifest = manifest
        self.max_image_pixels = max_image_pixels  # None: runtime.preprocess.default_max_pixels()
        kw = {"providers": providers, "allow_fallback": allow_fallback, "intra_op_threads": intra_op_threads}
        self.arch = runtime_for(manifest, lambda role: make_backend(manifest.graph_path(role), **kw))
        self.arch.limit_pixels(max_image_pixels)  # every intermediate image bounded (issue 13 item 4)
        self.vision = getattr(self.arch, "vision", None)  # the (first) vision stage, for profiling
        self.embed = make_backend(manifest.graph_path("embed"), **kw)
        self.decoder = make_backend(manifest.graph_path("decoder"), **kw)
        self._logits_spec = _UNREAD  # (V, dtype) of the decoder's [B, 1, V] logits, read on first use
        builder = getattr(self.arch, "prompt_builder", PromptBuilder)  # InstructBLIP: image tokens before BOS
        self.prompts = builder(manifest.folder / manifest.data["tokenizer"]["file"], manifest)
        dims = manifest.dims
        self.num_layers, self.kv_heads, self.head_dim = dims["num_layers"], dims["num_kv_heads"], dims["head_dim"]
        self.hidden = dims["hidden_size"]
        self.tokens_per_image = manifest.tokens["tokens_per_image"]  # LLaVA-1.5's count; see arch for variable ones
        self.stop_ids = tuple(manifest.tokens["eos_token_ids"])
        self.pad_id = manifest.tokens["pad_token_id"]
        self.kv_dtype = np.float16 if manifest.kv_precision == "fp16" else np.float32
        self.visalign = VisAlignFeed.from_manifest(manifest)  # None unless the embed graph has VisAlign
        # On a GPU one pass: chunks only pay off where attention over skipped keys costs more than a call (the CPU)
        self.prefill_chunk = 0 if names[:1] and names[0] in GPU_PROVIDERS else PREFILL_CHUNK

    @classmethod
    def from_dir(cls, path: str | Path, providers: Sequence | None = None, verify: bool = True,
                 allow_fallback: bool = False, intra_op_threads: int | None = None,
                 max_image_pixels: int | None = None) -> Pipeline:
        """Open an artifact folder. `verify=False` skips the sha256 check of every file (faster for huge models).
        `max_image_pixels`: the largest width * height accepted (default 64 Mpx, see runtime/preprocess.py)."""
        return cls(Manifest.load(path, verify=verify), providers, allow_fallback, intra_op_threads, max_image_pixels)

    # -- public API -----------------------------------------------------------------------------------------
    def generate(self, image: Any, prompt: str, *, on_token: TokenCallback | None = None,
                 mitigation: dict | None = None, **sampling) -> Generation:
        """`mitigation`: e.g. {"clva": {"alpha": 14}, "sevi": True} (see runtime/mitigation.py); None: all off."""
        return self.generate_batch([Request(image, prompt, mitigation)], on_token=on_token, **sampling)[0]

    def generate_batch(self, requests: Sequence[Request | tuple], *, on_token: TokenCallback | None = None,
                       mitigation: dict | Sequence | None = None, **sampling) -> list[Generation]:
        """`mitigation`: one dict for every request or one per request; a Request's own `mitigation` wins."""
        cfg = self._sampling_config(sampling)
        reqs = [r if isinstance(r, Request) else Request(*r) for r in requests]
        if not reqs:
            raise FlagError("generate_batch needs at least one (image, prompt) request")
        specs = mitigation_specs(reqs, mitigation)
        iava = [self._parse_iava(spec) for spec in specs]
        for spec in specs:  # bad flags fail before any image is decoded
            parse_request(spec, self.manifest.mitigation)
        visalign_flags = requested(specs, len(specs), self.visalign is not None and self.visalign.default)
        if self.visalign is None and visalign_flags.any():
            raise FlagError("this artifact has no VisAlign fusion; export a VisAlign checkpoint or "
                            "`anchorrt bake OUT --visalign visalign.safetensors`")
        results: list[Generation | None] = [None] * len(reqs)
        # IAVA requests decode two streams each; they run as their own batch, the others as theirs.
        for with_iava in (False, True):
            idx = [i for i, p in enumerate(iava) if (p is not None) == with_iava]
            if not idx:
                continue
            callback = None if on_token is None else (lambda i, tok, piece, idx=idx: on_token(idx[i], tok, piece))
            group = self._generate_group([reqs[i] for i in idx], [specs[i] for i in idx],
                                         [iava[i] for i in idx] if with_iava else None, cfg, callback)
            for i, g in zip(idx, group):
                results[i] = g
        return results

    def _generate_group(self, reqs: list[Request], specs: list, iava: list[IavaParams] | None, cfg: SamplingConfig,
                        on_token) -> list[Generation]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        per_request = [_images_of(r.image) for r in reqs]
        fixed = self.arch.fixed_tokens_per_image
        if fixed is not None:  # prompt errors come before any image is decoded
            encoded = [self.prompts.encode(r.prompt, len(im), reserve=cfg.max_new_tokens, tokens_per_image=fixed)
                       for r, im in zip(reqs, per_request)]
        else:
            for r, im in zip(reqs, per_request):
                self.prompts.check(r.prompt, len(im))
        loaded, owner = [], []  # every image of the group in request order; owner: its request
        for i, im in enumerate(per_request):
            loaded += [self._load(x, len(loaded) + k) for k, x in enumerate(im)]
            owner += [i] * len(im)
        visual = self.arch.preprocess(loaded)
        counts = visual.tokens_per_image
        starts = np.cumsum([0] + [len(im) for im in per_request])
        if fixed is None:
            encoded = [self.prompts.encode(r.prompt, len(im), reserve=cfg.max_new_tokens,
                                           tokens_per_image=counts[starts[i]:starts[i + 1]])
                       for i, (r, im) in enumerate(zip(reqs, per_request))]
        for i, e in enumerate(encoded):
            e.images = list(range(starts[i], starts[i + 1]))
        general = [self._encode_general(p.instruction, per_request[i], counts[starts[i]:starts[i + 1]],
                                        range(starts[i], starts[i + 1]))
                   for i, p in enumerate(iava)] if iava else None
        timings["preprocess_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        image_specs = [specs[o] for o in owner]  # per image: its request's flags (CLVA in InstructBLIP's Q-Former)
        features = self.encode_images(visual, [reqs[o].prompt for o in owner], image_specs)  # [total_tokens, d]
        # Prompt-conditioned features (InstructBLIP's Q-Former reads the instruction): IAVA's G rows get their own.
        features_g = self.encode_images(visual, [iava[o].instruction for o in owner], image_specs) \
            if iava and getattr(self.arch, "text_conditioned", False) else None
        timings["vision_s"] = time.perf_counter() - t
        if iava:
            tokens, reasons, timings_gen, details = self._generate_iava(encoded, general, features, cfg, on_token,
                                                                        specs, iava, visual, features_g)
        else:
            tokens, reasons, timings_gen = self._generate_tokens(self._pad(encoded, visual), features, cfg, on_token,
                                                                 specs)
            details = [{} for _ in reqs]
        timings.update(timings_gen)
        timings["total_s"] = time.perf_counter() - t0
        return [
            Generation(self.prompts.decode([x for x in toks if x not in self.stop_ids]), toks, len(encoded[b].ids),
                       reasons[b], dict(timings), details[b])
            for b, toks in enumerate(tokens)
        ]

    # -- stages -----------------------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence) -> VisualInput:
        """Loaded RGB images -> the architecture's vision feeds and per-image token counts."""
        return self.arch.preprocess(list(images))

    def preprocess(self, images: Sequence) -> np.ndarray:
        """`pixel_values` of the images (for architectures whose vision stage takes them, e.g. LLaVA)."""
        return self.preprocess_images(images).feeds["pixel_values"]

    def encode_images(self, visual: VisualInput | np.ndarray, texts: Sequence[str] | None = None,
                      mitigation: Sequence | None = None) -> np.ndarray:
        """The vision stage(s) -> features [total_visual_tokens, d] in image order. `visual`: a VisualInput, or
        `pixel_values` for an architecture with a fixed token count per image."""
        if isinstance(visual, np.ndarray):
            if self.arch.fixed_tokens_per_image is None:
                raise FlagError("this architecture's images take a size-dependent number of positions: pass "
                                "pipe.preprocess_images(images), not pixel values, to encode_images")
            visual = VisualInput({"pixel_values": visual}, [self.arch.fixed_tokens_per_image] * len(visual))
        if getattr(self.arch, "takes_mitigation", False):  # methods baked into the vision stage (per image)
            rows = [parse_request(m, self.manifest.mitigation) for m in (mitigation or [None] * visual.num_images)]
            return self.arch.encode(visual, texts, mitigation=rows)
        return self.arch.encode(visual, texts)

    def prefill(self, batch: _Batch, features: np.ndarray, cache: KVCache, extra: dict,
                visalign: VisAlignState | None = None, fetch: dict | None = None) -> np.ndarray:
        embeds = self._embed(batch.ids, features, batch.image_mask, visalign)
        position_ids, _ = self.arch.prefill_positions(batch.layout())  # left padding
        return self.prefill_embeds(embeds, batch.attention_mask, position_ids, cache, extra, fetch)

    def prefill_embeds(self, embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                       cache: KVCache, extra: dict, fetch: dict | None = None) -> np.ndarray:
        """The decoder over a prompt's embeddings [B, S, d] -> last-position logits [B, V].

        Chunked prefill: a one-row prompt longer than `prefill_chunk`, with every method off, runs in chunks; each
        attends to the cache the ones before it wrote (the in-place buffer) and to itself, so the attention skips
        the keys a causal row never sees, and the same rows are computed. Positions' last axis is the sequence
        ([B, S] and M-RoPE's [3, B, S] alike)."""
        s, chunk = embeds.shape[1], self.prefill_chunk
        if chunk and s > chunk and embeds.shape[0] == 1 and fetch is None and _chunkable(cache, extra):
            for start in range(0, s - chunk, chunk):
                stop = start + chunk
                self._decode(embeds[:, start:stop], attention_mask[:, :stop], position_ids[..., start:stop], cache,
                             extra)
            start = (s - 1) // chunk * chunk
            return self._decode(embeds[:, start:], attention_mask, position_ids[..., start:], cache, extra)
        return self._decode(embeds, attention_mask, position_ids, cache, extra, fetch=fetch)

    def decode_one_token(self, next_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray,
                         cache: KVCache, extra: dict, visalign: VisAlignState | None = None) -> np.ndarray:
        """`positions` [B]: each row's position of the new token, in the architecture's coordinates."""
        b = next_ids.shape[0]
        no_images = self.arch.no_image_features(self.embed)
        embeds = self._embed(next_ids[:, None], no_images, np.zeros((b, 1), dtype=bool), visalign)  # [B, 1, d]
        return self._decode(embeds, attention_mask, self.arch.decode_positions(positions), cache, extra)

    # -- internals --------------------------------------------------------------------------------------------
    def _generate_tokens(self, batch: _Batch, features, cfg: SamplingConfig, on_token, mitigation=None):
        b, s = batch.ids.shape
        cache = self._new_cache(b, s + cfg.max_new_tokens)
        extra = self._extra_inputs(batch, mitigation)
        visalign = visalign_state(self.visalign, mitigation, features, batch.image_mask)  # v_bar once per request
        t = time.perf_counter()
        logits = self.prefill(batch, features, cache, extra, visalign)  # [B, V]
        prefill_s = time.perf_counter() - t
        attention_mask = batch.attention_mask
        _, positions = self.arch.prefill_positions(batch.layout())  # [B] last prompt position

        def advance(next_ids: np.ndarray) -> np.ndarray:
            nonlocal attention_mask, positions
            attention_mask = np.concatenate([attention_mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            positions = positions + 1
            return self.decode_one_token(next_ids, attention_mask, positions, cache, extra, visalign)

        out, reasons, timings = self._token_loop(logits, advance, cfg, batch, on_token)
        timings["prefill_s"] = prefill_s
        return out, reasons, timings

    def _token_loop(self, logits: np.ndarray, advance, cfg: SamplingConfig, batch: _Batch, on_token):
        """Select a token per row from `logits` [B, V], hand the batch's next ids to `advance` for the next
        logits, until every row stops or max_new_tokens is reached."""
        b = logits.shape[0]
        rngs = [np.random.default_rng(None if cfg.seed is None else cfg.seed + i) for i in range(b)]
        seen = [batch.ids[i][batch.attention_mask[i] == 1] for i in range(b)]
        stop = set(cfg.stop_token_ids) | set(self.stop_ids)
        out: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, dtype=bool)
        reasons = ["length"] * b
        texts = [""] * b
        steps: list[float] = []
        for step in range(cfg.max_new_tokens):
            t = time.perf_counter()
            next_ids = select_tokens(logits, cfg, seen, rngs)
            next_ids = np.where(done, self.pad_id, next_ids)
            for i in range(b):
                if done[i]:
                    continue
                tok = int(next_ids[i])
                out[i].append(tok)
                seen[i] = np.append(seen[i], tok)
                if tok in stop:
                    done[i], reasons[i] = True, "stop"
                elif on_token is not None:
                    new_text = self.prompts.decode(out[i])
                    on_token(i, tok, new_text[len(texts[i]):])
                    texts[i] = new_text
            if done.all() or step == cfg.max_new_tokens - 1:
                steps.append(time.perf_counter() - t)
                break
            logits = advance(next_ids)
            steps.append(time.perf_counter() - t)
        return out, reasons, {"decode_steps_s": steps, "new_tokens": int(sum(len(o) for o in out))}

    def _generate_iava(self, encoded: list[EncodedPrompt], general: list[EncodedPrompt], features: np.ndarray,
                       cfg: SamplingConfig, on_token, specs: list, params: list[IavaParams], visual: VisualInput,
                       features_g: np.ndarray | None = None):
        """IAVA (runtime/iava.py): probe prefill of [G..., Q...], the irrelevant sets, the V* prefill written into
        the G rows' cache slots, then both streams decoded as one batch of 2B rows [V*..., V...]."""
        b = len(encoded)
        n = visual.num_images
        shifted = [replace(e, images=[i + n for i in e.images]) for e in encoded]  # the Q rows' copy of the images
        both = self._pad(general + shifted, visual.repeat(2))  # rows 0..b-1: G, rows b..2b-1: Q (one length S)
        s = both.ids.shape[1]
        # [2 * total, d]: the G rows' images (with G's own features where they depend on the prompt), then the Q rows'
        features2 = np.concatenate([features if features_g is None else features_g, features])
        cache = self._new_cache(2 * b, s + cfg.max_new_tokens)
        specs2 = list(specs) * 2
        timings: dict[str, Any] = {}
        # 1. probe prefill: att_G, att_Q at the last prompt row of each stream
        t = time.perf_counter()
        extra = self._extra_inputs(both, specs2)
        visalign_both = visalign_state(self.visalign, specs2, features2, both.image_mask)
        # the shared and compacted passes (runtime/iava.py): the same decision for G, Q and V* (their flags are specs')
        allowed = compaction_allowed(self.manifest.row_lengths, cache, extra)
        shared = None
        if features_g is None and allowed:
            shared = self._shared_probe_prefill(both, features2, cache, specs2, visalign_both)
        if shared is None:
            fetched = {PROBE_OUTPUT: None}
            extra[PROBE_ENABLE] = np.ones(2 * b, dtype=bool)
            logits_both = self.prefill(both, features2, cache, extra, visalign_both, fetch=fetched)
            att = fetched[PROBE_OUTPUT].mean(axis=1)  # [2B, S]: mean over heads (in the graph), then over layers
            q_slots, q_offset = np.full(b, s, dtype=np.int64), np.zeros(b, dtype=np.int64)
        else:  # each row holds its real tokens only, from slot 0 (no left padding)
            logits_both, att, slots, _ = shared
            q_slots, q_offset = slots[b:], s - slots[b:]
        timings["probe_prefill_s"] = time.perf_counter() - t
        # 2. irrelevant tokens; V* = the Q rows with V \ I hidden, positions unchanged
        query = both.rows(b, 2 * b)
        hidden = query.attention_mask.copy()  # [B, S]
        details = []
        for r in range(b):
            g_pos, q_pos = np.flatnonzero(both.image_mask[r]), np.flatnonzero(query.image_mask[r])
            att_g, att_q = att[r, g_pos], att[b + r, q_pos]
            irrelevant = select_irrelevant(att_g, att_q, params[r].count(len(q_pos)), params[r].lam)
            hidden[r, q_pos[~irrelevant]] = 0
            details.append({"iava": {"irrelevant": np.flatnonzero(irrelevant).tolist(), "att_general": att_g,
                                     "att_query": att_q}})
        positions, last_q = self.arch.prefill_positions(query.layout())  # from the padding mask, not V*
        star = _Batch(query.ids, hidden, query.image_mask, query.prompt_lengths, query.spans, query.images,
                      query.visual)
        t = time.perf_counter()
        embeds = self._embed(star.ids, features, star.image_mask,
                             visalign_state(self.visalign, specs, features, star.image_mask))
        extra = {**self._extra_inputs(star, specs), PROBE_ENABLE: np.zeros(b, dtype=bool)}
        # V* rows computed and kept compacted (runtime/iava.py): the prompt's last token must be one V* sees
        compact = allowed and bool(hidden[:, -1].all()) and bool(star.image_mask.any(axis=1).all())
        if compact:
            logits_star, star_slots = self._contrastive_prefill(star, embeds, positions, cache, specs, q_offset)
        else:
            logits_star = self._decode(embeds, hidden, positions, cache, extra, rows=(0, b))  # into the G rows' slots
        timings["contrastive_prefill_s"] = time.perf_counter() - t
        timings["prefill_s"] = timings["probe_prefill_s"] + timings["contrastive_prefill_s"]
        # 3. both streams as one batch: rows 0..b-1 see V*, rows b..2b-1 see V
        streams = _Batch(np.concatenate([star.ids, query.ids]), np.concatenate([hidden, query.attention_mask]),
                         np.concatenate([star.image_mask, query.image_mask]), query.prompt_lengths * 2,
                         query.spans * 2, query.images * 2, query.visual)
        extra = {**self._extra_inputs(streams, specs2), PROBE_ENABLE: np.zeros(2 * b, dtype=bool)}
        visalign = visalign_state(self.visalign, specs2, features2, streams.image_mask)
        alpha = np.array([p.alpha for p in params])
        beta_cut = np.array([np.nan if p.beta_cut is None else p.beta_cut for p in params])
        attention_mask = streams.attention_mask
        lengths = np.concatenate([np.full(b, s), q_slots])  # cache slots per row; the new token goes to slot lengths[r]
        q_mask = query.attention_mask if shared is None else compacted_mask(hidden, q_slots)
        if compact:  # V* rows hold only what they see: each decodes at its own length
            lengths[:b] = star_slots
            attention_mask = np.concatenate([compacted_mask(hidden, lengths[:b]), q_mask])
        for r in range(b):
            details[r]["iava"]["contrastive_slots"] = int(lengths[r])  # the V* row's cache slots after its prefill
            details[r]["iava"]["shared_prefix"] = 0 if shared is None else int(shared[3][r])  # computed once for G, Q
        last = np.concatenate([last_q, last_q])  # [2B] last prompt position of each stream

        def advance(next_ids: np.ndarray) -> np.ndarray:
            nonlocal attention_mask, last, lengths
            attention_mask, lengths = append_token(attention_mask, lengths)
            last = last + 1
            logits = self.decode_one_token(np.concatenate([next_ids, next_ids]), attention_mask, last, cache, extra,
                                           visalign)  # [2B, V]
            return contrastive_scores(logits[b:], logits[:b], alpha, beta_cut)

        first = contrastive_scores(logits_both[b:], logits_star, alpha, beta_cut)
        out, reasons, loop_timings = self._token_loop(first, advance, cfg, query, on_token)
        timings.update(loop_timings)
        return out, reasons, timings, details

    def _shared_probe_prefill(self, both: _Batch, features: np.ndarray, cache: KVCache, specs: list,
                              visalign: VisAlignState | None) -> tuple[np.ndarray, ...] | None:
        """IAVA's probe prefill of [G..., Q...] with the prefix the two prompts share computed once (issue 18: "the
        two streams share the prefix where tokens and positions are identical"). Through the end of the last image
        span, G and Q hold the same tokens at the same positions (the chat template before the image, the image),
        and a causal row there sees only that prefix, so its keys and values are the same in both rows. Per request
        r: one pass over that prefix in Q's cache row, a copy of its slots into G's row, then one pass each over G's
        and Q's own text with the probe on (their last rows' attention over every key, prefix included). Each row
        holds its real tokens from slot 0 (no left padding) and is decoded at its own length (the fused decoder
        reads per-row lengths). Not when G and Q differ before the image's end (a template with the prompt before
        the image), when either has no text after it, or with prompt-conditioned image features (InstructBLIP);
        the caller checks the rest (runtime/iava.py `compaction_allowed`). Per-row passes: onnxruntime's CPU
        GroupQueryAttention takes new tokens over a past only for batch 1.
        -> (last-token logits [2b, V], probe attention [2b, S] in the padded layout, slots per row [2b], shared
        prefix length per request [b]) or None."""
        b, s = both.ids.shape[0] // 2, both.ids.shape[1]
        positions, _ = self.arch.prefill_positions(both.layout())
        plan = []
        for r in range(b):
            real = [np.flatnonzero(both.attention_mask[x]) for x in (r, b + r)]
            image = [np.flatnonzero(both.image_mask[x]) for x in (r, b + r)]
            if not image[0].size or not image[1].size:
                return None
            ends = [int(np.searchsorted(real[i], image[i][-1])) + 1 for i in (0, 1)]  # prefix length in real tokens
            if ends[0] != ends[1] or ends[0] >= min(len(real[0]), len(real[1])):
                return None
            head = [real[i][:ends[0]] for i in (0, 1)]
            if not np.array_equal(both.ids[r, head[0]], both.ids[b + r, head[1]]) or not np.array_equal(
                    np.take(positions, [r], axis=-2)[..., head[0]], np.take(positions, [b + r], axis=-2)[..., head[1]]):
                return None
            plan.append((real, ends[0]))
        embeds = self._embed(both.ids, features, both.image_mask, visalign)  # [2b, S, d]
        att = np.zeros((2 * b, s), dtype=np.float32)
        slots = np.zeros(2 * b, dtype=np.int64)
        cache.update(s)  # the prompt's length: what the rows' slots are checked against
        rows_logits: list[np.ndarray | None] = [None] * (2 * b)

        def one_row(x: int, cols: np.ndarray, keys: int, probe: bool) -> np.ndarray:
            extra = {**self._extra_inputs(both.rows(x, x + 1), specs[x:x + 1]),
                     PROBE_ENABLE: np.full(1, probe, dtype=bool)}
            fetched = {PROBE_OUTPUT: None} if probe else None
            out = self._decode(embeds[x:x + 1, cols], np.ones((1, keys), dtype=np.int64),
                               np.take(positions, [x], axis=-2)[..., cols], cache, extra, rows=(x, 1), fetch=fetched)
            if probe:  # [1, layers, keys]: mean over heads (in the graph), then over layers; back to padded columns
                att[x, np.flatnonzero(both.attention_mask[x])] = fetched[PROBE_OUTPUT].mean(axis=1)[0]
            return out

        for r, (real, end) in enumerate(plan):
            q = b + r
            chunk = self.prefill_chunk or end  # the shared prefix, in Q's row, in chunks as a plain prefill runs
            for start in range(0, end, chunk):
                stop = min(start + chunk, end)
                one_row(q, real[1][start:stop], stop, probe=False)
            cache.move_slots(q, np.arange(end), r)  # ... and G's
            for x, cols in ((r, real[0]), (q, real[1])):
                rows_logits[x] = one_row(x, cols[end:], len(cols), probe=True)
                slots[x] = len(cols)
        return np.concatenate(rows_logits), att, slots, np.array([end for _, end in plan], dtype=np.int64)

    def _contrastive_prefill(self, star: _Batch, embeds: np.ndarray, positions: np.ndarray, cache: KVCache,
                             specs: list, q_offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IAVA's V* prefill, computed compacted (runtime/iava.py), one pass per V* row r (cache rows 0..b-1; the Q
        rows b..2b-1 hold the probe prefill). The slots before r's first image position are the Q row's (same
        tokens, positions and causal context, so the same keys and values): copied from row b + r. One pass over the
        positions V* sees from there on (the image tokens in I and the text), at their own positions, writes them
        right after that prefix and returns the last token's logits. The image tokens V* hides are never computed:
        no row reads their keys, and their own outputs feed nothing. Per-row passes: onnxruntime's CPU
        GroupQueryAttention takes new tokens over a past only for batch 1. -> (logits [b, V], slots per row [b])"""
        b = star.ids.shape[0]
        logits, slots = [], []
        for r in range(b):
            keep = np.flatnonzero(star.attention_mask[r])
            first = np.flatnonzero(star.image_mask[r])[0]
            prefix, rest = keep[keep < first], keep[keep >= first]
            cache.move_slots(b + r, prefix - q_offset[r], r)  # the Q row's slots (q_offset: its left padding, if dropped)
            row = star.rows(r, r + 1)
            extra = {**self._extra_inputs(row, specs[r:r + 1]), PROBE_ENABLE: np.zeros(1, dtype=bool)}
            logits.append(self._decode(embeds[r:r + 1, rest], np.ones((1, keep.size), dtype=np.int64),
                                       np.take(positions, [r], axis=-2)[..., rest], cache, extra, rows=(r, 1)))
            slots.append(keep.size)
        return np.concatenate(logits), np.array(slots, dtype=np.int64)

    def _embed(self, ids: np.ndarray, features: np.ndarray, image_mask: np.ndarray,
               visalign: VisAlignState | None = None) -> np.ndarray:
        feed = {"input_ids": ids, "image_features": self.arch.embed_features(features, self.embed),
                "image_mask": image_mask}
        if self.visalign is not None:
            feed.update(self.visalign.inputs(visalign, ids.shape[0], self.hidden))
        return self.embed.run(feed, ["inputs_embeds"])["inputs_embeds"]

    def _decode(self, embeds, attention_mask, position_ids, cache: KVCache, extra: dict, *,
                rows: tuple[int, int] | None = None, fetch: dict | None = None) -> np.ndarray:
        """One decoder pass → last-position logits [B, V]. `rows=(start, n)`: a prefill without past written into
        cache rows start..start+n-1 (IAVA's contrastive stream); `fetch`: extra outputs to return into the dict."""
        sess = self.decoder.session
        new = embeds.shape[1]
        if rows is None and fetch is None and cache.in_place:  # the usual step: KV bound once per request
            cache.check_room(new)
            binding, host = cache.shared_binding(sess, first_host=self._step_logits)
            self._bind_inputs(binding, embeds, attention_mask, position_ids, extra, cache.bound_extra)
            sess.run_with_iobinding(binding)
            cache.update(new)
            # a copy: the binding keeps its logits buffer and the next step writes into it
            out = host if host is not None else binding.get_outputs()[0].numpy()
            return np.array(out[:, -1, :], dtype=np.float32)
        binding = sess.io_binding()
        self._bind_inputs(binding, embeds, attention_mask, position_ids, extra)
        binding.bind_output("logits", "cpu")  # bound first: get_outputs() follows the binding order
        names = list(fetch) if fetch is not None else []
        for name in names:
            binding.bind_output(name, "cpu")
        if rows is None:
            cache.bind(binding, new)
        else:
            cache.bind_rows_prefill(binding, *rows)
        sess.run_with_iobinding(binding)
        if rows is None:
            cache.update(new)
        outputs = binding.get_outputs()
        for k, name in enumerate(names, start=1):
            fetch[name] = outputs[k].numpy()
        logits = outputs[0].numpy()  # [B, 1, V]
        return logits[:, -1, :].astype(np.float32, copy=False)

    def _step_logits(self, batch: int) -> tuple[tuple[int, int, int], np.dtype] | None:
        """(shape, dtype) of the decoder's logits for `batch` rows when the graph declares them [batch, 1, V]
        with V known (the exported decoder keeps only the last position), so a host array can be bound once
        (runtime/kv_cache.py `shared_binding`); None otherwise (a backend without static shapes, TensorRT)."""
        if self._logits_spec is _UNREAD:
            spec = None
            for out in self.decoder.session.get_outputs():
                dims = list(getattr(out, "shape", None) or [])
                if out.name == "logits" and len(dims) == 3 and dims[1] == 1 and isinstance(dims[2], int):
                    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(out.type)
                    spec = None if dtype is None else (dims[2], np.dtype(dtype))
            self._logits_spec = spec
        if self._logits_spec is None:
            return None
        vocab, dtype = self._logits_spec
        return (batch, 1, vocab), dtype

    @staticmethod
    def _bind_inputs(binding, embeds, attention_mask, position_ids, extra: dict, bound: dict | None = None) -> None:
        """`bound`: a kept binding's record of the extra arrays already bound to it (name -> array). An array bound
        again is skipped: a binding reads the array's own memory at every run, so the same array object needs no
        rebinding (the baked methods' nine per-row inputs are the same arrays for a whole request: 150 -> 135 us of
        Python per int4 step of the issue-18 bench decoder, flags off). Callables (inputs as wide as the mask) are
        evaluated and bound every time."""
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in extra.items():
            if callable(value):
                value = value(attention_mask)
            elif bound is not None:
                if bound.get(name) is value:
                    continue
                bound[name] = value
            binding.bind_cpu_input(name, value)

    def _new_cache(self, rows: int, max_len: int) -> KVCache:
        """KV buffers where the decoder runs (device memory on CUDA / TensorRT; see runtime/kv_cache.py)."""
        return KVCache(self.num_layers, rows, self.kv_heads, self.head_dim, max_len, self.kv_dtype,
                       device=self.decoder.device, device_id=getattr(self.decoder, "device_id", 0),
                       allocator=getattr(self.decoder, "allocate", None),
                       in_place=self.manifest.attention_form == "gqa")

    def _extra_inputs(self, batch: _Batch, mitigation: Sequence | None = None) -> dict:
        """Decoder feeds beyond embeds/mask/positions/cache: the baked methods' inputs (runtime/mitigation.py).
        `mitigation`: one spec (dict or None) per batch row; None: every method off."""
        extra = set(self.decoder.input_names()) - _BASE_DECODER_INPUTS
        extra = {n for n in extra if not n.startswith("past_key_values.")}
        rows = None if mitigation is None else [parse_request(m, self.manifest.mitigation) for m in mitigation]
        feeds = decoder_feeds(self.manifest.mitigation, extra - {PROBE_ENABLE}, batch.image_mask, rows)
        if PROBE_ENABLE in extra:
            feeds[PROBE_ENABLE] = np.zeros(batch.ids.shape[0], dtype=bool)  # [B]; IAVA's probe prefill turns it on
        return feeds

    def _parse_iava(self, spec) -> IavaParams | None:
        params = parse_iava(spec.get("iava")) if isinstance(spec, dict) else None
        if params is not None and PROBE_OUTPUT not in self.decoder.output_names():
            raise FlagError("IAVA needs the attention probe, which this artifact lacks; run "
                            "`anchorrt bake ARTIFACT --mitigation probe` (or export with --mitigation probe)")
        return params

    def _pad(self, encoded: list[EncodedPrompt], visual: VisualInput | None = None) -> _Batch:
        s = max(len(e.ids) for e in encoded)
        b = len(encoded)
        ids = np.full((b, s), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, s), dtype=np.int64)
        img = np.zeros((b, s), dtype=bool)
        spans = []
        for i, e in enumerate(encoded):
            n = len(e.ids)
            ids[i, s - n:], mask[i, s - n:], img[i, s - n:] = e.ids, 1, e.image_mask
            spans.append([(a + s - n, z + s - n) for a, z in e.spans])
        return _Batch(ids, mask, img, [len(e.ids) for e in encoded], spans, [list(e.images) for e in encoded], visual)

    def _encode_general(self, instruction: str, images: list, counts: Sequence[int], indices) -> EncodedPrompt:
        """IAVA's general prompt G over the request's images (same spans as its query)."""
        enc = self.prompts.encode(instruction, len(images), tokens_per_image=list(counts))
        enc.images = list(indices)
        return enc

    def _load(self, image: Any, index: int):
        """One image source -> RGB PIL image; `index`: its place among the group's images (for messages)."""
        if image is None:
            raise ImageError(f"request {index} has no image; this model answers about an image: pass one")
        return load_image(image, max_pixels=self.max_image_pixels)

    def _sampling_config(self, kw: dict) -> SamplingConfig:
        allowed = set(SamplingConfig.__dataclass_fields__)
        bad = set(kw) - allowed
        if bad:
            raise FlagError(f"unknown generation option(s): {', '.join(sorted(bad))}; known: {', '.join(sorted(allowed))}")
        if "stop_token_ids" in kw:
            kw = dict(kw, stop_token_ids=tuple(kw["stop_token_ids"]))
        return SamplingConfig(**kw).validate()

    @staticmethod
    def _input_dtype(backend, name: str):
        for i in backend.session.get_inputs():
            if i.name == name:
                return np.float16 if "float16" in i.type else np.float32
        raise ArtifactError(f"graph '{backend.path.name}' has no input '{name}'; re-export")


def _chunkable(cache: KVCache, extra: dict) -> bool:
    """Chunked prefill needs the in-place cache (the fused form), one row (ONNX Runtime 1.32's CPU
    GroupQueryAttention refuses several new tokens over a past for batch > 1: "batch_size must be 1 when
    sequence_length > 1 and past context is given"; the caller checks that) and every baked method off (CLVA's
    statistics and the probe read prompt rows beyond a chunk)."""
    if not cache.in_place:
        return False
    flags = [v for k, v in extra.items() if k.endswith(".enable") or k == PROBE_ENABLE]
    return not any(np.any(v) for v in flags)


def _images_of(image: Any) -> list:
    """A request's image field -> its list of image sources (one image, or several in prompt order)."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ImageError("a request has an empty list of images; pass at least one image")
        return list(image)
    return [image]
