"""`anchorrt explain ARTIFACT --image X --prompt "..." --out DIR`: where the model looks, layer by layer.

One forward pass of the prompt through a temporary copy of the artifact whose decoder also exposes every layer's
attention rows (graph_passes/explain.py; CLVA is baked into the copy too when the artifact has none), with the
mitigation off and on, then heads.png, layers.png, drift.png, anchors.png and explain.json (runtime/explain/).
Torch is never imported; the copy needs onnx-ir (`anchorrt[bake]`), the pictures matplotlib (`anchorrt[profile]`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from anchorrt.cli_common import friendly as _friendly
from anchorrt.cli_common import say as _say
from anchorrt.runtime.errors import FlagError

EXPLAINABLE = ("clva", "sevi")


def parse_on(text: str | None, baked: list[str]) -> dict:
    """--mitigation 'clva,sevi' -> {"clva": True, "sevi": True}; default: CLVA (always in the explained copy)."""
    if text is None:
        return {"clva": True}
    items = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not items:
        raise FlagError("--mitigation is empty; give clva, sevi or clva,sevi")
    for m in items:
        if m not in EXPLAINABLE:
            raise FlagError(f"--mitigation {m!r} cannot be explained from one pass; choose from {', '.join(EXPLAINABLE)}"
                            " (IAVA runs two streams; VisAlign changes embeddings, not attention)")
        if m != "clva" and m not in baked:
            raise FlagError(f"this artifact has no {m} baked in; `anchorrt bake ARTIFACT --mitigation {m}` first, "
                            "or leave it out of --mitigation")
    return {m: True for m in items}


def _number(name: str, text: str | None) -> float | None:
    """Parsed here, not by click, so that a bad value is one line `error: ...` like the rest of the CLI."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise FlagError(f"{name} must be a finite number >= 0, got {text!r}") from None
    if not (0 <= value < float("inf")):
        raise FlagError(f"{name} must be a finite number >= 0, got {text}")
    return value


@click.command("explain")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--image", required=True, help="Image file.")
@click.option("--prompt", required=True, help="The question or instruction (the image goes before it).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for heads.png, layers.png, drift.png, anchors.png and explain.json.")
@click.option("--mitigation", default=None, metavar="METHODS",
              help="Methods on in the 'on' pass: clva (default), sevi, clva,sevi.")
@click.option("--lam", default=None, help="Head-set width lambda (default: the artifact's CLVA default).")
@click.option("--tau", default=None, help="Anchor z-score threshold (default: the artifact's CLVA default).")
@click.option("--max-new-tokens", default="24", show_default=True, help="Length of the answers shown in anchors.png.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifact files.")
@_friendly
def explain(artifact_dir: Path, image: str, prompt: str, out_dir: Path, mitigation: str | None, lam: str | None,
            tau: str | None, max_new_tokens: str, no_verify: bool) -> None:
    """Draw where the model looks: Phi per layer and head, per-layer maps, drift curves, CLVA's anchors."""
    from anchorrt.runtime.explain.plots import require_matplotlib
    from anchorrt.runtime.manifest import Manifest
    from anchorrt.runtime.preprocess import load_image

    require_matplotlib()  # before anything is read or copied
    if out_dir.exists() and not out_dir.is_dir():
        raise FlagError(f"--out '{out_dir}' exists and is not a folder; pass another --out")
    lam, tau = _number("--lam", lam), _number("--tau", tau)
    try:
        max_new_tokens = int(max_new_tokens)
    except ValueError:
        raise FlagError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}") from None
    if max_new_tokens < 1:
        raise FlagError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens}")
    if not prompt.strip():
        raise FlagError("--prompt is empty; ask a question about the image")
    manifest = Manifest.load(artifact_dir, verify=not no_verify)
    baked = list(manifest.mitigation)
    spec = parse_on(mitigation, baked)
    load_image(image)  # a bad image fails here, before the copy
    try:
        from anchorrt.graph_passes.bake import BakeOptions
        from anchorrt.graph_passes.explain import explained_copy
    except ModuleNotFoundError as exc:
        raise FlagError(f"{exc.name} is not installed; explain rewrites a copy of the decoder: "
                        '`pip install "anchorrt[bake]"`') from None
    overrides = {k: v for k, v in (("lambda", lam), ("tau", tau)) if v is not None}
    if overrides and "clva" in spec:
        spec["clva"] = overrides
    _say(f"copying {artifact_dir} with the attention rows exposed" + ("" if "clva" in baked else
                                                                      " (and CLVA at METHODS.md's default layers)"))
    copy = explained_copy(artifact_dir, BakeOptions(debug_outputs=True), verify=not no_verify)
    try:
        from anchorrt.runtime.explain.report import explain as run_explain
        from anchorrt.runtime.pipeline import Pipeline

        pipe = Pipeline.from_dir(copy, verify=False)
        layers = pipe.manifest.mitigation["clva"]["layers"]
        report = run_explain(copy, image, prompt, out_dir, mitigation=spec, layers=layers, lam=lam, tau=tau,
                             max_new_tokens=max_new_tokens, artifact_name=str(artifact_dir), progress=_say, pipe=pipe)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    s = report["suggestion"]
    click.echo(f"answers: off {report['answers']['off']['text']!r}; {report['mitigation_on']['methods']} on "
               f"{report['answers']['on']['text']!r}")
    click.echo(f"layers: l_neg {layers['l_neg']}, l_pos {layers['l_pos']}, drift {layers['drift_layers']}; "
               + (f"suggested l_pos {s['l_pos']}, drift {s['drift_layers']} ({s['reason']})" if s["l_pos"] is not None
                  else f"no suggestion ({s['reason']})"))
    click.echo(f"wrote {out_dir}/: heads.png layers.png drift.png anchors.png explain.json")
