"""`anchorrt explain`: one image and prompt through an explained artifact copy -> explain.json and four pictures.

    report = explain(copy_dir, "cat.jpg", "Is there a dog?", "out/explain", mitigation={"clva": True})

Two prefills of the prompt (mitigation off, then on) give every layer's attention rows (runtime/explain/forward.py);
runtime/explain/stats.py turns them into the paper's numbers (Phi, head sets, anchor maps, entropy, correlations);
two generations give the answers with mitigation off and on; runtime/explain/plots.py draws heads.png, layers.png,
drift.png and anchors.png. Every file is written into a hidden folder beside `out` first and moved in at the end,
so a failure leaves no half-written output.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from anchorrt.runtime.errors import FlagError
from anchorrt.runtime.explain import stats
from anchorrt.runtime.explain.forward import attention_rows

FILES = ("heads.png", "layers.png", "drift.png", "anchors.png", "explain.json")


def image_grid(n: int) -> dict:
    """How the image tokens lie on the image: a square grid, a class token then a square grid, or a strip."""
    side = math.isqrt(n)
    if side * side == n:
        return {"rows": side, "cols": side, "skip": 0, "layout": f"{side}x{side} patches"}
    side = math.isqrt(n - 1)
    if n > 1 and side * side == n - 1:
        return {"rows": side, "cols": side, "skip": 1, "layout": f"{side}x{side} patches; the class token is not drawn"}
    return {"rows": 1, "cols": n, "skip": 0, "layout": f"{n} tokens in order (not a square grid)"}


def model_view(pipe, pixel_values: np.ndarray) -> np.ndarray:
    """The image as the model sees it (after resize, crop, pad), from pixel_values [1, 3, H, W] -> [H, W, 3] in 0..1."""
    p = pipe.manifest.preprocessing
    mean = np.asarray(p.get("image_mean", [0, 0, 0]), np.float32)[:, None, None]
    std = np.asarray(p.get("image_std", [1, 1, 1]), np.float32)[:, None, None]
    x = pixel_values[0].astype(np.float32)
    if p.get("do_normalize", True):
        x = x * std + mean
    return np.clip(x.transpose(1, 2, 0), 0.0, 1.0)


def _pass_numbers(rows, lam: float, tau: float, l_neg: int, l_pos: int, grid: dict) -> dict:
    visual = rows.visual
    phi = stats.intensity(rows.attention, visual)  # [L, H]
    sensitive, insensitive = stats.head_sets(phi, lam)
    last = rows.attention[:, :, -1][..., visual].astype(np.float64)  # [L, H, V]
    m_pos = stats.head_map(last[l_pos], sensitive[l_pos])
    m_neg = stats.head_map(last[l_neg], insensitive[l_neg])
    n_v = int(visual.sum())
    curves = stats.layer_curves(last, sensitive, m_neg, m_pos)
    return {
        "phi": phi, "sensitive": sensitive, "insensitive": insensitive, "last": last,
        "m_pos": m_pos, "m_neg": m_neg,
        "zpos": stats.anchor(m_pos, tau, n_v), "zneg": stats.anchor(m_neg, tau, n_v),
        "visual_mass_last_row": last.sum(-1).mean(-1),  # [L] mean over heads of the last row's mass on V
        **curves,
    }


def _graph_check(rows, numbers: dict, l_neg: int, l_pos: int, clva_on: bool) -> dict | None:
    """Where the decoder has CLVA's debug outputs (bake --debug-outputs) and CLVA was on: do the graph's own head sets
    and anchors equal the ones computed here from the exposed attention? None when there is nothing to compare."""
    d = rows.graph_debug
    if not d or not clva_on:
        return None
    visual = rows.visual
    return {
        "sensitive_heads_equal": bool((d["clva.sensitive_heads"] == numbers["sensitive"][l_pos]).all()),
        "insensitive_heads_equal": bool((d["clva.insensitive_heads"] == numbers["insensitive"][l_neg]).all()),
        "zpos_equal": bool((d["clva.zpos"][visual] == numbers["zpos"]).all()),
        "zneg_equal": bool((d["clva.zneg"][visual] == numbers["zneg"]).all()),
    }


def explain(folder: str | os.PathLike, image, prompt: str, out: str | os.PathLike, *, mitigation: dict,
            layers: dict, lam: float | None = None, tau: float | None = None, max_new_tokens: int = 24,
            artifact_name: str | None = None, progress=None, pipe=None) -> dict:
    """Write FILES into `out`. `folder`: an explained copy (graph_passes.explain.explained_copy); `mitigation`: the
    'on' request spec (e.g. {"clva": True}); `layers`: CLVA's {"l_neg", "l_pos", "drift_layers"} of the copy;
    `lam`/`tau`: the head-set width and anchor threshold (default: the spec's CLVA values, else METHODS.md's)."""
    from anchorrt.runtime.explain.plots import require_matplotlib

    require_matplotlib()
    say = progress or (lambda msg: None)
    if pipe is None:
        from anchorrt.runtime.pipeline import Pipeline

        pipe = Pipeline.from_dir(folder)
    from anchorrt.runtime.mitigation import parse_request
    from anchorrt.runtime.preprocess import load_image

    parsed = parse_request(mitigation, pipe.manifest.mitigation)
    clva_on = parsed.get("clva") or {}
    lam = float(clva_on.get("lambda", 1.0) if lam is None else lam)
    tau = float(clva_on.get("tau", 2.0) if tau is None else tau)
    l_neg, l_pos, drift = int(layers["l_neg"]), int(layers["l_pos"]), [int(x) for x in layers["drift_layers"]]

    if pipe.arch.fixed_tokens_per_image is None:  # e.g. Qwen2-VL: the grids and model_view assume [1, 3, H, W]
        from anchorrt.runtime.errors import ArtifactError

        raise ArtifactError(f"explain draws a fixed patch grid; this artifact's images take a size-dependent number "
                            f"of tokens (model_type {pipe.manifest.data.get('model_type')!r}), which it does not "
                            "support yet; explain a LLaVA-1.5 artifact")
    img = load_image(image, max_pixels=pipe.max_image_pixels)
    pixel_values = pipe.preprocess([img])  # [1, 3, H, W]
    features = pipe.encode_images(pixel_values)
    encoded = pipe.prompts.encode(prompt)
    grid = image_grid(int(encoded.image_mask.sum()))

    t = time.perf_counter()
    off = _pass_numbers(attention_rows(pipe, features, encoded, None), lam, tau, l_neg, l_pos, grid)
    rows_on = attention_rows(pipe, features, encoded, mitigation)
    on = _pass_numbers(rows_on, lam, tau, l_neg, l_pos, grid)
    # The anchors come from l_neg / l_pos, which CLVA never edits (drift > both): the 'on' pass must agree.
    forward_s = time.perf_counter() - t
    say(f"two prefills with attention rows: {forward_s:.2f} s")
    answers = {}
    for name, spec in (("off", None), ("on", mitigation)):
        g = pipe.generate(img, prompt, max_new_tokens=max_new_tokens, mitigation=spec)
        answers[name] = {"text": g.text, "finish_reason": g.finish_reason, "total_s": g.timings.get("total_s")}
    graph_check = _graph_check(rows_on, on, l_neg, l_pos, bool(parsed.get("clva")))
    suggestion = stats.suggest(off["last"], off["sensitive"], off["insensitive"], l_neg)

    L, H = off["phi"].shape
    on_label = "+".join(k for k, v in parsed.items() if v) or "none"
    report = {
        "version": 1,
        "artifact": artifact_name or str(folder),
        "prompt": prompt,
        "image": str(image) if isinstance(image, (str, Path)) else "<in memory>",
        "mitigation_on": {"spec": mitigation, "methods": on_label, "parameters": parsed},
        "layers": {"num_layers": L, "num_heads": H, "l_neg": l_neg, "l_pos": l_pos, "drift_layers": drift},
        "thresholds": {"lam": lam, "tau": tau},
        "image_tokens": {"count": int(encoded.image_mask.sum()), **grid},
        "prompt_tokens": int(len(encoded.ids)),
        "t_rows": int(rows_on.attention.shape[2]),
        "definitions": {
            "phi": "Phi[l][h] = mean over the prompt's T rows (text after the image) of the attention mass on image "
                   "tokens (CLVA eq. 1, METHODS.md step 1)",
            "sensitive": "Phi > mu + lam*sigma within the layer (eq. 2); insensitive: Phi < mu - lam*sigma (eq. 3); "
                         "population std, strict inequalities",
            "maps": "last prompt row's attention over the image tokens, mean over a head set (eq. 4), row-major over "
                    "the image-token grid",
            "entropy": "of the map renormalised over the image tokens, in nats (eq. 5; log(count) = uniform)",
            "pearson": "correlation of each layer's all-heads map with the l_neg insensitive-head map (neg) and the "
                       "l_pos sensitive-head map (pos) (eq. 6)",
            "anchors": "z-score of the map over the image tokens > tau (eqs. 8-9): zpos from l_pos, zneg from l_neg",
            "on": "the same numbers with the mitigation on; CLVA re-weights the drift layers' T rows, so only they "
                  "change; SEVI's last-row edit is not in the exposed attention",
        },
        "answers": answers,
        "graph_check": graph_check,
        "suggestion": suggestion,
    }
    for name, d in (("off", off), ("on", on)):
        report[name] = {
            "phi": d["phi"], "sensitive_heads": [np.flatnonzero(r).tolist() for r in d["sensitive"]],
            "insensitive_heads": [np.flatnonzero(r).tolist() for r in d["insensitive"]],
            "visual_mass_last_row": d["visual_mass_last_row"],
            "entropy_all_heads": d["entropy_all_heads"], "entropy_sensitive_heads": d["entropy_sensitive_heads"],
            "pearson_neg": d["pearson_neg"], "pearson_pos": d["pearson_pos"],
            "map_all_heads": d["map_all_heads"], "map_sensitive_heads": d["map_sensitive_heads"],
            "m_pos": d["m_pos"], "m_neg": d["m_neg"],
            "zpos": np.flatnonzero(d["zpos"]).tolist(), "zneg": np.flatnonzero(d["zneg"]).tolist(),
        }
    report = stats.finite(report)

    from anchorrt.runtime.explain import plots

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FlagError(f"--out '{out}' is a file; give a folder for the pictures")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.explain-", dir=out.parent))
    try:
        view = model_view(pipe, pixel_values)
        plots.heads_png(report, stage / "heads.png")
        plots.layers_png(report, view, stage / "layers.png")
        plots.drift_png(report, stage / "drift.png")
        plots.anchors_png(report, view, stage / "anchors.png")
        (stage / "explain.json").write_text(json.dumps(report, indent=1) + "\n")
        out.mkdir(exist_ok=True)
        for name in FILES:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report
