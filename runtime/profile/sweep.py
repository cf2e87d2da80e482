"""The profile run: settings, the plan of cases (base, sweeps, mitigation A/B), interleaved execution, the optional
reference comparison and ONNX Runtime's own trace.

Protocol. Every case is warmed up `warmup` times, then measured `repeats` times. Cases are interleaved: each round
runs every case once, in plan order, so that slow drifts of a shared machine (thermal, neighbours) hit all cases
alike and ratios between them (mitigation on/off, batch 1 vs 4) stay meaningful.

    round 1..warmup+repeats:  base  batch=2  batch=4  ctx=…  ctx=…  clva@ctx…  sevi@ctx…  all@ctx…  images=2  images=4

Cases:
- base: batch 1, the prompt as given (`context` = its token count, image tokens included).
- batch sweep: B copies of the request at the base context.
- context sweep: batch 1, the prompt grown with filler words to exactly C tokens (`context` in the report is the
  measured count). C below the base prompt or C + new_tokens past the model's context is refused before anything
  runs. Without `contexts` the sweep takes three points from the base prompt to the longest that fits.
- image sweep: load + preprocess + vision encoder for N images in one call (this prompt format takes one image per
  request, so more images means more requests: the decoder side of that is the batch sweep).
- mitigation A/B: for each method baked into the artifact (`manifest.mitigation`; a baked probe is measured as IAVA,
  the request method that runs on it), batch 1 at the base context and
  at every context of the context sweep, with that method on and every other off, and with all on when there are
  several; the plain run has every method off explicitly (an artifact may default a method to on). Ratios are taken
  to the plain run of the same context, round by round (paired), then summarised.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from anchorrt.runtime.errors import FlagError, PromptError
from anchorrt.runtime.profile.measure import DeviceMemory, HostMemory, Progress, Ranges, now
from anchorrt.runtime.profile.stages import Case, Instrumented

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
DEFAULT_PROMPT = "Describe the content of the image in detail."
FILLER_WORDS = (" the", " a", " and", " image", " of", " is")
AUTO_CONTEXT_POINTS = 3


@dataclass
class ProfileSettings:
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    contexts: tuple[int, ...] | None = None  # None: three points from the base prompt to the longest that fits
    images: tuple[int, ...] = (1, 2, 4)
    warmup: int = 1
    repeats: int = 5
    new_tokens: int = 32
    device: str = "cpu"
    prompt: str = DEFAULT_PROMPT
    image: str | None = None  # None: a deterministic random 400x500 RGB image
    mitigation: bool = True  # A/B of every baked method
    verify: bool = True
    allow_fallback: bool = False
    threads: int | None = None  # onnxruntime intra-op threads (None: its default)

    def validate(self) -> ProfileSettings:
        for name in ("batch_sizes", "images"):
            _positive_list(name, getattr(self, name))
        if self.contexts is not None:
            _positive_list("contexts", self.contexts)
        _int_at_least("warmup", self.warmup, 0)
        _int_at_least("repeats", self.repeats, 1)
        _int_at_least("new_tokens", self.new_tokens, 2, why=" (one token from the prefill, at least one decode step)")
        if self.threads is not None:
            _int_at_least("threads", self.threads, 1)
        if self.device not in PROVIDERS:
            raise FlagError(f"device must be one of {', '.join(sorted(PROVIDERS))}, got {self.device!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise FlagError("the prompt is empty; give a question or instruction")
        return self


def _int_at_least(name: str, v: Any, lo: int, why: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise FlagError(f"{name} must be an integer >= {lo}{why}, got {v!r}")


def _positive_list(name: str, values: Any) -> None:
    if not isinstance(values, (list, tuple)) or not values:
        raise FlagError(f"{name} must be a non-empty list of positive integers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FlagError(f"{name} must hold positive integers only, got {v!r}")
    if len(set(values)) != len(values):
        raise FlagError(f"{name} lists a value twice: {list(values)}")


class Reference(Protocol):
    """Another implementation to compare with (e.g. transformers eager `generate`), run interleaved."""

    name: str

    def generate(self, new_tokens: int) -> float:
        """Generate exactly `new_tokens` tokens for the base request; return the wall time in seconds."""

    def info(self) -> dict:
        """What was run (library versions, device, dtype): recorded in the report."""


# -- prompts of a given length -------------------------------------------------------------------------------
class PromptSizer:
    """Grow a prompt with a filler word that adds one token per copy, to reach an exact token count."""

    def __init__(self, prompts, prompt: str) -> None:
        self.prompts, self.prompt = prompts, prompt
        self.base_length = self.length(prompt)
        self.filler = next((w for w in FILLER_WORDS if all(self.length(prompt + w * k) == self.base_length + k
                                                            for k in (1, 2, 5))), None)

    def length(self, text: str) -> int:
        return len(self.prompts.encode(text).ids)

    def grow(self, context: int) -> str:
        extra = context - self.base_length
        if extra == 0:
            return self.prompt
        if self.filler is None:
            raise FlagError("cannot grow the prompt one token at a time with this tokenizer; profile without "
                            "--contexts, or pass a longer --prompt")
        text = self.prompt + self.filler * extra
        if self.length(text) != context:
            raise FlagError(f"the prompt grown to {context} tokens encodes to {self.length(text)}; "
                            "pass other --contexts")
        return text


def check_contexts(contexts: Sequence[int], base: int, limit: int, new_tokens: int, image_tokens: int) -> None:
    """Refuse a context shorter than the base prompt or one that, with the new tokens, does not fit the model."""
    longest = limit - new_tokens
    for c in contexts:
        if c < base:
            raise FlagError(f"context {c} is shorter than the prompt with its image ({base} tokens, {image_tokens} of "
                            f"them image tokens); the contexts this model can be profiled at are {base}..{longest}")
        if c > longest:
            raise FlagError(f"context {c} + {new_tokens} new tokens is past the model's context of {limit} tokens; "
                            f"the longest context with {new_tokens} new tokens is {longest}")


def auto_contexts(base: int, limit: int, new_tokens: int) -> list[int]:
    longest = limit - new_tokens
    if longest <= base:
        return [base]
    pts = np.geomspace(base, longest, AUTO_CONTEXT_POINTS)
    return sorted({int(round(p)) for p in pts} | {base, longest})


# -- plan ----------------------------------------------------------------------------------------------------
# A baked manifest entry -> the `generate_batch(mitigation=...)` key that switches it on per request. The attention
# probe is not a method of its own: it is what IAVA runs on (runtime/iava.py), so a probe-baked artifact is profiled
# with IAVA on and off.
REQUEST_KEYS = {"probe": "iava"}


def methods_of(manifest) -> list[str]:
    """The request-level mitigation methods the artifact's baked entries provide, in manifest order."""
    out: list[str] = []
    for entry in manifest.mitigation:
        key = REQUEST_KEYS.get(str(entry), str(entry))
        if key not in out:
            out.append(key)
    return out


def mitigation_flags(methods: Sequence[str], on: Sequence[str]) -> dict:
    """`generate_batch(mitigation=...)`: every baked method named, the ones in `on` True, the others False."""
    return {m: (m in on) for m in methods}


def make_plan(s: ProfileSettings, sizer: PromptSizer, contexts: Sequence[int], methods: Sequence[str]) -> list[Case]:
    base_ctx = sizer.base_length
    cases: dict[tuple, Case] = {}

    def gen(batch: int, context: int, sweep: str, variant: str = "plain", on: Sequence[str] = ()) -> None:
        key = (batch, context, variant)
        if key not in cases:
            flags = mitigation_flags(methods, on) if methods else None
            cases[key] = Case(key=f"b{batch}-c{context}-{variant}", kind="generate", batch=batch, images=batch,
                              context=context, prompt=sizer.grow(context), variant=variant, mitigation=flags)
        if sweep not in cases[key].sweeps:
            cases[key].sweeps.append(sweep)

    gen(1, base_ctx, "base")
    for b in s.batch_sizes:
        gen(b, base_ctx, "batch")
    for c in contexts:
        gen(1, c, "context")
    if s.mitigation and methods:
        for c in sorted({base_ctx, *contexts}):
            gen(1, c, "mitigation")
            for m in methods:
                gen(1, c, "mitigation", variant=m, on=[m])
            if len(methods) > 1:
                gen(1, c, "mitigation", variant="all", on=methods)
    plan = list(cases.values())
    for n in s.images:
        plan.append(Case(key=f"images{n}", kind="vision", batch=n, images=n, context=None, prompt=None,
                         sweeps=["images"]))
    return plan


# -- running -------------------------------------------------------------------------------------------------
@dataclass
class Measured:
    case: Case
    runs: list[dict] = field(default_factory=list)


def default_image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 500, 3), dtype=np.uint8))


def run_profile(artifact_dir: str | Path, settings: ProfileSettings, *, progress: Progress | None = None,
                reference: Reference | Callable[[], Reference] | None = None,
                trace_dir: str | Path | None = None) -> dict:
    """Profile an artifact folder; returns the report (see runtime.profile.report for its schema).

    `reference`: a Reference, or a function that makes one; the function is called only after the measured rounds,
    so that the reference's memory (a PyTorch model) stays out of the runtime's peak RSS."""
    from anchorrt.runtime.pipeline import Pipeline
    from anchorrt.runtime.preprocess import load_image
    from anchorrt.runtime.profile.report import build_report

    s = settings.validate()
    progress = progress or Progress(enabled=False)
    started = now()
    pipe = Pipeline.from_dir(artifact_dir, providers=PROVIDERS[s.device], verify=s.verify,
                             allow_fallback=s.allow_fallback, intra_op_threads=s.threads)
    host = HostMemory()
    device_memory = DeviceMemory(pipe.decoder.device)
    ranges = Ranges()
    inst = Instrumented(pipe, ranges, host, device_memory)
    image = load_image(s.image) if s.image else default_image()
    limit = pipe.prompts.context_length
    try:
        sizer = PromptSizer(pipe.prompts, s.prompt)
    except PromptError as exc:
        raise FlagError(f"the profile prompt cannot be used: {exc}") from None
    contexts = list(s.contexts) if s.contexts is not None else auto_contexts(sizer.base_length, limit, s.new_tokens)
    check_contexts(contexts, sizer.base_length, limit, s.new_tokens, pipe.tokens_per_image)
    methods = methods_of(pipe.manifest) if s.mitigation else []
    plan = make_plan(s, sizer, contexts, methods)
    notes = []
    if methods and not inst.accepts_mitigation:
        notes.append("this runtime's generate_batch takes no `mitigation` argument: the A/B variants ran without "
                     "flags (identical to the plain run); the ratios only test the plumbing")
    measured = [Measured(c) for c in plan]
    rounds = s.warmup + s.repeats
    total, done = rounds * len(plan), 0
    progress.note(f"profiling {Path(artifact_dir).name} on {pipe.decoder.provider}: {len(plan)} cases x "
                  f"({s.warmup} warm-up + {s.repeats} measured) rounds, {s.new_tokens} new tokens")
    for r in range(rounds):
        warm = r < s.warmup
        for m in measured:
            c = m.case
            what = f"{'warm-up' if warm else f'round {r - s.warmup + 1}/{s.repeats}'}: {_describe(c)}"
            progress.update(done, total, what)
            sample = inst.run_generate(c, image, s.new_tokens) if c.kind == "generate" else inst.run_vision(c, image)
            if not warm:
                m.runs.append(sample)
            done += 1
    progress.update(total, total, "measured", force=True)
    progress.close()
    ref = None
    if reference is not None:
        base = next(m.case for m in measured if "base" in m.case.sweeps)
        if not hasattr(reference, "generate"):
            progress.note("loading the reference ...")
            reference = reference()
        ref = compare_reference(inst, base, image, reference, s, progress)
        if np.median(ref["samples"]["reference_step_s"]) <= 0:
            notes.append("the reference's per-step time came out <= 0 (generate(1 + n) no slower than generate(1)): "
                         "too noisy to compare; raise --new-tokens or --repeats")
    traces = None
    if trace_dir is not None:
        base = next(m.case for m in measured if "base" in m.case.sweeps)
        traces = ort_trace(artifact_dir, s, base, image, Path(trace_dir), progress)
    env = environment(pipe, device_memory, ranges, host)
    settings_out = asdict(s)
    settings_out["contexts"] = contexts
    settings_out["contexts_auto"] = s.contexts is None
    return build_report(pipe.manifest, env, settings_out, measured, methods, ref, traces, notes,
                        base_context=sizer.base_length, elapsed_s=now() - started,
                        flags_applied=inst.accepts_mitigation)


def _describe(c: Case) -> str:
    if c.kind == "vision":
        return f"images={c.images} (preprocess + vision)"
    return f"batch={c.batch} context={c.context}" + ("" if c.variant == "plain" else f" {c.variant} on")


def compare_reference(inst: Instrumented, base: Case, image, reference: Reference, s: ProfileSettings,
                      progress: Progress) -> dict:
    """The foundation benchmark's protocol: per round, reference generate(1) and generate(1 + n), then the runtime.

    Reference TTFT = generate(1); reference per-step = (generate(1 + n) - generate(1)) / n. The runtime's TTFT here
    leaves out tokenize and preprocess, since the reference's inputs were prepared before `generate` was called."""
    n = s.new_tokens
    progress.note(f"reference: {reference.name}, {s.warmup} warm-up + {s.repeats} interleaved rounds")
    for _ in range(s.warmup):
        reference.generate(1)
        reference.generate(2)
        inst.run_generate(base, image, n)
    ref_ttft, ref_step, rt_ttft, rt_step = [], [], [], []
    for r in range(s.repeats):
        progress.update(r, s.repeats, f"reference round {r + 1}/{s.repeats}", force=r == 0)
        one = reference.generate(1)
        ref_ttft.append(one)
        ref_step.append((reference.generate(1 + n) - one) / n)
        run = inst.run_generate(base, image, n)
        rt_ttft.append(run["ttft_s"] - run["stages"]["tokenize"] - run["stages"]["preprocess"])
        rt_step.append(float(np.median(run["steps"]["token"])))
    progress.update(s.repeats, s.repeats, "reference done", force=True)
    progress.close()
    return {"name": reference.name, "info": reference.info(), "new_tokens": n,
            "samples": {"reference_ttft_s": ref_ttft, "reference_step_s": ref_step,
                        "runtime_ttft_s": rt_ttft, "runtime_step_s": rt_step}}


def ort_trace(artifact_dir, s: ProfileSettings, base: Case, image, out: Path, progress: Progress) -> list[str]:
    """onnxruntime's own profiler (chrome-trace JSON, one file per graph) over warm-up + one base generate call,
    in a separate pipeline so that the profiler's overhead stays out of the measured runs."""
    from anchorrt.runtime.pipeline import Pipeline

    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_dir(artifact_dir, providers=PROVIDERS[s.device], verify=False,
                             allow_fallback=s.allow_fallback, intra_op_threads=s.threads)
    pipe.stop_ids = ()
    roles = {"vision": pipe.vision, "embed": pipe.embed, "decoder": pipe.decoder}
    for role, backend in roles.items():
        backend.start_profiling(out / f"ort-trace-{role}")
    progress.note(f"onnxruntime trace: {s.warmup} warm-up + 1 base generate call")
    for _ in range(s.warmup + 1):
        pipe.generate_batch([(image, base.prompt)], max_new_tokens=s.new_tokens)
    paths = []
    for role, backend in roles.items():
        written = backend.end_profiling()
        if written is not None:
            dest = out / f"ort-trace-{role}.json"
            Path(written).replace(dest)
            paths.append(str(dest))
    return paths


def environment(pipe, device_memory: DeviceMemory, ranges: Ranges, host: HostMemory) -> dict:
    import os

    import onnxruntime as ort

    return {
        "device": pipe.decoder.device,
        "provider": pipe.decoder.provider,
        "gpu": device_memory.name,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "nvtx": ranges.active,
        "nvml": {"available": device_memory.available, "reason": device_memory.reason},
        "host_memory": {"source": host.source, "resettable": host.resettable},
    }

