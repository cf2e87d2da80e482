"""PNG plots of a profile report, with matplotlib (the `profile` extra).

- stages.png: where the time goes in the base case: time-to-first-token stages and per-token stages, bars at the
  median with p10-p90 whiskers.
- per_token.png: inter-token latency vs sequence position, one line per context of the context sweep (batch 1),
  shaded p10-p90.
- scaling_batch.png, scaling_context.png: TTFT and prefill, per-token latency, decode tokens/s and peak host RSS
  against the swept value, medians with p10-p90 error bars.
- scaling_images.png: load + preprocess and vision encoder time, and per-image time, against the image count.
- mitigation.png: each variant's ratio to the plain run against context (TTFT, prefill, decoder pass, per token),
  medians of paired rounds with p10-p90 bars, and the 1.0 line.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

from pathlib import Path

from anchorrt.runtime.errors import AnchorError

INSTALL_HINT = "matplotlib is not installed; plots need `pip install anchorrt[profile]` (or pass --no-plots)"


class PlotError(AnchorError):
    """Plots were asked for but cannot be drawn (matplotlib missing)."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(INSTALL_HINT) from None


def _figure(rows: int, cols: int, w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _ms(stats: dict | None) -> tuple[float, float, float]:
    if not stats:
        return 0.0, 0.0, 0.0
    m = 1000 * stats["median"]
    return m, m - 1000 * stats["p10"], 1000 * stats["p90"] - m


def write_plots(report: dict, out: str | Path) -> list[str]:
    """Draw every plot the report has data for into `out`; returns the file names written."""
    require_matplotlib()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("stages.png", _stages), ("per_token.png", _per_token), ("scaling_batch.png", _batch),
                       ("scaling_context.png", _context), ("scaling_images.png", _images),
                       ("mitigation.png", _mitigation)):
        fig = draw(report)
        if fig is None:
            continue
        fig.savefig(out / name)
        written.append(name)
    return written


def _title(report: dict) -> str:
    a, env = report["artifact"], report["environment"]
    return f"{Path(a['folder']).name}: {a['num_layers']} layers, hidden {a['hidden_size']}, {env['provider']}"


def _base(report: dict) -> dict:
    return next(r for r in report["runs"] if "base" in r["sweeps"])


def _stages(report: dict):
    base = _base(report)
    s = base["summary"]
    fig, axes = _figure(1, 2, 11, 4.2)
    groups = [
        ("time to first token", [(st, s["stages"][st]) for st in report["stages"]["ttft"]] + [("= TTFT", s["ttft_s"])]),
        ("per generated token", [(st, s["steps"][st]) for st in report["stages"]["step"]]
         + [("= per token", s["steps"]["token"])]),
    ]
    for ax, (title, items) in zip(axes[0], groups):
        labels = [k for k, _ in items][::-1]
        vals = [_ms(v) for _, v in items][::-1]
        colors = ["#555555" if k.startswith("=") else "#3b75af" for k in labels]
        ax.barh(labels, [v[0] for v in vals], xerr=[[v[1] for v in vals], [v[2] for v in vals]], color=colors,
                capsize=3)
        for i, v in enumerate(vals):
            ax.annotate(f"{v[0]:.2f}", (v[0] + v[2], i), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize=8)
        ax.set_xlabel("ms (median, p10-p90)")
        ax.set_title(title)
        ax.margins(x=0.18)
    fig.suptitle(f"{_title(report)}; batch 1, context {base['context']}, {base['new_tokens']} new tokens")
    return fig


def _per_token(report: dict):
    runs = sorted((r for r in report["runs"] if "context" in r["sweeps"] or "base" in r["sweeps"]),
                  key=lambda r: r["context"])
    if not runs:
        return None
    fig, axes = _figure(1, 1, 8, 4.5)
    ax = axes[0][0]
    for r in runs:
        pp = r["summary"]["per_position"]
        x = pp["positions"]
        ax.plot(x, [1000 * v for v in pp["median"]], marker=".", lw=1.2, label=f"context {r['context']}")
        ax.fill_between(x, [1000 * v for v in pp["p10"]], [1000 * v for v in pp["p90"]], alpha=0.2)
    ax.set_xlabel("sequence position of the token fed to the decoder")
    ax.set_ylabel("inter-token latency, ms (median, p10-p90)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.suptitle(f"{_title(report)}\nper-token latency vs position (batch 1, one line per context)")
    return fig


def _scaling(report: dict, sweep: str, key: str, xlabel: str):
    runs = sorted((r for r in report["runs"] if sweep in r["sweeps"]), key=lambda r: r[key])
    if len(runs) < 1:
        return None
    x = [r[key] for r in runs]
    fig, axes = _figure(2, 2, 10, 7)

    tops: dict = {}  # axis -> highest point drawn (median + upper whisker)

    def line(ax, get, label, scale=1000.0):
        vals = [get(r) for r in runs]
        if not isinstance(vals[0], dict):  # a single number per run (peak memory): no spread
            vals = [{"median": v, "p10": v, "p90": v} for v in vals]
        med = [scale * v["median"] for v in vals]
        err = [[scale * (v["median"] - v["p10"]) for v in vals], [scale * (v["p90"] - v["median"]) for v in vals]]
        ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label=label)
        tops[ax] = max(tops.get(ax, 0.0), max(m + e for m, e in zip(med, err[1])))
        if scale != 1000.0 and scale != 1.0:  # memory: print the values, a flat line says little by itself
            for xi, m in zip(x, med):
                ax.annotate(f"{m:.0f}", (xi, m), xytext=(0, 5), textcoords="offset points", ha="center", fontsize=7)

    ax = axes[0][0]
    line(ax, lambda r: r["summary"]["ttft_s"], "time to first token")
    line(ax, lambda r: r["summary"]["stages"]["prefill"], "prefill (decoder pass)")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    ax.set_title("time to first token")
    ax = axes[0][1]
    line(ax, lambda r: r["summary"]["steps"]["token"], "per token")
    line(ax, lambda r: r["summary"]["steps"]["decode"], "decoder pass")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    ax.set_title("per generated token")
    ax = axes[1][0]
    line(ax, lambda r: r["summary"]["decode_tokens_per_s"], "decode tokens/s (all rows)", scale=1.0)
    ax.set_ylabel("tokens/s")
    ax.set_title("decode throughput")
    ax = axes[1][1]
    line(ax, lambda r: r["summary"]["host_peak_rss_bytes"], "peak host RSS", scale=1 / 2**20)
    if all(r["summary"].get("device_used_peak_bytes") for r in runs):
        line(ax, lambda r: r["summary"]["device_used_peak_bytes"], "device memory used (NVML)", scale=1 / 2**20)
    ax.set_ylabel("MB")
    ax.legend(fontsize=8)
    ax.set_title("memory")
    for row in axes:
        for ax in row:
            ax.set_xlabel(xlabel)
            ax.set_xticks(x)
            # From 0 to 15% above the highest point: a flat series (peak memory) stays inside the panel instead of
            # sitting on its top edge, where autoscaling a near-constant series puts it.
            ax.set_ylim(0, 1.15 * tops[ax] if tops.get(ax, 0) > 0 else 1.0)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{_title(report)}; {sweep} sweep")
    return fig


def _batch(report: dict):
    return _scaling(report, "batch", "batch", "batch size (requests)")


def _context(report: dict):
    return _scaling(report, "context", "context", "context (prompt tokens, image included)")


def _images(report: dict):
    runs = sorted((r for r in report["runs"] if "images" in r["sweeps"]), key=lambda r: r["images"])
    if not runs:
        return None
    x = [r["images"] for r in runs]
    fig, axes = _figure(1, 2, 10, 4)
    ax = axes[0][0]
    for st, label in (("preprocess", "load + preprocess"), ("vision", "vision encoder")):
        vals = [_ms(r["summary"]["stages"][st]) for r in runs]
        ax.errorbar(x, [v[0] for v in vals], yerr=[[v[1] for v in vals], [v[2] for v in vals]], marker="o",
                    capsize=3, label=label)
    ax.set_ylabel("ms (median, p10-p90)")
    ax.set_title("time per call")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    per = [1000 * (r["summary"]["stages"]["preprocess"]["median"] + r["summary"]["stages"]["vision"]["median"])
           / r["images"] for r in runs]
    ax.plot(x, per, marker="o")
    ax.set_ylabel("ms per image")
    ax.set_title("per image (preprocess + vision)")
    for ax in axes[0]:
        ax.set_xlabel("images in one call")
        ax.set_xticks(x)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{_title(report)}; image-count sweep")
    return fig


def _mitigation(report: dict):
    m = report.get("mitigation")
    if not m or not m["ratios"]:
        return None
    metrics = (("ttft", "time to first token"), ("prefill", "prefill (decoder pass)"),
               ("decode", "decoder pass per token"), ("token", "per token"))
    variants = list(dict.fromkeys(r["variant"] for r in m["ratios"]))
    contexts = sorted({r["context"] for r in m["ratios"]})
    fig, axes = _figure(2, 2, 10, 7)
    for ax, (k, title) in zip([a for row in axes for a in row], metrics):
        for v in variants:
            rows = sorted((r for r in m["ratios"] if r["variant"] == v), key=lambda r: r["context"])
            x = [r["context"] for r in rows]
            med = [r[k]["median"] for r in rows]
            err = [[r[k]["median"] - r[k]["p10"] for r in rows], [r[k]["p90"] - r[k]["median"] for r in rows]]
            ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label=v)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(contexts)
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel("ratio to plain (paired rounds)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{_title(report)}; mitigation on / plain, batch 1"
                 + ("" if m["flags_applied"] else " (flags NOT applied)"))
    return fig
