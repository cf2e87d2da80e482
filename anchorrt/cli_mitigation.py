"""CLI pieces for the mitigation methods: bake-time options (export, bake), run-time flags (generate), and the
`generate --backend torch` path that runs the independent PyTorch reference for comparison.

Nothing here imports torch at import time: `bake` must run where torch is not installed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from anchorrt.runtime.errors import FlagError


def _layer_list(value: str | None, option: str = "--clva-drift-layers") -> tuple[int, ...] | None:
    """'3-7' or '3,4,5' (or a mix) -> (3, 4, 5, ...)."""
    if value is None:
        return None
    out: list[int] = []
    try:
        for part in value.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out += list(range(lo, hi + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise FlagError(f"{option} takes layer numbers like '3-7' or '3,4,5', got {value!r}") from None
    return tuple(out)


def bake_options(fn):
    """Bake-time choices shared by `export --mitigation` and `bake` (METHODS.md defaults when not given)."""
    options = [
        click.option("--clva-l-neg", type=int, default=None, help="CLVA negative-anchor layer [default: 0]."),
        click.option("--clva-l-pos", type=int, default=None, help="CLVA positive-anchor layer [default: L//2-2]."),
        click.option("--clva-drift-layers", default=None, metavar="LAYERS",
                     help="CLVA drift layers, e.g. '3-7' [default: l_pos+1 .. L-1]."),
        click.option("--sevi-start-layer", type=int, default=8, show_default=True,
                     help="First layer SEVI edits (literal, METHODS.md); must be below the model's layer count: SEVI "
                          "on a model with that many layers or fewer would change nothing and is refused."),
        click.option("--debug-outputs", is_flag=True, help="Also output CLVA anchor masks/head sets, SEVI head classes."),
        click.option("--probe-layers", default=None, metavar="LAYERS",
                     help="Layers IAVA's attention probe averages, e.g. '0-7' [default: every layer]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def make_bake_options(clva_l_neg, clva_l_pos, clva_drift_layers, sevi_start_layer, debug_outputs, probe_layers=None):
    from anchorrt.graph_passes.bake import BakeOptions

    return BakeOptions(clva_l_neg=clva_l_neg, clva_l_pos=clva_l_pos, clva_drift_layers=_layer_list(clva_drift_layers),
                       sevi_start_layer=sevi_start_layer, debug_outputs=debug_outputs,
                       probe_layers=_layer_list(probe_layers, "--probe-layers"))


def mitigation_flags(fn):
    """Run-time flags of `generate`: per-method switches and parameters (defaults from the artifact's manifest)."""
    options = [
        click.option("--clva/--no-clva", "clva", default=None, help="CLVA on/off (a --clva-* value turns it on)."),
        click.option("--clva-alpha", type=float, default=None, help="CLVA alpha (>= 0)."),
        click.option("--clva-beta", type=float, default=None, help="CLVA beta (>= 0)."),
        click.option("--clva-tau", type=float, default=None, help="CLVA tau (>= 0)."),
        click.option("--clva-lambda", type=float, default=None, help="CLVA lambda (>= 0)."),
        click.option("--sevi/--no-sevi", "sevi", default=None, help="SEVI on/off (a --sevi-* value turns it on)."),
        click.option("--sevi-omega", type=float, default=None, help="SEVI omega (>= 0)."),
        click.option("--sevi-kappa", type=float, default=None, help="SEVI kappa (in (0, 1])."),
        click.option("--iava/--no-iava", "iava", default=None,
                     help="IAVA contrastive decoding on/off (needs the probe: bake --mitigation probe)."),
        click.option("--iava-alpha", type=float, default=None, help="IAVA contrast strength a (>= 0) [default: 1]."),
        click.option("--iava-i", default=None, metavar="N|FRACTION",
                     help="IAVA: at most this many irrelevant image tokens (an integer, or a fraction like 0.1) "
                          "[default: 10%, rounded up]."),
        click.option("--iava-lambda", type=float, default=None, help="IAVA threshold width lambda [default: 0]."),
        click.option("--iava-instruction", default=None, help="IAVA general instruction G."),
        click.option("--iava-beta-cut", type=float, default=None,
                     help="IAVA plausibility cut-off in [0, 1] [default: off]."),
        click.option("--visalign/--no-visalign", "visalign", default=None,
                     help="VisAlign fusion on/off (artifacts exported from a VisAlign checkpoint; default: on)."),
    ]
    for option in reversed(options):
        fn = option(fn)

    @functools.wraps(fn)
    def wrapper(*args, clva, clva_alpha, clva_beta, clva_tau, clva_lambda, sevi, sevi_omega, sevi_kappa, iava,
                iava_alpha, iava_i, iava_lambda, iava_instruction, iava_beta_cut, visalign, **kwargs):
        from anchorrt.runtime.mitigation import merge_cli_flags

        spec = {
            "clva": merge_cli_flags("clva", clva, {"alpha": clva_alpha, "beta": clva_beta, "tau": clva_tau,
                                                   "lambda": clva_lambda}),
            "sevi": merge_cli_flags("sevi", sevi, {"omega": sevi_omega, "kappa": sevi_kappa}),
            "iava": merge_cli_flags("iava", iava, {"alpha": iava_alpha, "i": _count_or_fraction(iava_i),
                                                   "lambda": iava_lambda, "instruction": iava_instruction,
                                                   "beta_cut": iava_beta_cut}),
            "visalign": visalign,
        }
        return fn(*args, mitigation={k: v for k, v in spec.items() if v is not None} or None, **kwargs)

    return wrapper


def _count_or_fraction(value: str | None) -> int | float | None:
    """--iava-i: '12' is a count of image tokens, '0.1' a fraction of them."""
    if value is None:
        return None
    try:
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        raise FlagError(f"--iava-i takes a count like 12 or a fraction like 0.1, got {value!r}") from None


def generate_torch(model_dir: Path, images, prompts, max_new_tokens: int, mitigation: dict | None):
    """Greedy generation with the independent PyTorch reference (exporter/reference) and the same flags.
    -> list of (text, new token ids). Layer choices are METHODS.md's defaults (SEVI start_layer 8)."""
    from anchorrt.runtime.iava import parse_iava
    from anchorrt.runtime.mitigation import PARAMS, check_value

    mitigation = dict(mitigation or {})
    if mitigation.pop("visalign", None):
        raise FlagError("--backend torch does not run VisAlign; compare a VisAlign artifact with the ONNX backend "
                        "(its parity tests use exporter.visalign.reference)")
    iava = parse_iava(mitigation.pop("iava", None))
    if iava is not None and any(v not in (None, False) for v in mitigation.values()):
        raise FlagError("--backend torch runs IAVA on its own; drop --clva/--sevi, or use the ONNX backend to combine")
    hook = _arch_torch_generate(model_dir)  # an architecture with its own reference (Qwen2-VL)
    if iava is not None:
        if hook is not None:
            return hook(model_dir, images, prompts, max_new_tokens, iava=iava)
        return _generate_torch_iava(model_dir, images, prompts, max_new_tokens, iava)
    clva = sevi = None
    for method, setting in mitigation.items():
        if setting is False or setting is None:
            continue
        values = {} if setting is True else {k: check_value(method, k, v) for k, v in setting.items()}
        defaults = {k: p.default for k, p in PARAMS[method].items()}
        merged = {**defaults, **values}
        if method == "clva":
            clva = {"alpha": merged["alpha"], "beta": merged["beta"], "tau": merged["tau"], "lam": merged["lambda"]}
        else:
            sevi = {"omega": merged["omega"], "kappa": merged["kappa"]}

    if hook is not None:
        return hook(model_dir, images, prompts, max_new_tokens, clva=clva, sevi=sevi)
    import torch
    from transformers import AutoProcessor

    from anchorrt.exporter.archs.llava import DEFAULT_PROMPT_TEMPLATE
    from anchorrt.exporter.checkpoint import inspect_checkpoint
    from anchorrt.exporter.reference import ReferenceLlava
    from anchorrt.runtime.preprocess import load_image

    inspect_checkpoint(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    if getattr(processor, "chat_template", None):
        texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                                "text": p}]}],
                                               add_generation_prompt=True, tokenize=False) for p in prompts]
    else:
        texts = [DEFAULT_PROMPT_TEMPLATE.replace("{prompt}", p) for p in prompts]
    pil = [load_image(i).convert("RGB") for i in images]
    inputs = processor(images=pil, text=texts, return_tensors="pt", padding=True)
    ref = ReferenceLlava.from_pretrained(model_dir)
    eos = ref.hf.generation_config.eos_token_id
    with torch.no_grad():
        tokens = ref.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], max_new_tokens,
                              clva=clva, sevi=sevi, eos_token_id=eos)
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    out = []
    for row in tokens.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        out.append((processor.tokenizer.decode(row[:cut], skip_special_tokens=True), row[:cut]))
    return out


def _arch_torch_generate(model_dir: Path):
    """The exporter arch's `torch_generate` (checked checkpoint first), or None for the LLaVA path below."""
    from anchorrt.exporter.checkpoint import inspect_checkpoint
    from anchorrt.exporter.registry import get_arch

    return getattr(get_arch(inspect_checkpoint(model_dir).architecture), "torch_generate", None)


def _generate_torch_iava(model_dir: Path, images, prompts, max_new_tokens: int, params):
    """IAVA through its independent PyTorch reference (exporter/reference/iava.py), one request at a time."""
    from anchorrt.exporter.archs.llava import DEFAULT_PROMPT_TEMPLATE
    from anchorrt.exporter.checkpoint import inspect_checkpoint
    from anchorrt.exporter.reference.iava import ReferenceIava
    from anchorrt.runtime.preprocess import load_image

    inspect_checkpoint(model_dir)
    ref = ReferenceIava(model_dir)
    template = DEFAULT_PROMPT_TEMPLATE
    if getattr(ref.processor, "chat_template", None):
        rendered = ref.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\x00P\x00"}]}],
            add_generation_prompt=True, tokenize=False)
        template = rendered.replace("\x00P\x00", "{prompt}")
    out = []
    for image, prompt in zip(images, prompts):
        trace = ref.generate(load_image(image), prompt, template, alpha=params.alpha, i=params.i, lam=params.lam,
                             instruction=params.instruction, max_new_tokens=max_new_tokens, beta_cut=params.beta_cut)
        out.append((ref.processor.tokenizer.decode(trace.tokens, skip_special_tokens=True), trace.tokens))
    return out


def precision_options(fn):
    """Precision/quantization choices shared by `export` and `bake` (graph_passes/precision.py, quantize.py)."""
    options = [
        click.option("--precision", type=click.Choice(["fp32", "fp16"]), default=None,
                     help="fp16: weights and activations fp16, KV cache fp16; softmax/mask, norms, mitigation and "
                          "the logits stay fp32 [default: fp32]."),
        click.option("--quantize", type=click.Choice(["int4", "int8"]), default=None,
                     help="Decoder weight MatMuls: int4 (MatMulNBits, CUDA and CPU) or int8 (dynamic, CPU only)."),
        click.option("--block-size", type=int, default=32, show_default=True,
                     help="int4 block size along K (16, 32, 64, 128 or 256)."),
        click.option("--asymmetric", is_flag=True, help="int4 with per-block zero points (default: symmetric)."),
        click.option("--accuracy-level", type=click.IntRange(0, 4), default=0, show_default=True,
                     help="int4 MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute."),
        click.option("--vision-precision", type=click.Choice(["fp32", "fp16"]), default=None,
                     help="The vision graph's precision (never quantized) [default: fp16 with --precision fp16 or --quantize int4, else fp32]."),
        click.option("--int8-full-range", is_flag=True,
                     help="int8: 8-bit weight codes (default 7-bit: exact on x86 CPUs without VNNI)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def make_precision_options(precision=None, quantize=None, block_size=32, asymmetric=False, accuracy_level=0,
                           vision_precision=None, int8_full_range=False):
    from anchorrt.graph_passes.bake import PrecisionOptions

    return PrecisionOptions(precision=precision or "fp32", quantize=quantize, block_size=block_size,
                            symmetric=not asymmetric, accuracy_level=accuracy_level,
                            reduce_range=not int8_full_range, vision=vision_precision).check()


PRECISION_KEYS = ("precision", "quantize", "block_size", "asymmetric", "accuracy_level", "vision_precision",
                  "int8_full_range")


def split_precision(choices: dict) -> tuple[dict, dict]:
    """Separate the precision options from the bake options in a command's keyword arguments."""
    return ({k: v for k, v in choices.items() if k not in PRECISION_KEYS},
            {k: v for k, v in choices.items() if k in PRECISION_KEYS})
