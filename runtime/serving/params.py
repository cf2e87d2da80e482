"""Per-request Triton parameters <-> the Pipeline's sampling options and mitigation dict.

Triton carries request parameters beside the tensors (KServe v2 `parameters`: bool, int64, double or string per
key; the Python backend reads them with `request.parameters()`, a JSON object, see
https://github.com/triton-inference-server/python_backend#inference-request-parameters). AnchorRT's names:

    sampling     max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed
    a method     "clva": true | false            (on with the artifact's defaults / off)
    its values   "clva.alpha": 14.0, "sevi.omega": 0.7, "iava.i": 0.1, "iava.instruction": "..."   (imply "on")

Methods: those baked in the artifact (runtime/mitigation.py: clva, sevi), "visalign" (true/false only) when the
embed graph has the fusion, and "iava" (alpha, i, lambda, instruction, beta_cut; runtime/iava.py) when the
attention probe is baked. Anything else is a FlagError that names the known keys: a typo never passes silently.
The values themselves are checked by the runtime (mitigation.parse_request, iava.parse_iava, SamplingConfig).
"""

from __future__ import annotations

import json
from typing import Any

from anchorrt.runtime.errors import FlagError
from anchorrt.runtime.mitigation import PARAMS, baked_methods

SAMPLING = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_k": int, "top_p": float,
            "repetition_penalty": float, "seed": int}
IAVA_KEYS = ("alpha", "i", "lambda", "instruction", "beta_cut")
# Keys that Triton or its clients may add on their own (KServe v2 / Triton protocol extensions): not ours, ignored.
TRANSPORT_KEYS = {"binary_data_output", "sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                  "headers", "triton_enable_empty_final_response"}


def methods_of(manifest_mitigation: dict, has_visalign: bool) -> dict[str, tuple[str, ...]]:
    """Every switchable method of an artifact -> the parameter names it takes per request."""
    out: dict[str, tuple[str, ...]] = {m: tuple(PARAMS[m]) for m in baked_methods(manifest_mitigation)}
    if has_visalign:
        out["visalign"] = ()
    if "probe" in manifest_mitigation:
        out["iava"] = IAVA_KEYS
    return out


def parse_parameters(raw: str | dict | None, methods: dict[str, tuple[str, ...]]) -> tuple[dict, dict | None]:
    """Triton request parameters (the JSON text of `request.parameters()`, or a dict) -> (sampling kwargs for
    Pipeline.generate_batch, mitigation dict for Request). One-line FlagError on anything unknown or mistyped."""
    if raw is None or raw == "":
        params: Any = {}
    elif isinstance(raw, str):
        try:
            params = json.loads(raw)
        except ValueError:
            raise FlagError("request parameters are not a JSON object; send Triton request parameters") from None
    else:
        params = raw
    if not isinstance(params, dict):
        raise FlagError(f"request parameters must be an object, got {type(params).__name__}")
    sampling: dict[str, Any] = {}
    mitigation: dict[str, Any] = {}
    for key, value in params.items():
        if key in TRANSPORT_KEYS:
            continue
        if key in SAMPLING:
            sampling[key] = _typed(key, value, SAMPLING[key])
            continue
        method, _, name = key.partition(".")
        if method not in methods:
            raise FlagError(f"unknown request parameter {key!r}; known: {', '.join(known_keys(methods))}")
        if not name:
            if not isinstance(value, bool):
                raise FlagError(f"parameter {key!r} must be true or false, got {value!r}")
            if value is False:
                mitigation[method] = False
            elif not isinstance(mitigation.get(method), dict):
                mitigation[method] = True
            continue
        if name not in methods[method] and not (method == "clva" and name == "lam"):
            raise FlagError(f"unknown request parameter {key!r}; known: {', '.join(known_keys(methods))}")
        current = mitigation.get(method)
        if current is False:
            continue  # "clva": false wins over its values, whatever the order
        mitigation[method] = dict(current) if isinstance(current, dict) else {}
        mitigation[method][name] = value
    return sampling, (mitigation or None)


def to_parameters(mitigation: dict | None = None, **sampling) -> dict[str, Any]:
    """The inverse, for clients: {"clva": {"alpha": 14}, "sevi": True}, max_new_tokens=16 ->
    {"clva.alpha": 14.0, "sevi": True, "max_new_tokens": 16}."""
    out: dict[str, Any] = {}
    for key, value in sampling.items():
        if key not in SAMPLING:
            raise FlagError(f"unknown generation option {key!r}; known: {', '.join(SAMPLING)}")
        if value is not None:
            out[key] = value
    for method, setting in (mitigation or {}).items():
        if isinstance(setting, dict):
            out[method] = True
            for name, value in setting.items():
                out[f"{method}.{name}"] = value
        elif setting is not None:
            out[method] = bool(setting)
    return out


def known_keys(methods: dict[str, tuple[str, ...]]) -> list[str]:
    keys = list(SAMPLING)
    for method, names in methods.items():
        keys.append(method)
        keys.extend(f"{method}.{n}" for n in names)
    return keys


def _typed(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise FlagError(f"parameter {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FlagError(f"parameter {key!r} must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise FlagError(f"parameter {key!r} must be an integer, got {value!r}")
        return int(value)
    return float(value)
