"""Parity of an artifact folder against the PyTorch model it came from (optimum's validate_model_outputs idea).

For each case (image, prompt) the transformers model and the exported graphs run the same prefill and the same
teacher-forced decode steps (the tokens transformers picks greedily); we report the largest absolute logit
difference per step and whether the greedy tokens agree. Used by `anchorrt verify` and by the tests.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from anchorrt.runtime.errors import FlagError, VerifyError

DEFAULT_PROMPTS = ("What is in the image?", "Describe the content of the image.")


@dataclass
class VerifyReport:
    max_abs_diff: float
    per_step_max_abs_diff: list[float]
    greedy_agreement: float  # fraction of (row, step) greedy tokens that agree
    tokens_torch: list[list[int]]
    tokens_onnx: list[list[int]]
    atol: float
    cases: int
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol and self.greedy_agreement == 1.0

    def summary(self) -> str:
        return (f"max |logit diff| {self.max_abs_diff:.3g} (tolerance {self.atol:g}) over prefill + "
                f"{len(self.per_step_max_abs_diff) - 1} decode steps, {self.cases} case(s); greedy tokens agree "
                f"{100 * self.greedy_agreement:.1f}%: {'PASS' if self.ok else 'FAIL'}")


def random_images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (64, 40), (50, 50), (30, 90)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def verify(model_dir: str | Path, artifact_dir: str | Path, *, images: Sequence | None = None,
           prompts: Sequence[str] | None = None, steps: int = 5, atol: float = 1e-4, batch: bool = True,
           providers: Sequence[str] | None = None, verify_files: bool = True) -> VerifyReport:
    """Compare logits (prefill + `steps` decode steps) of the torch model and the artifact on the same inputs.

    `batch=True` runs all cases as one left-padded batch (different prompt lengths), as a serving runtime would.
    transformers' deprecation chatter (a FutureWarning and a log line about `past_key_values` per call, the
    torchvision note) is muted for the call: the result is the report, printed once by the caller.
    """
    with _quiet_transformers():
        return _verify(model_dir, artifact_dir, images=images, prompts=prompts, steps=steps, atol=atol, batch=batch,
                       providers=providers, verify_files=verify_files)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def _verify(model_dir: str | Path, artifact_dir: str | Path, *, images: Sequence | None, prompts: Sequence[str] | None,
            steps: int, atol: float, batch: bool, providers: Sequence[str] | None, verify_files: bool) -> VerifyReport:
    import torch
    from anchorrt.runtime.pipeline import Pipeline
    from transformers import DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines replace transformers' weight-loading bar
    prompts = list(prompts or DEFAULT_PROMPTS)
    images = list(images) if images is not None else random_images(len(prompts))
    if len(images) != len(prompts):
        raise ValueError("verify needs one image per prompt")
    pipe = Pipeline.from_dir(artifact_dir, providers=providers, verify=verify_files)
    # the torch side: the exporter arch's `verify_torch_side` hook (Qwen2-VL: no AutoProcessor without torchvision;
    # InstructBLIP: decode steps on its language model), else the manifest architecture's transformers class
    architecture = pipe.manifest.data.get("architecture", "LlavaForConditionalGeneration")
    torch_side = _torch_side(architecture, model_dir)
    model = torch_side.model
    step_model = getattr(torch_side, "step_model", model)  # what runs a decode step
    template = pipe.manifest.prompt["template"]
    groups = [list(range(len(prompts)))] if batch else [[i] for i in range(len(prompts))]
    per_step: list[float] = []
    tok_t: list[list[int]] = []
    tok_o: list[list[int]] = []
    for group in groups:
        texts = [template.replace("{prompt}", prompts[i]) for i in group]
        pil = [pipe._load(images[i], i) for i in group]
        inputs = torch_side.inputs(pil, texts)
        # --- torch: prefill then teacher-forced greedy steps with a DynamicCache
        with torch.no_grad():
            past = DynamicCache()  # filled in place (InstructBLIP's output keeps it under language_model_outputs)
            more = torch_side.prefill_kwargs(inputs) if hasattr(torch_side, "prefill_kwargs") else {}
            out = model(**inputs, use_cache=True, past_key_values=past, **more)
            t_logits = [out.logits[:, -1, :].float().numpy()]
            mask = inputs["attention_mask"]
            chosen = [t_logits[-1].argmax(-1)]
            for _ in range(steps):
                nxt = torch.from_numpy(chosen[-1])[:, None]
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                more = torch_side.decode_kwargs(mask)
                out = step_model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True, **more)
                t_logits.append(out.logits[:, -1, :].float().numpy())
                chosen.append(t_logits[-1].argmax(-1))
        # --- onnx: the same inputs through the runtime's own stages
        visual = pipe.preprocess_images(pil)  # the runtime arch's tiles/feeds and per-image token counts
        enc = [pipe.prompts.encode(prompts[i], tokens_per_image=[n]) for i, n in zip(group, visual.tokens_per_image)]
        for k, e in enumerate(enc):
            e.images = [k]
        b = pipe._pad(enc, visual)
        if not _same_prompt_ids(b.ids, b.attention_mask, inputs["input_ids"].numpy(),
                                inputs["attention_mask"].numpy()):
            raise VerifyError(
                f"the artifact's prompt ids ({b.ids.shape[1]} tokens) differ from the checkpoint processor's "
                f"({inputs['input_ids'].shape[1]} tokens); is '{model_dir}' the checkpoint this artifact came from?"
            )
        feats = pipe.encode_images(visual, [prompts[i] for i in group])
        cache = pipe._new_cache(len(group), b.ids.shape[1] + steps + 1)
        extra = pipe._extra_inputs(b)
        o_logits = [pipe.prefill(b, feats, cache, extra)]
        amask, pos = b.attention_mask, pipe.arch.prefill_positions(b.layout())[1]
        for s in range(steps):
            amask = np.concatenate([amask, np.ones((len(group), 1), np.int64)], axis=1)
            pos = pos + 1
            o_logits.append(pipe.decode_one_token(chosen[s].astype(np.int64), amask, pos, cache, extra))
        for s, (tl, ol) in enumerate(zip(t_logits, o_logits)):
            d = float(np.abs(tl - ol).max())
            if s < len(per_step):
                per_step[s] = max(per_step[s], d)
            else:
                per_step.append(d)
        tok_t += np.stack([c for c in chosen[: steps + 1]], 1).tolist()
        tok_o += np.stack([ol.argmax(-1) for ol in o_logits], 1).tolist()
    agree = float(np.mean(np.array(tok_t) == np.array(tok_o)))
    return VerifyReport(max(per_step), per_step, agree, tok_t, tok_o, atol, len(prompts))


def _same_prompt_ids(ids, mask, hf_ids, hf_mask) -> bool:
    """The runtime's padded prompt ids against the processor's, row by row: the same width, the same visible
    tokens in order, and the same pad tokens (a wrong pad id is caught). Where the padding sits may differ:
    InstructBlipProcessor pads between its image tokens and the text, the runtime on the left; the positions
    (cumsum of the mask) and the visible keys are the same either way."""
    if ids.shape != hf_ids.shape:
        return False
    for r in range(ids.shape[0]):
        seen, hf_seen = mask[r] == 1, hf_mask[r] == 1
        if not np.array_equal(ids[r][seen], hf_ids[r][hf_seen]) or \
                not np.array_equal(np.sort(ids[r][~seen]), np.sort(hf_ids[r][~hf_seen])):
            return False
    return True


def _torch_side(architecture, model_dir):
    """The exporter arch's `verify_torch_side(model_dir)` hook, else `TransformersSide` (the manifest architecture's
    transformers class and AutoProcessor). A torch side has `model`, `inputs(images, texts)`, `decode_kwargs(mask)`,
    and optionally `prefill_kwargs(inputs)` and `step_model` (what runs a decode step; default `model`)."""
    from anchorrt.exporter.registry import get_arch, supported_architectures

    hook = getattr(get_arch(architecture), "verify_torch_side", None) if architecture in supported_architectures() \
        else None
    return TransformersSide(architecture, model_dir) if hook is None else hook(model_dir)


class TransformersSide:
    """verify's default torch side: `getattr(transformers, architecture)` and the checkpoint's AutoProcessor (left
    padding); positions as transformers' `generate` makes them (cumsum of the mask, prefill and decode), so that a
    processor that pads between the image tokens and the text (InstructBLIP) is compared at the right positions.
    Arch modules subclass it or bring their own object (exporter/archs/*.py `verify_torch_side`)."""

    def __init__(self, architecture: str, model_dir):
        import torch
        import transformers
        from transformers import AutoProcessor

        model_class = getattr(transformers, architecture, None)  # the registered exporter arch's transformers class
        if model_class is None:
            raise VerifyError(f"transformers has no class {architecture!r}; upgrade transformers to verify this artifact")
        self.model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.processor.tokenizer.padding_side = "left"

    @property
    def step_model(self):
        return self.model

    def inputs(self, images, texts) -> dict:
        return self.processor(images=images, text=texts, return_tensors="pt", padding=True)

    def prefill_kwargs(self, inputs) -> dict:
        return {"position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}

    def decode_kwargs(self, mask) -> dict:
        return {"position_ids": mask.sum(-1, keepdim=True) - 1}


# ------------------------------------------------------------------------------ precision vs fp32 (issue 6)

PRECISION_CHOICES = {  # name -> PrecisionOptions fields
    "fp16": {"precision": "fp16"},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "fp16+int4": {"precision": "fp16", "quantize": "int4"},
}


@dataclass
class PrecisionRow:
    precision: str
    ran: bool
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    top1_agreement: float | None = None  # fraction of (row, step) argmaxes equal to fp32's
    per_step_max_abs_diff: list[float] = field(default_factory=list)
    decode_ms_per_step: float | None = None  # one unwarmed run of `steps` decode steps: context, not a benchmark
    size_mb: float | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def parse_precisions(value: str | Sequence[str]) -> list[str]:
    items = [p.strip().lower() for p in (value.split(",") if isinstance(value, str) else value) if p.strip()]
    unknown = [p for p in items if p not in PRECISION_CHOICES]
    if unknown or not items:
        raise FlagError(f"unknown precision {unknown[0] if unknown else value!r}; choose from "
                          f"{', '.join(PRECISION_CHOICES)} (comma-separated)")
    return list(dict.fromkeys(items))


def _teacher_forced(pipe, images, prompts, steps: int, tokens: np.ndarray | None):
    """Prefill + `steps` decode steps; the next token is `tokens[:, s]` when given (teacher forcing), else the
    argmax. -> (logits [steps+1] of [B, V], chosen tokens [B, steps+1], seconds per decode step)."""
    import time


    visual = pipe.preprocess_images([pipe._load(img, i) for i, img in enumerate(images)])
    enc = [pipe.prompts.encode(p, tokens_per_image=[n]) for p, n in zip(prompts, visual.tokens_per_image)]
    for k, e in enumerate(enc):
        e.images = [k]
    b = pipe._pad(enc, visual)
    feats = pipe.encode_images(visual, list(prompts))
    cache = pipe._new_cache(len(prompts), b.ids.shape[1] + steps + 1)
    extra = pipe._extra_inputs(b)
    logits = [pipe.prefill(b, feats, cache, extra)]
    chosen = [logits[-1].argmax(-1) if tokens is None else tokens[:, 0]]
    amask, pos = b.attention_mask, pipe.arch.prefill_positions(b.layout())[1]
    t = time.perf_counter()
    for s in range(steps):
        amask = np.concatenate([amask, np.ones((len(prompts), 1), np.int64)], axis=1)
        pos = pos + 1
        logits.append(pipe.decode_one_token(chosen[-1].astype(np.int64), amask, pos, cache, extra))
        chosen.append(logits[-1].argmax(-1) if tokens is None else tokens[:, s + 1])
    per_step = (time.perf_counter() - t) / max(steps, 1)
    return logits, np.stack(chosen, 1), per_step


def _fp32_artifact(target: Path, work: Path, opset: int, say) -> Path:
    from anchorrt.runtime.manifest import MANIFEST_NAME, Manifest

    if (target / MANIFEST_NAME).is_file():
        p = Manifest.load(target).data.get("precision") or {}
        if p.get("weights", "fp32") != "fp32" or p.get("activations", "fp32") != "fp32":
            raise VerifyError(f"'{target}' is a {p.get('weights')}/{p.get('activations')} artifact; verify "
                              "--precision compares against fp32: pass the fp32 export (or the model folder)")
        return target
    from anchorrt.exporter.export import export_model

    say(f"exporting {target} (fp32, opset {opset})")
    out = work / "fp32"
    export_model(target, out, opset=opset, progress=say)
    return out


def verify_precisions(target: str | Path, precisions: str | Sequence[str] = ("fp16", "int8", "int4"), *,
                      images: Sequence | None = None, prompts: Sequence[str] | None = None, steps: int = 8,
                      providers: Sequence[str] | None = None, opset: int = 18, block_size: int = 32,
                      say=None) -> list[PrecisionRow]:
    """For each precision, build the artifact from the fp32 one (graph_passes/bake.py, in a temporary folder),
    run the same prefill + `steps` decode steps, teacher-forced on the fp32 greedy tokens, on the same prompts
    and images, and compare the logits with fp32's. `target`: an fp32 artifact folder, or a checkpoint folder
    (exported first; needs torch). A precision that the provider cannot run gets ran=False and the error."""
    import shutil
    import tempfile

    from anchorrt.graph_passes.bake import PrecisionOptions, convert_precision
    from anchorrt.runtime.pipeline import Pipeline

    say = say or (lambda msg: None)
    names = parse_precisions(precisions)
    prompts = list(prompts or DEFAULT_PROMPTS)
    images = list(images) if images is not None else random_images(len(prompts))
    if len(images) != len(prompts):
        raise VerifyError("verify needs one image per prompt")
    rows: list[PrecisionRow] = []
    with tempfile.TemporaryDirectory(prefix="anchorrt-verify-") as work:
        work = Path(work)
        base = _fp32_artifact(Path(target), work, opset, say)

        def size_mb(folder: Path) -> float:
            return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data")) / 1e6

        ref_pipe = Pipeline.from_dir(base, providers=providers)
        ref, tokens, ref_step = _teacher_forced(ref_pipe, images, prompts, steps, None)
        rows.append(PrecisionRow("fp32", True, 0.0, 0.0, 1.0, [0.0] * len(ref), 1000 * ref_step, size_mb(base)))
        for name in names:
            folder = work / name.replace("+", "_")
            shutil.copytree(base, folder, copy_function=os.link if _same_device(base, work) else shutil.copy2)
            say(f"building {name}")
            convert_precision(folder, PrecisionOptions(**PRECISION_CHOICES[name], block_size=block_size), verify=False)
            try:
                pipe = Pipeline.from_dir(folder, providers=providers, verify=False)
                logits, _, step_s = _teacher_forced(pipe, images, prompts, steps, tokens)
            except Exception as e:  # noqa: BLE001 - a provider without the kernels: reported in the table
                rows.append(PrecisionRow(name, False, size_mb=size_mb(folder),
                                         error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                continue
            diffs = [np.abs(a.astype(np.float64) - r) for a, r in zip(logits, ref)]
            agree = np.mean([a.argmax(-1) == r.argmax(-1) for a, r in zip(logits, ref)])
            rows.append(PrecisionRow(name, True, float(max(d.max() for d in diffs)),
                                     float(np.mean([d.mean() for d in diffs])), float(agree),
                                     [float(d.max()) for d in diffs], 1000 * step_s, size_mb(folder)))
    return rows


def _same_device(a: Path, b: Path) -> bool:
    return a.resolve().stat().st_dev == b.resolve().stat().st_dev


def precision_table(rows: Sequence[PrecisionRow], provider: str = "") -> str:
    """A markdown table of `verify_precisions` rows: accuracy against fp32 and size. No speed column: a few
    unwarmed decode steps per precision measure the machine, not the precision (two runs on the demo model gave
    0.82x and 1.42x for fp16); speed is `anchorrt profile`'s and `make bench`'s job."""
    head = ["precision", "max abs logit diff", "mean abs logit diff", "top-1 agreement", "graphs MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r.ran:
            lines.append(f"| {r.precision} | cannot run{' on ' + provider if provider else ''}: {r.error} | | | "
                         f"{r.size_mb:.2f} |")
            continue
        lines.append(f"| {r.precision} | {r.max_abs_diff:.3g} | {r.mean_abs_diff:.3g} | {100 * r.top1_agreement:.1f}% | "
                     f"{r.size_mb:.2f} |")
    return "\n".join(lines)
