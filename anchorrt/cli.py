"""The `anchorrt` command line: export · generate · inspect · verify.

Every user-fixable problem is an `AnchorError`: printed as one line `error: ...` with a non-zero exit, never a
traceback. Commands that need torch import it only when they run, so `generate` and `inspect` work on an edge
install (numpy, onnxruntime, tokenizers, Pillow).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from anchorrt import __version__
from anchorrt.cli_common import friendly as _friendly
from anchorrt.cli_common import say as _say
from anchorrt.cli_mitigation import (
    bake_options,
    generate_torch,
    make_bake_options,
    make_precision_options,
    mitigation_flags,
    precision_options,
    split_precision,
)

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "trt": ["tensorrt-native"]}  # trt: engines from `anchorrt trt build` (runtime/trt_backend.py)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="anchorrt")
def main() -> None:
    """AnchorRT: LLaVA-family models to fast ONNX Runtime engines with hallucination mitigation in the graphs."""


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Artifact folder to create.")
@click.option("--opset", type=click.Choice(["18", "23"]), default="18", show_default=True,
              help="18: attention as MatMul/Softmax; 23: the ONNX Attention op.")
@click.option("--attention", type=click.Choice(["fused", "unfused"]), default=None,
              help="fused (default with --opset 18): GroupQueryAttention with an in-place KV cache; unfused: the "
                   "exporter's form, for debugging (the default with --opset 23).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", hidden=True,
              help="Alias of --precision (kept for old scripts).")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin/.pt (pickle) weights. Pickle can run code: trust the source.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@click.option("--mitigation", default=None, metavar="METHODS",
              help="Bake these into the decoder, comma-separated: clva, sevi, probe (IAVA's attention probe), "
                   "e.g. clva,sevi,probe.")
@bake_options
@precision_options
@_friendly
def export(model_dir: Path, out_dir: Path, opset: str, attention: str | None, dtype: str, allow_pickle: bool,
           force: bool, mitigation, **bake_choices) -> None:
    """Export a Hugging Face checkpoint folder (LLaVA-1.5) to an artifact folder."""
    from anchorrt.exporter.export import export_model

    bake_choices, precision = split_precision(bake_choices)
    if dtype == "fp16" and precision["precision"] in (None, "fp16"):
        precision["precision"] = "fp16"  # --dtype fp16: the alias
    elif dtype == "fp16":
        raise click.UsageError("--dtype is an alias of --precision; give one of them")
    t = time.perf_counter()
    manifest = export_model(model_dir, out_dir, opset=int(opset), allow_pickle=allow_pickle, force=force,
                            progress=_say, mitigation=mitigation, bake_options=make_bake_options(**bake_choices),
                            precision_options=make_precision_options(**precision), attention=attention)
    _say(f"exported {manifest.data['architecture']} in {time.perf_counter() - t:.1f} s")


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, required=True,
              help="Image file (repeat for a batch; with --one-prompt, for several images in one prompt).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt (one per image, or one for all).")
@click.option("--one-prompt", is_flag=True,
              help="Every --image goes into one prompt (in order; the model's chat template places them).")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--sample/--greedy", default=False, show_default=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--device", type=click.Choice(sorted(PROVIDERS)), default="cpu", show_default=True)
@click.option("--allow-fallback", is_flag=True, help="Accept a silent CPU fallback of the GPU provider.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifact files.")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print tokens as they come (batch of 1).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per request.")
@click.option("--backend", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="torch: run the PyTorch reference on a checkpoint folder (greedy), to compare with the artifact.")
@_friendly
@mitigation_flags
def generate(artifact_dir: Path, images, prompts, one_prompt, max_new_tokens, sample, temperature, top_k, top_p, repetition_penalty,
             seed, device, allow_fallback, no_verify, stream, as_json, backend, mitigation) -> None:
    """Answer prompts about images with an exported artifact folder (no torch needed), or with --backend torch
    the checkpoint folder through the PyTorch reference."""
    from anchorrt.runtime.pipeline import Pipeline, Request

    if one_prompt and len(prompts) != 1:
        raise click.UsageError("--one-prompt puts every --image into one prompt: give a single --prompt")
    if len(prompts) not in (1, len(images)):
        raise click.UsageError("give one --prompt per --image, or a single --prompt for all images")
    if one_prompt and backend == "torch":
        raise click.UsageError("--backend torch takes one image per prompt; drop --one-prompt or use the ONNX backend")
    prompts = list(prompts) * len(images) if len(prompts) == 1 and not one_prompt else list(prompts)
    if backend == "torch":
        if sample:
            raise click.UsageError("--backend torch decodes greedily; drop --sample")
        for (text, ids), img in zip(generate_torch(artifact_dir, images, prompts, max_new_tokens, mitigation), images):
            click.echo(json.dumps({"image": str(img), "text": text, "token_ids": ids}) if as_json else f"[{img}] {text}")
        return
    pipe = Pipeline.from_dir(artifact_dir, providers=PROVIDERS[device], verify=not no_verify,
                             allow_fallback=allow_fallback)
    requests = [Request(list(images), prompts[0])] if one_prompt else [Request(img, p) for img, p in zip(images, prompts)]
    if one_prompt:
        images = [", ".join(str(i) for i in images)]  # one result line names every image
    streaming = stream and not as_json and len(requests) == 1
    on_token = (lambda i, tok, piece: click.echo(piece, nl=False)) if streaming else None
    results = pipe.generate_batch(
        requests, on_token=on_token, max_new_tokens=max_new_tokens,
        mitigation=mitigation,
        do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        seed=seed,
    )
    for r, img in zip(results, images):
        steps = r.timings.get("decode_steps_s", [])
        if as_json:
            click.echo(json.dumps({"image": str(img), "text": r.text, "token_ids": r.token_ids,
                                   "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                                   "ttft_s": r.timings.get("prefill_s"), "decode_steps_s": steps}))
        elif streaming:
            click.echo("")
        else:
            click.echo(f"[{img}] {r.text}")
    if not as_json:
        r = results[0]
        tps = (len(steps) / sum(steps)) if steps and sum(steps) > 0 else float("nan")
        _say(f"{sum(len(x.token_ids) for x in results)} tokens; prefill {1000 * r.timings['prefill_s']:.1f} ms, "
             f"{tps:.1f} decode steps/s ({pipe.decoder.provider})")


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--mitigation", default=None, metavar="METHODS",
              help="What to bake into the decoder: clva, sevi, probe (IAVA's attention probe), e.g. clva,sevi,probe.")
@click.option("--visalign", "visalign_weights", default=None, type=click.Path(path_type=Path),
              help="Add VisAlign's fusion from this visalign.safetensors to the embed graph.")
@bake_options
@precision_options
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifact files.")
@_friendly
def bake(artifact_dir: Path, mitigation: str | None, visalign_weights: Path | None, no_verify: bool,
         **bake_choices) -> None:
    """Bake mitigation into an exported artifact folder, and/or convert it to fp16 / int4 / int8 (atomically;
    torch not needed). Mitigation is always baked before the precision passes."""
    from anchorrt.graph_passes.bake import bake as run_bake
    from anchorrt.graph_passes.bake import bake_visalign_weights, convert_precision

    bake_choices, precision = split_precision(bake_choices)
    options = make_precision_options(**precision)
    if mitigation is None and visalign_weights is None and not options.changes_anything:
        raise click.UsageError("say what to bake: --mitigation clva,sevi,probe, --visalign FILE, "
                               "--precision fp16 and/or --quantize int4|int8")
    if visalign_weights is not None:  # the embed graph's fusion comes before any precision pass
        bake_visalign_weights(artifact_dir, visalign_weights, progress=_say, verify=not no_verify)
    if options.changes_anything:
        m = convert_precision(artifact_dir, options, mitigation, make_bake_options(**bake_choices), progress=_say,
                              verify=not no_verify)
        p = m.data["precision"]
        _say(f"  precision: weights {p['weights']}, activations {p['activations']}, kv {p['kv']}, graphs {p['graphs']}")
        mitigation = None
    if mitigation is not None:
        m = run_bake(artifact_dir, mitigation, make_bake_options(**bake_choices), progress=_say, verify=not no_verify)
        for method, record in m.mitigation.items():
            if method in ("clva", "sevi", "probe"):
                _say(f"  {method}: layers {record['layers']}, inputs {', '.join(record['inputs'])}")


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--trt-compat", is_flag=True,
              help="Instead: check every op of every graph against TensorRT's published ONNX operator support; "
                   "exit 0 when all are supported, 1 when any is not (2 on errors). Needs no TensorRT.")
@click.option("--trt-version", default=None, metavar="10.x", help="TensorRT version targeted by --trt-compat "
              "(default: the embedded table's, 10.15).")
@_friendly
def inspect(artifact_dir: Path, no_verify: bool, as_json: bool, trt_compat: bool, trt_version: str | None) -> None:
    """Summarise an artifact folder: model, dims, tokens, graphs and their inputs/outputs, sizes.
    With --trt-compat: a table of op, count, graph, supported (yes/restricted/no) and reason."""
    from anchorrt.runtime.manifest import Manifest

    if trt_compat or trt_version:
        from anchorrt.cli_trt import trt_compat_report

        raise SystemExit(trt_compat_report(artifact_dir, trt_version, not no_verify, as_json))
    m = Manifest.load(artifact_dir, verify=not no_verify)
    if as_json:
        click.echo(json.dumps(m.data, indent=2))
        return
    d, t = m.dims, m.tokens
    click.echo(f"{m.folder}: {m.data['architecture']} ({m.data['model_type']}), opset {m.data['opset']}, "
               f"weights {m.data['precision']['weights']}, attention {m.attention_form}")
    click.echo(f"  decoder: {d['num_layers']} layers, hidden {d['hidden_size']}, {d['num_heads']} heads "
               f"({d['num_kv_heads']} kv), head_dim {d['head_dim']}, vocab {d['vocab_size']}, "
               f"context {m.data.get('context_length')}")
    click.echo(f"  image: {d['image_size']} px, {t['tokens_per_image']} tokens per image "
               f"(token {t['image_token']!r} = {t['image_token_id']}); eos {t['eos_token_ids']}, pad {t['pad_token_id']}")
    click.echo(f"  prompt: {m.prompt['template']!r} ({m.prompt.get('source', '?')})")
    click.echo(f"  mitigation: {', '.join(m.mitigation) or 'none baked'}")
    for role in dict.fromkeys(["vision", *m.data["graphs"], "embed", "decoder"]):  # + an arch's own (qformer)
        g = m.graph(role)
        size = sum((m.folder / f).stat().st_size for f in (g["file"], g.get("external_data")) if f)
        click.echo(f"  {role}: {g['file']} ({size / 1e6:.2f} MB)")
        for kind in ("inputs", "outputs"):
            items = g[kind]
            shown = [f"{x['name']} {x['dtype']}{x['shape']}" for x in items[:4]]
            more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
            click.echo(f"    {kind}: {', '.join(shown)}{more}")
    click.echo(f"  files: {len(m.data['files'])} ({'sha256 verified' if not no_verify else 'not verified'})")
    click.echo(f"  made by: {', '.join(f'{k} {v}' for k, v in m.data.get('versions', {}).items())}")


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", default=None, type=click.Path(path_type=Path),
              help="The PyTorch checkpoint folder (parity vs PyTorch; not needed with --precision).")
@click.option("--image", "images", multiple=True, help="Image files (default: random images).")
@click.option("--prompt", "prompts", multiple=True, help="Prompts (default: two built-in prompts).")
@click.option("--steps", default=None, type=int, help="Decode steps after the prefill [default: 5; 8 with --precision].")
@click.option("--atol", default=1e-4, show_default=True, type=float, help="Largest accepted |logit difference|.")
@click.option("--precision", "precisions", default=None, metavar="LIST",
              help="Instead: compare fp16, int8, int4, fp16+int4 (comma-separated) with fp32. ARTIFACT_DIR is then "
                   "an fp32 artifact or a checkpoint folder (exported first).")
@click.option("--opset", type=click.Choice(["18", "23"]), default="18", show_default=True,
              help="With --precision and a checkpoint folder: the export's opset.")
@click.option("--device", type=click.Choice(sorted(PROVIDERS)), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="With --precision: print the rows as JSON.")
@_friendly
def verify(artifact_dir: Path, model_dir: Path | None, images, prompts, steps: int | None, atol: float,
           precisions: str | None, opset: str, device: str, as_json: bool) -> None:
    """Compare the exported graphs with the PyTorch model: max logit difference and greedy-token agreement.
    With --precision: each precision's logits (teacher-forced on the fp32 greedy tokens) against fp32's."""
    from anchorrt.exporter.verify import random_images
    from anchorrt.runtime.errors import VerifyError

    prompts = list(prompts) or None
    if images and prompts and len(images) != len(prompts):
        raise click.UsageError("give one --prompt per --image")
    imgs = list(images) if images else (random_images(len(prompts)) if prompts else None)
    if precisions is not None:
        from anchorrt.exporter.verify import precision_table, verify_precisions

        rows = verify_precisions(artifact_dir, precisions, images=imgs, prompts=prompts,
                                 steps=8 if steps is None else steps, providers=PROVIDERS[device], opset=int(opset),
                                 say=_say)
        if as_json:
            click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        else:
            click.echo(precision_table(rows, device))
        return
    if model_dir is None:
        raise click.UsageError("give --model CHECKPOINT_DIR (parity vs PyTorch) or --precision LIST")
    from anchorrt.exporter.checkpoint import inspect_checkpoint
    from anchorrt.exporter.verify import verify as run_verify

    inspect_checkpoint(model_dir)
    report = run_verify(model_dir, artifact_dir, images=imgs, prompts=prompts, steps=5 if steps is None else steps,
                        atol=atol)
    if not report.ok:  # the summary once, on the error line (it used to go to stdout as well)
        raise VerifyError(f"exported graphs differ from the PyTorch model: {report.summary()}")
    click.echo(report.summary())


from anchorrt.cli_profile import profile  # noqa: E402 - subcommands from their own modules, registered last

main.add_command(profile)

from anchorrt.cli_visalign import visalign  # noqa: E402 - subcommands from their own modules, registered last

main.add_command(visalign)

from anchorrt.cli_eval import eval_group  # noqa: E402 - subcommands from their own modules, registered last

main.add_command(eval_group)

from anchorrt.cli_trt import trt_group  # noqa: E402 - subcommands from their own modules, registered last

main.add_command(trt_group)

from anchorrt.cli_serve import serve_group  # noqa: E402 - subcommands from their own modules, registered last

main.add_command(serve_group)

from anchorrt.cli_explain import explain  # noqa: E402 - subcommands from their own modules, registered last

main.add_command(explain)

if __name__ == "__main__":
    main()
