"""The profile report: JSON with the raw samples, its schema check, and the terminal table.

Schema (`schema` = "anchorrt-profile", `schema_version` = 1). Times are seconds, memory bytes; a figure that does
not apply (host↔device copies on the CPU, device memory without NVML) is null. "stats" below is
{n, median, mean, p10, p25, p75, p90, min, max} (runtime.profile.measure.summarize).

    {
      "schema": "anchorrt-profile", "schema_version": 1, "created": ISO-8601 UTC, "elapsed_s": float,
      "artifact": {folder, architecture, num_layers, hidden_size, vocab_size, tokens_per_image, context_length,
                   precision, mitigation: [method, ...]},
      "environment": {device, provider, gpu, onnxruntime, numpy, python, platform, cpu_count, nvtx: bool,
                      nvml: {available: bool, reason: str}, host_memory: {source: "VmHWM"|"ru_maxrss", resettable}},
      "settings": {batch_sizes, contexts, contexts_auto, images, warmup, repeats, new_tokens, device, prompt, image,
                   mitigation, verify, allow_fallback, threads},
      "stages": {"ttft": [stage, ...], "step": [stage, ...]},      # the order of the table and the bars
      "base_context": int,                                          # tokens of the prompt as given, image included
      "runs": [{                                                    # one per measured case
          key, kind: "generate"|"vision", sweeps: ["base"|"batch"|"context"|"mitigation"|"images", ...],
          variant: "plain"|method|"all", batch, images, context (prompt tokens; null for vision), new_tokens,
          samples: {                                                # raw: one entry per measured repeat
            wall_s: [r], host_peak_rss_bytes: [r], device_used_peak_bytes: [r]|null, process_used_peak_bytes: [r]|null,
            stages: {stage: [r]},                                   # generate: TTFT stages; vision: preprocess, vision
            ttft_s: [r], steps: {decode_embed|decode|sample|token: [[per step] r]}, copies: {name: [r]}|null,
            generated: [[tokens per request] r]                     # generate runs only
          },
          summary: {wall_s: stats, host_peak_rss_bytes: stats, device_used_peak_bytes: stats|null,
                    stages: {stage: stats}, ttft_s: stats, steps: {name: stats pooled over steps and repeats},
                    decode_tokens_per_s: stats (per repeat: batch * (new_tokens - 1) / decode time),
                    per_position: {positions: [int], median: [s], p10: [s], p90: [s]},   # inter-token latency
                    copies: {name: stats}|null}                     # generate-only keys absent for vision runs
      }],
      "mitigation": null | {methods: [..], flags_applied: bool,
                            ratios: [{variant, context, ttft|prefill|decode|token: {median, p10, p90}}]},  # paired
      "reference": null | {name, info, new_tokens, samples: {reference_ttft_s, reference_step_s, runtime_ttft_s,
                           runtime_step_s: [r]}, summary: {each: stats, ttft_ratio, step_ratio}},  # runtime/reference
      "ort_trace": null | [path, ...], "plots": [file name, ...], "notes": [str, ...]
    }

The per-token entries at step k are the interval between the end of decoder pass k and k+1 (the prefill is pass 0):
token selection, loop bookkeeping, the one-token embed and the decoder pass. `positions[k]` is the sequence position
of the token fed to pass k + 1.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any

import numpy as np
from anchorrt.runtime.profile.measure import STAT_KEYS, summarize
from anchorrt.runtime.profile.stages import STEP_STAGES, TTFT_STAGES

SCHEMA = "anchorrt-profile"
SCHEMA_VERSION = 1
STEP_KEYS = (*STEP_STAGES, "token")
COPY_KEYS = ("prefill_h2d", "step_h2d", "logits_d2h")
RATIO_METRICS = ("ttft", "prefill", "decode", "token")


def build_report(manifest, env: dict, settings: dict, measured, methods, reference, traces, notes, *,
                 base_context: int, elapsed_s: float, flags_applied: bool = True) -> dict:
    d = manifest.dims
    runs = [_run_entry(m.case, m.runs, settings["new_tokens"]) for m in measured]
    report = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "elapsed_s": float(elapsed_s),
        "artifact": {
            "folder": str(manifest.folder), "architecture": manifest.data.get("architecture"),
            "num_layers": d["num_layers"], "hidden_size": d["hidden_size"], "vocab_size": d["vocab_size"],
            "tokens_per_image": manifest.tokens["tokens_per_image"],
            "context_length": manifest.data.get("context_length", d["max_position_embeddings"]),
            "precision": manifest.data.get("precision", {}).get("weights"), "mitigation": list(manifest.mitigation),
        },
        "environment": env,
        "settings": settings,
        "stages": {"ttft": list(TTFT_STAGES), "step": list(STEP_STAGES)},
        "base_context": int(base_context),
        "runs": runs,
        "mitigation": _mitigation(runs, methods, flags_applied),
        "reference": _reference(reference),
        "ort_trace": traces,
        "plots": [],
        "notes": list(notes),
    }
    return report


def _run_entry(case, runs: list[dict], new_tokens: int) -> dict:
    samples: dict[str, Any] = {
        "wall_s": [r["wall_s"] for r in runs],
        "host_peak_rss_bytes": [r["host_peak_rss_bytes"] for r in runs],
        "device_used_peak_bytes": _maybe([r["device_used_peak_bytes"] for r in runs]),
        "process_used_peak_bytes": _maybe([r["process_used_peak_bytes"] for r in runs]),
        "stages": {k: [r["stages"][k] for r in runs] for k in runs[0]["stages"]},
    }
    summary: dict[str, Any] = {
        "wall_s": summarize(samples["wall_s"]),
        "host_peak_rss_bytes": summarize(samples["host_peak_rss_bytes"]),
        "device_used_peak_bytes": summarize(samples["device_used_peak_bytes"] or []),
        "stages": {k: summarize(v) for k, v in samples["stages"].items()},
    }
    if case.kind == "generate":
        samples["ttft_s"] = [r["ttft_s"] for r in runs]
        samples["steps"] = {k: [list(r["steps"][k]) for r in runs] for k in STEP_KEYS}
        samples["copies"] = None if runs[0]["copies"] is None else {k: [r["copies"][k] for r in runs] for k in COPY_KEYS}
        samples["generated"] = [r["generated"] for r in runs]
        tokens = np.asarray(samples["steps"]["token"], dtype=np.float64)  # [repeats, new_tokens - 1]
        summary["ttft_s"] = summarize(samples["ttft_s"])
        summary["steps"] = {k: summarize([x for rep in v for x in rep]) for k, v in samples["steps"].items()}
        summary["decode_tokens_per_s"] = summarize(case.batch * tokens.shape[1] / tokens.sum(axis=1))
        prompt = runs[0]["prompt_tokens"]
        summary["per_position"] = {
            "positions": [prompt + k for k in range(tokens.shape[1])],
            "median": np.median(tokens, axis=0).tolist(),
            "p10": np.percentile(tokens, 10, axis=0).tolist(),
            "p90": np.percentile(tokens, 90, axis=0).tolist(),
        }
        summary["copies"] = None if samples["copies"] is None else {k: summarize(v) for k, v in samples["copies"].items()}
        context = int(prompt)
    else:
        context = None
    return {"key": case.key, "kind": case.kind, "sweeps": list(case.sweeps), "variant": case.variant,
            "batch": case.batch, "images": case.images, "context": context,
            "new_tokens": new_tokens if case.kind == "generate" else None, "samples": samples, "summary": summary}


def _maybe(values: list) -> list | None:
    return None if all(v is None for v in values) else values


def _paired(num: list[float], den: list[float]) -> dict:
    ratios = [a / b for a, b in zip(num, den) if b > 0]
    s = summarize(ratios)
    return {"median": s["median"], "p10": s["p10"], "p90": s["p90"]} if s else {"median": None, "p10": None, "p90": None}


def _per_round(run: dict) -> dict[str, list[float]]:
    s = run["samples"]
    return {"ttft": s["ttft_s"], "prefill": s["stages"]["prefill"],
            "decode": [float(np.median(x)) for x in s["steps"]["decode"]],
            "token": [float(np.median(x)) for x in s["steps"]["token"]]}


def _mitigation(runs: list[dict], methods, flags_applied: bool) -> dict | None:
    if not methods:
        return None
    ab = [r for r in runs if "mitigation" in r["sweeps"]]
    plain = {r["context"]: _per_round(r) for r in ab if r["variant"] == "plain"}
    ratios = []
    for r in ab:
        if r["variant"] == "plain" or r["context"] not in plain:
            continue
        per, base = _per_round(r), plain[r["context"]]
        ratios.append({"variant": r["variant"], "context": r["context"],
                       **{k: _paired(per[k], base[k]) for k in RATIO_METRICS}})
    ratios.sort(key=lambda x: (list(methods).index(x["variant"]) if x["variant"] in methods else len(methods),
                               x["context"]))
    return {"methods": list(methods), "flags_applied": flags_applied, "ratios": ratios}


def _reference(ref: dict | None) -> dict | None:
    if ref is None:
        return None
    s = ref["samples"]
    summary = {k: summarize(v) for k, v in s.items()}
    med = {k: v["median"] for k, v in summary.items()}
    summary["ttft_ratio"] = med["runtime_ttft_s"] / med["reference_ttft_s"] if med["reference_ttft_s"] > 0 else None
    summary["step_ratio"] = med["runtime_step_s"] / med["reference_step_s"] if med["reference_step_s"] > 0 else None
    return {**ref, "summary": summary}


# -- schema check ---------------------------------------------------------------------------------------------
class SchemaError(ValueError):
    pass


def _need(cond: bool, where: str, what: str = "missing or invalid") -> None:
    if not cond:
        raise SchemaError(f"profile report: {where} {what}")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numlist(x, n: int | None = None) -> bool:
    return isinstance(x, list) and all(_num(v) for v in x) and (n is None or len(x) == n)


def _stats(x, where: str, nullable: bool = False) -> None:
    if x is None and nullable:
        return
    _need(isinstance(x, dict) and set(x) == set(STAT_KEYS) and all(_num(x[k]) for k in STAT_KEYS), where)
    _need(x["p10"] <= x["median"] <= x["p90"], where, "has p10 <= median <= p90 out of order")


def validate_report(data: Any) -> None:
    """Raise SchemaError naming the first field that does not follow the documented schema."""
    _need(isinstance(data, dict), "<root>")
    _need(data.get("schema") == SCHEMA and data.get("schema_version") == SCHEMA_VERSION, "schema/schema_version")
    for key in ("created", "artifact", "environment", "settings", "stages", "runs", "plots", "notes", "base_context"):
        _need(key in data, key)
    s = data["settings"]
    repeats, new_tokens = s.get("repeats"), s.get("new_tokens")
    _need(isinstance(repeats, int) and repeats >= 1, "settings.repeats")
    _need(isinstance(new_tokens, int) and new_tokens >= 2, "settings.new_tokens")
    _need(data["stages"] == {"ttft": list(TTFT_STAGES), "step": list(STEP_STAGES)}, "stages")
    _need(isinstance(data["artifact"].get("mitigation"), list), "artifact.mitigation")
    _need(isinstance(data["runs"], list) and data["runs"], "runs")
    for i, run in enumerate(data["runs"]):
        _validate_run(run, f"runs[{i}]", repeats, new_tokens)
    m = data.get("mitigation")
    if m is not None:
        _need(isinstance(m.get("methods"), list) and isinstance(m.get("flags_applied"), bool), "mitigation")
        for j, r in enumerate(m.get("ratios", [])):
            _need(isinstance(r.get("variant"), str) and isinstance(r.get("context"), int), f"mitigation.ratios[{j}]")
            for k in RATIO_METRICS:
                _need(isinstance(r.get(k), dict) and _num(r[k].get("median")), f"mitigation.ratios[{j}].{k}")
    ref = data.get("reference")
    if ref is not None:
        for k in ("reference_ttft_s", "reference_step_s", "runtime_ttft_s", "runtime_step_s"):
            _need(_numlist(ref["samples"].get(k), repeats), f"reference.samples.{k}")
            _stats(ref["summary"].get(k), f"reference.summary.{k}")
    _need(isinstance(data["plots"], list) and all(isinstance(p, str) for p in data["plots"]), "plots")
    _need(data.get("ort_trace") is None or isinstance(data["ort_trace"], list), "ort_trace")


def _validate_run(run: dict, where: str, repeats: int, new_tokens: int) -> None:
    _need(isinstance(run, dict) and run.get("kind") in ("generate", "vision"), f"{where}.kind")
    for k in ("key", "sweeps", "variant", "batch", "images", "samples", "summary"):
        _need(k in run, f"{where}.{k}")
    _need(isinstance(run["batch"], int) and run["batch"] >= 1, f"{where}.batch")
    smp, summ = run["samples"], run["summary"]
    _need(_numlist(smp.get("wall_s"), repeats), f"{where}.samples.wall_s", f"must hold {repeats} numbers")
    _need(_numlist(smp.get("host_peak_rss_bytes"), repeats), f"{where}.samples.host_peak_rss_bytes")
    _need(smp.get("device_used_peak_bytes") is None or _numlist(smp["device_used_peak_bytes"], repeats),
          f"{where}.samples.device_used_peak_bytes")
    _stats(summ.get("wall_s"), f"{where}.summary.wall_s")
    _stats(summ.get("host_peak_rss_bytes"), f"{where}.summary.host_peak_rss_bytes")
    _stats(summ.get("device_used_peak_bytes"), f"{where}.summary.device_used_peak_bytes", nullable=True)
    stages = TTFT_STAGES if run["kind"] == "generate" else ("preprocess", "vision")
    _need(set(smp.get("stages", {})) == set(stages), f"{where}.samples.stages", f"must name {', '.join(stages)}")
    for st in stages:
        _need(_numlist(smp["stages"][st], repeats), f"{where}.samples.stages.{st}")
        _stats(summ["stages"].get(st), f"{where}.summary.stages.{st}")
    if run["kind"] == "vision":
        return
    _need(isinstance(run.get("context"), int) and run["context"] >= 1, f"{where}.context")
    _need(run.get("new_tokens") == new_tokens, f"{where}.new_tokens")
    _need(_numlist(smp.get("ttft_s"), repeats), f"{where}.samples.ttft_s")
    _need(set(smp.get("steps", {})) == set(STEP_KEYS), f"{where}.samples.steps")
    for k in STEP_KEYS:
        reps = smp["steps"][k]
        _need(isinstance(reps, list) and len(reps) == repeats and all(_numlist(x, new_tokens - 1) for x in reps),
              f"{where}.samples.steps.{k}", f"must hold {repeats} lists of {new_tokens - 1} numbers")
        _stats(summ["steps"].get(k), f"{where}.summary.steps.{k}")
    _stats(summ.get("ttft_s"), f"{where}.summary.ttft_s")
    _stats(summ.get("decode_tokens_per_s"), f"{where}.summary.decode_tokens_per_s")
    pp = summ.get("per_position", {})
    n = new_tokens - 1
    _need(isinstance(pp.get("positions"), list) and len(pp["positions"]) == n
          and pp["positions"] == list(range(run["context"], run["context"] + n)), f"{where}.summary.per_position")
    for k in ("median", "p10", "p90"):
        _need(_numlist(pp.get(k), n), f"{where}.summary.per_position.{k}")
    copies = smp.get("copies")
    _need(copies is None or (set(copies) == set(COPY_KEYS) and all(_numlist(copies[k], repeats) for k in COPY_KEYS)),
          f"{where}.samples.copies")


# -- terminal table -------------------------------------------------------------------------------------------
def _ms(stats: dict | None, width: int = 9, digits: int = 2) -> str:
    return f"{'n/a':>{width}}" if not stats else f"{1000 * stats['median']:>{width}.{digits}f}"


def _spread(stats: dict | None) -> str:
    if not stats:
        return f"{'':>19}"
    return f"{1000 * stats['p10']:>9.2f}{1000 * stats['p90']:>10.2f}"


def _mb(stats: dict | None) -> str:
    return f"{'n/a':>9}" if not stats else f"{stats['median'] / 2**20:>9.0f}"


def format_table(report: dict) -> str:
    a, env, s = report["artifact"], report["environment"], report["settings"]
    runs = report["runs"]
    base = next(r for r in runs if "base" in r["sweeps"])
    bs, n = base["summary"], s["new_tokens"]
    lines = [
        f"anchorrt profile: {Path(a['folder']).name} ({a['architecture']}, {a['num_layers']} layers, hidden "
        f"{a['hidden_size']}, {a['tokens_per_image']} image tokens, {a['precision']}) on {env['provider']}",
        f"base case: batch 1, context {base['context']} tokens, {n} new tokens; {s['warmup']} warm-up + "
        f"{s['repeats']} measured rounds, cases interleaved; times in ms, median and p10/p90",
        "",
        f"{'stage':34}{'median':>9}{'p10':>9}{'p90':>10}",
    ]
    for st in report["stages"]["ttft"]:
        label = "sample (first token)" if st == "sample" else st
        lines.append(f"  {label:32}{_ms(bs['stages'][st])}{_spread(bs['stages'][st])}")
    lines.append(f"{'= time to first token':34}{_ms(bs['ttft_s'])}{_spread(bs['ttft_s'])}")
    for st in report["stages"]["step"]:
        lines.append(f"  {'per step: ' + st:32}{_ms(bs['steps'][st])}{_spread(bs['steps'][st])}")
    lines.append(f"{'= per token (inter-token latency)':34}{_ms(bs['steps']['token'])}{_spread(bs['steps']['token'])}")
    tps = bs["decode_tokens_per_s"]
    lines.append(f"{'decode tokens/s':34}{tps['median']:>9.1f}{tps['p10']:>9.1f}{tps['p90']:>10.1f}")
    copies = bs.get("copies")
    if copies is None:
        lines.append(f"{'host<->device copies':34}{'n/a':>9}  (CPU run: none)")
    else:
        for k in COPY_KEYS:
            lines.append(f"  {'copy ' + k + ' (within the above)':32}{_ms(copies[k], digits=3)}{_spread(copies[k])}")
    pp = bs["per_position"]
    lines.append(f"{'per token at first / last position':34}{1000 * pp['median'][0]:>9.2f}{1000 * pp['median'][-1]:>9.2f}"
                 f"   (positions {pp['positions'][0]} / {pp['positions'][-1]})")
    mem = f"peak host RSS {bs['host_peak_rss_bytes']['median'] / 2**20:.0f} MB"
    if not env["host_memory"]["resettable"]:
        mem += " (peak of the whole process: not resettable here)"
    dev = bs.get("device_used_peak_bytes")
    mem += "; device memory " + ("n/a" if not dev else f"{dev['median'] / 2**20:.0f} MB used (NVML)")
    lines += [mem, ""]
    lines += _sweep_table(runs, "batch", "batch", f"batch sweep (context {base['context']})")
    lines += _sweep_table(runs, "context", "context", "context sweep (batch 1)")
    img = sorted((r for r in runs if "images" in r["sweeps"]), key=lambda r: r["images"])
    if img:
        lines.append("image sweep (load + preprocess + vision encoder, one call)")
        lines.append(f"  {'images':>8}{'preprocess':>12}{'vision':>10}{'per image':>11}{'RSS MB':>9}")
        for r in img:
            st = r["summary"]["stages"]
            per = (st["preprocess"]["median"] + st["vision"]["median"]) / r["images"]
            lines.append(f"  {r['images']:>8}{_ms(st['preprocess'], 12)}{_ms(st['vision'], 10)}{1000 * per:>11.2f}"
                         f"{_mb(r['summary']['host_peak_rss_bytes'])}")
        lines.append("")
    m = report.get("mitigation")
    if m:
        lines.append("mitigation A/B (ratio to the plain run, median of paired rounds [p10-p90])"
                     + ("" if m["flags_applied"] else ": FLAGS NOT APPLIED, see notes"))
        lines.append(f"  {'variant':8}{'context':>8}" + "".join(f"{k:>22}" for k in RATIO_METRICS))
        for r in m["ratios"]:
            cells = "".join(f"{r[k]['median']:>8.3f}x [{r[k]['p10']:.2f}-{r[k]['p90']:.2f}]" for k in RATIO_METRICS)
            lines.append(f"  {r['variant']:8}{r['context']:>8}{cells}")
        lines.append("")
    ref = report.get("reference")
    if ref:
        rs = ref["summary"]
        lines.append(f"reference: {ref['name']} (same inputs, interleaved; TTFT without tokenize/preprocess)")
        lines.append(f"  {'':22}{'runtime':>12}{'reference':>12}{'ratio':>8}")
        lines.append(f"  {'time to first token':22}{_ms(rs['runtime_ttft_s'], 12)}{_ms(rs['reference_ttft_s'], 12)}"
                     f"{_ratio(rs['ttft_ratio'])}")
        lines.append(f"  {'per decode step':22}{_ms(rs['runtime_step_s'], 12)}{_ms(rs['reference_step_s'], 12)}"
                     f"{_ratio(rs['step_ratio'])}")
        lines.append("")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def _ratio(r: float | None) -> str:
    return f"{'n/a':>8}" if r is None else f"{r:>7.2f}x"


def _sweep_table(runs, sweep: str, key: str, title: str) -> list[str]:
    rows = sorted((r for r in runs if sweep in r["sweeps"]), key=lambda r: r[key])
    if not rows:
        return []
    out = [title, f"  {key:>8}{'TTFT':>10}{'prefill':>10}{'per token':>11}{'tokens/s':>10}{'RSS MB':>9}"]
    for r in rows:
        sm = r["summary"]
        out.append(f"  {r[key]:>8}{_ms(sm['ttft_s'], 10)}{_ms(sm['stages']['prefill'], 10)}"
                   f"{_ms(sm['steps']['token'], 11)}{sm['decode_tokens_per_s']['median']:>10.1f}"
                   f"{_mb(sm['host_peak_rss_bytes'])}")
    return out + [""]
