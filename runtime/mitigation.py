"""Per-request mitigation flags: validation and the decoder feeds that switch CLVA/SEVI per batch row (no torch).

    pipe.generate(image, prompt, mitigation={"clva": {"alpha": 14}, "sevi": True})
    pipe.generate_batch([Request(img, p, mitigation={"clva": True}), Request(img2, p2)])   # one row on, one off

A request's `mitigation` maps a method to `True` (on, the artifact's defaults), a dict of parameters (on, those
values over the defaults), or `False`/`None` (off). Methods not named are off. The defaults come from the
manifest (`mitigation.<method>.parameters`), which the bake step wrote from METHODS.md.

Valid values (METHODS.md; anything else is a FlagError with one line):
- CLVA: alpha >= 0 (boost of positive anchors; 0 turns the boost off), beta >= 0 (beta > 1 may remove a key:
  w = max(0, ...)), tau >= 0 (the issue makes a negative tau an error: it would mark every visual key), lambda >= 0
  (a negative width would let one head be both sensitive and insensitive); `lam` is accepted for `lambda`.
- SEVI: omega >= 0 (0 = unchanged model), 0 < kappa <= 1 (kappa >= 1 makes every text head global, kappa = 0 none).
- Every value finite and representable in float32 (the graph inputs are fp32).
Layer choices (CLVA l_neg/l_pos/drift layers, SEVI start_layer) are fixed at bake time; asking for them is an error
that names the baked values. `freeze_anchors` (the reference's extra mode) is not baked in the graphs.

Feeds (graph input -> array, or a callable of the pass's attention_mask for inputs whose width grows):
`visual_mask` [B, total_length] bool is the prompt's image-token positions (left padded, padding false), false for
every generated token; `<method>.enable` [B] bool; each parameter [B] float32 (the default on rows that are off).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from anchorrt.runtime.errors import ArtifactError, FlagError

FP32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Param:
    input: str
    default: float
    rule: str  # human-readable valid range
    check: Callable[[float], bool]


PARAMS: dict[str, dict[str, Param]] = {
    "clva": {
        "alpha": Param("clva.alpha", 14.0, ">= 0", lambda v: v >= 0.0),
        "beta": Param("clva.beta", 0.9, ">= 0", lambda v: v >= 0.0),
        "tau": Param("clva.tau", 2.0, ">= 0", lambda v: v >= 0.0),
        "lambda": Param("clva.lambda", 1.0, ">= 0", lambda v: v >= 0.0),
    },
    "sevi": {
        "omega": Param("sevi.omega", 0.5, ">= 0", lambda v: v >= 0.0),
        "kappa": Param("sevi.kappa", 0.2, "in (0, 1]", lambda v: 0.0 < v <= 1.0),
    },
}
ALIASES = {"clva": {"lam": "lambda"}, "sevi": {}}
LAYER_KEYS = {"clva": ("l_neg", "l_pos", "drift_layers", "freeze_anchors"), "sevi": ("start_layer",)}
METHODS = tuple(PARAMS)
# Methods another runtime module validates (runtime/visalign.py reads "visalign" from the same dicts).
HANDLED_ELSEWHERE = ("visalign", "iava")


def check_value(method: str, key: str, value: Any) -> float:
    """One parameter value -> float, or FlagError naming the parameter, its range and the value."""
    param = PARAMS[method][key]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FlagError(f"{method} {key} must be a number {param.rule}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or abs(v) > FP32_MAX:
        raise FlagError(f"{method} {key} must be a finite float32 number {param.rule}, got {v}")
    if not param.check(v):
        raise FlagError(f"{method} {key} must be {param.rule}, got {v:g}")
    return v


def baked_methods(manifest_mitigation: dict, graph: str | None = None) -> list[str]:
    """The baked methods with run-time parameters; `graph`: only those baked into that graph (a record without
    "graph" is the decoder's; InstructBLIP's CLVA records "qformer")."""
    return [m for m in manifest_mitigation if m in PARAMS and (
        graph is None or (manifest_mitigation[m].get("graph", "decoder") if isinstance(manifest_mitigation[m], dict)
                          else "decoder") == graph)]


def _defaults(method: str, record: dict) -> dict[str, float]:
    recorded = record.get("parameters", {}) if isinstance(record, dict) else {}
    return {k: float(recorded.get(k, {}).get("default", p.default)) for k, p in PARAMS[method].items()}


def _layer_summary(record: dict) -> str:
    layers = record.get("layers", {}) if isinstance(record, dict) else {}
    return ", ".join(f"{k} {v}" for k, v in layers.items()) or "unknown"


def parse_request(spec: Any, manifest_mitigation: dict) -> dict[str, dict[str, float] | None]:
    """A request's mitigation spec -> {method: parameters or None (off)} for every baked method."""
    baked = baked_methods(manifest_mitigation)
    out: dict[str, dict[str, float] | None] = {m: None for m in baked}
    if spec is None:
        return out
    if not isinstance(spec, dict):
        raise FlagError(f"mitigation must be a dict like {{'clva': {{'alpha': 14}}, 'sevi': True}}, got {type(spec).__name__}")
    for method, setting in spec.items():
        if method in HANDLED_ELSEWHERE:
            continue
        if method not in PARAMS:
            raise FlagError(f"unknown mitigation method {method!r}; known: {', '.join(METHODS + HANDLED_ELSEWHERE)}")
        if setting is None or setting is False:
            continue
        if method not in baked:
            have = ", ".join(baked) or "none"
            raise FlagError(f"this artifact has no {method} baked in (baked: {have}); "
                            f"run `anchorrt bake ARTIFACT --mitigation {method}` or export with --mitigation {method}")
        record = manifest_mitigation[method]
        params = _defaults(method, record)
        if setting is True:
            out[method] = params
            continue
        if not isinstance(setting, dict):
            raise FlagError(f"mitigation[{method!r}] must be True, False, None or a dict of parameters, "
                            f"got {type(setting).__name__}")
        for key, value in setting.items():
            key = ALIASES[method].get(key, key)
            if key in LAYER_KEYS[method]:
                raise FlagError(f"{method} {key} is fixed at bake time (baked: {_layer_summary(record)}); "
                                "re-bake the artifact to change it")
            if key not in PARAMS[method]:
                raise FlagError(f"unknown {method} parameter {key!r}; known: {', '.join(PARAMS[method])}")
            params[key] = check_value(method, key, value)
        out[method] = params
    return out


def mitigation_specs(requests: list, mitigation: Any) -> list[Any]:
    """One raw spec per request: the request's own `mitigation`, else the call's (one dict for all, or a list with
    one entry per request)."""
    n = len(requests)
    if isinstance(mitigation, (list, tuple)):
        if len(mitigation) != n:
            raise FlagError(f"mitigation has {len(mitigation)} entries for {n} requests; give one per request")
        call = list(mitigation)
    elif mitigation is None or isinstance(mitigation, dict):
        call = [mitigation] * n
    else:
        raise FlagError(f"mitigation must be a dict or one dict per request, got {type(mitigation).__name__}")
    return [r.mitigation if getattr(r, "mitigation", None) is not None else c for r, c in zip(requests, call)]


def merge_cli_flags(method: str, enabled: bool | None, values: dict[str, float | None]) -> Any:
    """CLI helper: `--clva/--no-clva` plus `--clva-alpha ...` -> a spec entry (None when nothing was given)."""
    given = {k: v for k, v in values.items() if v is not None}
    if enabled is False:
        if given:
            raise FlagError(f"--no-{method} cannot be combined with --{method}-{next(iter(given))}")
        return False
    if enabled is None and not given:
        return None
    return given or True


def known_inputs(manifest_mitigation: dict) -> set[str]:
    """Every decoder input the baked methods declare in the manifest."""
    names: set[str] = set()
    for method in baked_methods(manifest_mitigation, "decoder"):
        names |= set(manifest_mitigation[method].get("inputs", {}))
    return names


def decoder_feeds(manifest_mitigation: dict, decoder_inputs: set[str], image_mask: np.ndarray,
                  rows: list[dict[str, dict[str, float] | None]] | None) -> dict[str, Any]:
    """The extra decoder feeds for a batch. image_mask [B, S] bool: the prompt's image positions (left padded).

    Refuses a decoder input that no baked method declares (an artifact from a newer AnchorRT)."""
    unknown = decoder_inputs - known_inputs(manifest_mitigation)
    if unknown:
        raise ArtifactError(f"the decoder has inputs this runtime does not know ({', '.join(sorted(unknown))}); "
                            "upgrade anchorrt or re-export")
    batch = image_mask.shape[0]
    rows = rows if rows is not None else [parse_request(None, manifest_mitigation) for _ in range(batch)]
    if len(rows) != batch:
        raise FlagError(f"{len(rows)} mitigation settings for a batch of {batch}")
    feeds: dict[str, Any] = {}
    if "visual_mask" in decoder_inputs:
        prompt_visual = np.ascontiguousarray(image_mask, dtype=bool)  # [B, S]

        def visual_mask(attention_mask: np.ndarray) -> np.ndarray:
            vm = np.zeros(attention_mask.shape, dtype=bool)  # [B, total]: generated tokens are never visual
            s = min(prompt_visual.shape[1], attention_mask.shape[1])  # a prefill chunk sees fewer than the prompt
            vm[:, :s] = prompt_visual[:, :s] & (attention_mask[:, :s] != 0)
            return vm

        feeds["visual_mask"] = visual_mask
    for method in baked_methods(manifest_mitigation, "decoder"):
        defaults = _defaults(method, manifest_mitigation[method])
        feeds[f"{method}.enable"] = np.array([r.get(method) is not None for r in rows], dtype=bool)  # [B]
        for key, param in PARAMS[method].items():
            values = [(r.get(method) or defaults)[key] for r in rows]
            feeds[param.input] = np.asarray(values, dtype=np.float32)  # [B]
    missing = [n for n in feeds if n not in decoder_inputs]
    if missing:
        raise ArtifactError(f"the manifest says {', '.join(baked_methods(manifest_mitigation, 'decoder'))} is baked but the "
                            f"decoder lacks input(s) {', '.join(missing)}; re-bake the artifact")
    return feeds


def graph_feeds(manifest_mitigation: dict, graph: str, graph_inputs: set[str],
                rows: list[dict[str, dict[str, float] | None]] | None, n: int) -> dict[str, np.ndarray]:
    """The run-time inputs of the methods baked into another graph than the decoder (InstructBLIP's qformer:
    CLVA per image), one row per batch entry of that graph. `rows`: parse_request's result per entry (None: off)."""
    methods = baked_methods(manifest_mitigation, graph)
    rows = rows if rows is not None else [{} for _ in range(n)]
    if len(rows) != n:
        raise FlagError(f"{len(rows)} mitigation settings for {n} images")
    feeds: dict[str, np.ndarray] = {}
    for method in methods:
        defaults = _defaults(method, manifest_mitigation[method])
        feeds[f"{method}.enable"] = np.array([r.get(method) is not None for r in rows], dtype=bool)  # [N]
        for key, param in PARAMS[method].items():
            feeds[param.input] = np.asarray([(r.get(method) or defaults)[key] for r in rows], dtype=np.float32)
    unknown = graph_inputs - set(feeds)
    missing = set(feeds) - graph_inputs
    if unknown or missing:
        raise ArtifactError(f"the {graph} graph's inputs ({', '.join(sorted(graph_inputs)) or 'none'}) do not match "
                            f"the baked methods ({', '.join(methods) or 'none'}); re-bake the artifact")
    return feeds
