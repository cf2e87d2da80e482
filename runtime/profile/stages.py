"""Per-stage timing of one generate call, measured on the pipeline's own generate loop.

The profiler runs `Pipeline.generate_batch` itself and wraps the pipeline's stage methods *on its own Pipeline
instance* (instance attributes that shadow the class methods; the class and every other instance are untouched):

    generate_batch ─┬─ prompts.encode ×B ............ tokenize
                    ├─ load + preprocess ............ preprocess  (the pipeline's preprocess_s minus tokenize)
                    ├─ encode_images ................ vision
                    ├─ (pad, KV cache, feeds) ....... setup       (gap between vision and prefill)
                    ├─ prefill ─┬─ _embed ........... embed
                    │           └─ _decode .......... prefill     (decoder passes over the prompt: every pass
                    │                                              between vision and the first decode step)
                    ├─ select_tokens ................ sample      (gap: prefill end → first decode call)
                    └─ per token: decode_one_token ─┬─ _embed ... decode_embed
                                                    └─ _decode .. decode
                                  select_tokens + loop ......... sample (the rest of the inter-token interval)

Why wrap rather than re-implement the loop: the loop keeps growing per-request state (mitigation feeds, VisAlign's
v_bar); a copy of it in the profiler would silently measure something the users do not run. Wrapping keeps the
measured code the shipped code. Stop tokens are ignored on this instance (`stop_ids = ()`), so every run decodes
exactly `new_tokens` tokens and per-position latencies line up across repeats.

Host↔device copies: on the CPU there are none (reported as null, "not applicable"). On CUDA the pipeline binds its
inputs from host memory and its logits to host memory, so ORT does those copies inside the decoder run; they are
timed here as separate copies of the same shapes right after each run (`copies`, "of which" the prefill/decode
figures include), not subtracted from the stage times.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import numpy as np
from anchorrt.runtime.profile.measure import DeviceMemory, HostMemory, Ranges, now

TTFT_STAGES = ("tokenize", "preprocess", "vision", "setup", "embed", "prefill", "sample")
STEP_STAGES = ("decode_embed", "decode", "sample")


@dataclass
class Case:
    """One measured configuration. kind "generate": a full generate call; kind "vision": preprocess + vision only."""

    key: str
    kind: str  # "generate" | "vision"
    batch: int
    images: int
    context: int | None  # prompt tokens asked for (None for vision cases)
    prompt: str | None
    variant: str = "plain"  # "plain", a mitigation method, or "all"
    mitigation: dict | None = None  # what is passed to generate_batch(mitigation=...)
    sweeps: list[str] = field(default_factory=list)


class _Recorder:
    """Durations and end times of wrapped calls, in call order, for the run in progress."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = {}  # name -> [(start, end)]

    def clear(self) -> None:
        self.calls = {}

    def add(self, name: str, start: float, end: float) -> None:
        self.calls.setdefault(name, []).append((start, end))

    def durations(self, name: str) -> list[float]:
        return [e - s for s, e in self.calls.get(name, [])]

    def spans(self, name: str) -> list[tuple[float, float]]:
        return self.calls.get(name, [])


class Instrumented:
    """A Pipeline whose stage methods record their wall time (and NVTX ranges, device-memory samples)."""

    def __init__(self, pipe, ranges: Ranges, host: HostMemory, device_memory: DeviceMemory) -> None:
        self.pipe = pipe
        self.ranges, self.host, self.device_memory = ranges, host, device_memory
        self.rec = _Recorder()
        self.device = pipe.decoder.device
        pipe.stop_ids = ()  # fixed-length runs: see the module docstring
        self._wrap(pipe, "encode_images", "vision")
        self._wrap(pipe, "_embed", "embed")
        self._wrap(pipe, "_decode", "decoder")
        self._wrap(pipe, "decode_one_token", "decode_call")
        self._wrap(pipe.prompts, "encode", "tokenize")
        self.accepts_mitigation = "mitigation" in inspect.signature(pipe.generate_batch).parameters

    def _wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)
        rec, ranges, dev = self.rec, self.ranges, self.device_memory

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with ranges.range(name):
                t = now()
                out = fn(*args, **kwargs)
                rec.add(name, t, now())
            dev.sample()
            return out

        setattr(obj, attr, timed)  # an instance attribute: shadows the method on this object only

    # -- runs -----------------------------------------------------------------------------------------------
    def run_generate(self, case: Case, image, new_tokens: int) -> dict:
        """One generate call of `case.batch` copies of (image, prompt); returns its samples (seconds, bytes)."""
        pipe, rec = self.pipe, self.rec
        kw = {"max_new_tokens": new_tokens}
        if case.mitigation is not None and self.accepts_mitigation:
            kw["mitigation"] = case.mitigation
        rec.clear()
        self.host.reset()
        self.device_memory.reset()
        with self.ranges.range(f"generate {case.key}"):
            t0 = now()
            results = pipe.generate_batch([(image, case.prompt)] * case.batch, **kw)
            t_end = now()
        timings = results[0].timings
        tokenize = sum(rec.durations("tokenize"))
        (v0, v1), = rec.spans("vision")
        calls = rec.spans("decode_call")
        first_call = calls[0][0] if calls else t_end
        # the prefill stage: every embed and decoder pass between the vision stage and the first decode step (one
        # prefill call; IAVA's probe, shared-prefix and V* passes, runtime/pipeline.py `_generate_iava`)
        passes = [span for name in ("embed", "decoder") for span in rec.spans(name) if v1 <= span[0] and
                  span[1] <= first_call]
        if not passes or len(calls) != new_tokens - 1:
            raise RuntimeError(f"expected prompt passes and {new_tokens - 1} decode steps, the pipeline ran "
                               f"{len(passes)} and {len(calls)}; the generate loop changed: update "
                               "runtime/profile/stages.py")
        p0, p1 = min(a for a, _ in passes), max(b for _, b in passes)
        # embed/decoder calls are attributed to the window they ran in, so a loop that adds passes stays counted
        ends = [p1] + [e for _, e in calls]

        def within(name: str, a: float, b: float) -> float:
            return sum(e - s for s, e in rec.spans(name) if a <= s and e <= b)

        stages = {
            "tokenize": tokenize,
            "preprocess": max(0.0, timings["preprocess_s"] - tokenize),
            "vision": v1 - v0,
            "setup": p0 - v1,
            "embed": within("embed", p0, p1),
            "prefill": within("decoder", p0, p1),
            "sample": first_call - p1,
        }
        token = [b - a for a, b in zip(ends[:-1], ends[1:])]  # inter-token interval, pass k → k+1
        decode_embed = [within("embed", a, b) for a, b in zip(ends[:-1], ends[1:])]
        decode = [within("decoder", a, b) for a, b in zip(ends[:-1], ends[1:])]
        steps = {"decode_embed": decode_embed, "decode": decode,
                 "sample": [t - e - d for t, e, d in zip(token, decode_embed, decode)], "token": token}
        out = {
            "wall_s": t_end - t0,
            "ttft_s": first_call - t0,
            "prompt_tokens": int(results[0].prompt_tokens),
            "stages": stages,
            "steps": steps,
            "copies": self._copy_probe(case.batch, results[0].prompt_tokens),
            "host_peak_rss_bytes": self.host.peak_bytes(),
            **self.device_memory.peaks(),
        }
        out["generated"] = [len(r.token_ids) for r in results]
        return out

    def run_vision(self, case: Case, image) -> dict:
        """Load + preprocess + vision encoder for `case.images` images in one call."""
        pipe, rec = self.pipe, self.rec
        rec.clear()
        self.host.reset()
        self.device_memory.reset()
        with self.ranges.range(f"vision {case.key}"):
            t0 = now()
            with self.ranges.range("preprocess"):
                visual = pipe.preprocess_images([pipe._load(image, i) for i in range(case.images)])  # the arch's feeds
            t1 = now()
            pipe.encode_images(visual)
            t2 = now()
        return {"wall_s": t2 - t0, "stages": {"preprocess": t1 - t0, "vision": sum(rec.durations("vision"))},
                "host_peak_rss_bytes": self.host.peak_bytes(), **self.device_memory.peaks()}

    # -- host↔device copies --------------------------------------------------------------------------------
    def _copy_probe(self, batch: int, prompt_tokens: int) -> dict | None:
        """On CUDA: the H2D copy of the prefill's inputs_embeds and a decode step's, and the D2H copy of the logits,
        each timed once on buffers of the real shapes. None on the CPU (no copies)."""
        if self.device == "cpu":
            return None
        import onnxruntime as ort

        p = self.pipe
        dtype = p.kv_dtype
        vocab = p.manifest.dims["vocab_size"]
        out = {}
        for name, shape in (("prefill_h2d", (batch, prompt_tokens, p.hidden)), ("step_h2d", (batch, 1, p.hidden))):
            host = np.ones(shape, dtype=dtype)
            t = now()
            ort.OrtValue.ortvalue_from_numpy(host, self.device, 0)  # synchronous copy to the device
            out[name] = now() - t
        logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, vocab], np.float32, self.device, 0)
        t = now()
        logits.numpy()  # device → host
        out["logits_d2h"] = now() - t
        return out
