"""The four pictures of `anchorrt explain`, from the numbers of explain.json (matplotlib, the `profile` extra).

- heads.png: the layer x head matrix of Phi (the CLVA paper's Figure 1), sensitive / insensitive heads marked.
- layers.png: the last prompt row's attention over the image for every layer (Figure 2a): all heads, the layer's
  sensitive heads, and all heads with the mitigation on, over the image as the model sees it.
- drift.png: per layer, entropy of the visual attention and its Pearson correlation with the l_neg and l_pos
  anchor maps (Figure 2b), mitigation off and on, drift layers shaded.
- anchors.png: the image with CLVA's positive and negative anchors, the question and both answers.

Every figure has a title with the prompt, axis labels and a legend. Drawn with matplotlib's object API on the Agg
canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from anchorrt.runtime.errors import AnchorError

INSTALL_HINT = 'matplotlib is not installed; explain draws with it: `pip install "anchorrt[profile]"`'
POS, NEG = "#1a9850", "#d73027"  # green: positive anchors / l_pos, red: negative anchors / l_neg


class PlotError(AnchorError):
    """Pictures were asked for but cannot be drawn (matplotlib missing)."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(INSTALL_HINT) from None


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(fig, what: str, report: dict) -> None:
    """The figure's title and the prompt, wrapped to the figure's width (about 11.5 characters an inch at 11 pt)."""
    width = int(fig.get_figwidth() * 11.5)
    prompt = textwrap.shorten(report["prompt"], 400)
    lines = textwrap.wrap(what, width) + textwrap.wrap(f'prompt: "{prompt}"', width)
    fig.suptitle("\n".join(lines), fontsize=11)


def _layer_tag(report: dict, layer: int) -> str:
    lay = report["layers"]
    tags = []
    if layer == lay["l_neg"]:
        tags.append("l_neg")
    if layer == lay["l_pos"]:
        tags.append("l_pos")
    if layer in lay["drift_layers"]:
        tags.append("drift")
    return ", ".join(tags)


def _grid(values, report: dict) -> np.ndarray:
    g = report["image_tokens"]
    v = np.asarray(values, dtype=np.float64)[g["skip"]:]
    return v.reshape(g["rows"], g["cols"])


def heads_png(report: dict, path: Path) -> None:
    from matplotlib.lines import Line2D

    off = report["off"]
    phi = np.asarray(off["phi"], dtype=np.float64)  # [L, H]
    layers, heads = phi.shape
    fig = _figure(max(7.0, 2.5 + 0.42 * heads), max(5.0, 3.2 + 0.36 * layers))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(phi, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(phi.max()), 1e-9))
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label("Phi: mean attention of the prompt's text rows on image tokens (eq. 1)")
    if layers * heads <= 40 * 40:
        for (li, h), v in np.ndenumerate(phi):
            ax.text(h, li, f"{v:.2f}".removeprefix("0"), ha="center", va="center", fontsize=6,
                    color="white" if v < 0.6 * phi.max() else "black")
    for li in range(layers):
        for h in off["sensitive_heads"][li]:
            ax.scatter(h, li - 0.28, marker="^", s=36, facecolor="white", edgecolor="black", lw=0.8, zorder=3)
        for h in off["insensitive_heads"][li]:
            ax.scatter(h, li - 0.28, marker="v", s=36, facecolor="black", edgecolor="white", lw=0.8, zorder=3)
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers), [f"{li} ({t})" if (t := _layer_tag(report, li)) else str(li) for li in range(layers)],
                  fontsize=8)
    ax.set_xlabel("attention head")
    ax.set_ylabel("decoder layer (CLVA's role in brackets)")
    lam = report["thresholds"]["lam"]
    handles = [Line2D([], [], ls="", marker="^", markerfacecolor="white", markeredgecolor="black", markersize=8,
                      label=f"visually sensitive head: Phi > mean + {lam:g} std of its layer (eq. 2)"),
               Line2D([], [], ls="", marker="v", markerfacecolor="black", markeredgecolor="white", markersize=8,
                      label=f"visually insensitive head: Phi < mean - {lam:g} std of its layer (eq. 3)")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=1, fontsize=8, frameon=False)
    lay = report["layers"]
    _title(fig, f"Visual attention intensity per layer and head (mitigation off). CLVA takes positive anchors from "
                f"the sensitive heads of layer {lay['l_pos']} (l_pos) and negative anchors from the insensitive "
                f"heads of layer {lay['l_neg']} (l_neg)", report)
    fig.savefig(path)


def _overlay(ax, view: np.ndarray, values, report: dict, title: str):
    ax.imshow(view, extent=(0, 1, 1, 0))
    if values is None:
        ax.text(0.5, 0.5, "no head\nin the set", ha="center", va="center", fontsize=8, color="white",
                bbox={"facecolor": "black", "alpha": 0.6})
    else:
        g = _grid(values, report)
        top = g.max()
        ax.imshow(g / top if top > 0 else g, extent=(0, 1, 1, 0), cmap="jet", alpha=0.5, vmin=0, vmax=1,
                  interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def layers_png(report: dict, view: np.ndarray, path: Path) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    layers = report["layers"]["num_layers"]
    step = max(1, view.shape[0] // 160)  # a panel is ~170 px wide: a smaller background keeps the file small
    view = view[::step, ::step]
    cols = min(layers, 8)
    blocks = -(-layers // cols)
    kinds = [("off", "map_all_heads", "all heads"), ("off", "map_sensitive_heads", "sensitive heads of the layer"),
             ("on", "map_all_heads", f"all heads, {report['mitigation_on']['methods']} on")]
    rows = blocks * len(kinds)
    fig = _figure(1.7 * cols + 1.6, 1.9 * rows + 1.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for layer in range(layers):
        block, col = divmod(layer, cols)
        tag = _layer_tag(report, layer)
        for k, (which, key, label) in enumerate(kinds):
            ax = axes[block * len(kinds) + k][col]
            values = report[which][key][layer]
            share = f"\non the image: {sum(values):.2f}" if values is not None else ""
            _overlay(ax, view, values, report, f"layer {layer}" + (f" ({tag})" if tag else "") + share)
            if col == 0:
                ax.set_ylabel(textwrap.fill(label, 16), fontsize=8)
    for layer in range(layers, blocks * cols):
        for k in range(len(kinds)):
            axes[(layer // cols) * len(kinds) + k][layer % cols].set_axis_off()
    fig.supxlabel("each panel: the image as the model sees it (x left to right, y top to bottom), one cell per image "
                  "token", fontsize=9)
    cb = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes, shrink=0.6, alpha=0.5)
    cb.set_label("share of the panel's maximum attention")
    _title(fig, "Where the last prompt token looks in each layer: its attention over the image tokens, each panel "
                "scaled to its own maximum ('on the image': the attention's total share on image tokens)", report)
    fig.savefig(path)


def drift_png(report: dict, path: Path) -> None:
    layers = report["layers"]["num_layers"]
    x = np.arange(layers)
    lay = report["layers"]
    on = report["mitigation_on"]["methods"]
    fig = _figure(12, 7.8)
    top, bottom = fig.subplots(2, 1, sharex=True)

    def series(values):
        return np.array([np.nan if v is None else v for v in values], dtype=float)

    for ax in (top, bottom):  # the shared marks are labelled once, in the top legend
        shown = ax is top
        if lay["drift_layers"]:
            ax.axvspan(min(lay["drift_layers"]) - 0.5, max(lay["drift_layers"]) + 0.5, color="0.9",
                       label="drift layers (CLVA re-weights these)" if shown else "_nolegend_")
        ax.axvline(lay["l_neg"], color=NEG, ls=":", lw=1.2,
                   label=f"l_neg = {lay['l_neg']} (negative anchors)" if shown else "_nolegend_")
        ax.axvline(lay["l_pos"], color=POS, ls=":", lw=1.2,
                   label=f"l_pos = {lay['l_pos']} (positive anchors)" if shown else "_nolegend_")
        ax.grid(alpha=0.3)
    top.plot(x, series(report["off"]["entropy_all_heads"]), "o-", color="#4575b4", label="all heads, mitigation off")
    top.plot(x, series(report["on"]["entropy_all_heads"]), "s--", color="#4575b4", mfc="none",
             label=f"all heads, {on} on")
    top.plot(x, series(report["off"]["entropy_sensitive_heads"]), "^-", color="#7b3294",
             label="sensitive heads of the layer, off")
    uniform = float(np.log(max(report["image_tokens"]["count"], 1)))
    top.axhline(uniform, color="black", lw=0.8, label=f"uniform over the {report['image_tokens']['count']} image tokens")
    drawn = [v for key in ("entropy_all_heads", "entropy_sensitive_heads") for side in ("off", "on")
             for v in report[side].get(key, []) if v is not None] + [uniform]
    span = max(max(drawn) - min(drawn), 0.1)
    top.set_ylim(min(drawn) - 0.08 * span, max(drawn) + 0.08 * span)  # the uniform line inside, not on the edge
    top.set_ylabel("entropy of the visual attention (nats)")
    top.set_title("Entropy of the last prompt token's attention over the image (lower = more focused), eq. 5",
                  fontsize=10)
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    bottom.plot(x, series(report["off"]["pearson_neg"]), "o-", color=NEG,
                label="r with the l_neg insensitive-head map, off")
    bottom.plot(x, series(report["on"]["pearson_neg"]), "s--", color=NEG, mfc="none",
                label=f"r with the l_neg insensitive-head map, {on} on")
    bottom.plot(x, series(report["off"]["pearson_pos"]), "o-", color=POS,
                label="r with the l_pos sensitive-head map, off")
    bottom.plot(x, series(report["on"]["pearson_pos"]), "s--", color=POS, mfc="none",
                label=f"r with the l_pos sensitive-head map, {on} on")
    bottom.axhline(0, color="black", lw=0.8)
    bottom.set_ylim(-1.05, 1.05)
    bottom.set_ylabel("Pearson r with the anchor map")
    bottom.set_xlabel("decoder layer")
    bottom.set_xticks(x)
    bottom.set_title("Correlation of each layer's map (all heads) with the anchor maps, eq. 6", fontsize=10)
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    s = report["suggestion"]
    if s["l_pos"] is not None:
        text = f"Suggestion: l_pos = {s['l_pos']}, drift layers {s['drift_layers']}. {s['reason']}. Based on {s['basis']}."
    else:
        text = f"No suggestion: {s['reason']}."
    missing = [k for k in ("pearson_neg", "pearson_pos") if all(v is None for v in report["off"][k])]
    if missing:
        text += " A missing line: that anchor's head set is empty at this lam (no map to correlate with)."
    fig.text(0.01, 0.0, textwrap.fill(text, 190), fontsize=8, va="bottom")
    fig.get_layout_engine().set(rect=(0, 0.08, 1, 0.92))
    _title(fig, "Deep-layer attention drift (the CLVA paper's Fig. 2b), mitigation off and on", report)
    fig.savefig(path)


def anchors_png(report: dict, view: np.ndarray, path: Path) -> None:
    from matplotlib.patches import Patch, Rectangle

    g = report["image_tokens"]
    n = g["rows"] * g["cols"]
    fig = _figure(9, 7.2)
    left, right = fig.subplots(1, 2)
    left.imshow(view, extent=(0, 1, 1, 0))
    left.set_title("the image as the model sees it", fontsize=10)
    right.imshow(view, extent=(0, 1, 1, 0))
    zpos = np.zeros(g["count"], dtype=bool)
    zneg = np.zeros(g["count"], dtype=bool)
    zpos[report["off"]["zpos"]] = True
    zneg[report["off"]["zneg"]] = True
    zpos, zneg = zpos[g["skip"]:].reshape(g["rows"], g["cols"]), zneg[g["skip"]:].reshape(g["rows"], g["cols"])
    h, w = 1.0 / g["rows"], 1.0 / g["cols"]
    for mask, colour, inset in ((zneg, NEG, 0.0), (zpos, POS, 0.12)):  # a cell in both gets a green box in a red one
        for r, c in zip(*np.nonzero(mask)):
            right.add_patch(Rectangle((c * w + inset * w, r * h + inset * h), w * (1 - 2 * inset), h * (1 - 2 * inset),
                                      facecolor=colour, alpha=0.35, edgecolor=colour, lw=2.5))
    lay, tau = report["layers"], report["thresholds"]["tau"]
    right.set_title(textwrap.fill(f"CLVA's anchors on the image tokens ({g['layout']})", 48), fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("image x")
        ax.set_ylabel("image y")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(facecolor=POS, alpha=0.6, edgecolor=POS, label=f"positive anchor: z > {tau:g} in the map of "
               f"layer {lay['l_pos']}'s sensitive heads ({int(zpos.sum())} of {n} tokens; boosted in the drift layers)"),
               Patch(facecolor=NEG, alpha=0.6, edgecolor=NEG, label=f"negative anchor: z > {tau:g} in the map of "
               f"layer {lay['l_neg']}'s insensitive heads ({int(zneg.sum())} of {n} tokens; suppressed)")]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.13), fontsize=9, frameon=False)
    a = report["answers"]
    on = report["mitigation_on"]["methods"]
    text = "\n".join([textwrap.fill(f"Q: {report['prompt']}", 100),
                      textwrap.fill(f"A, mitigation off: {a['off']['text']!r}", 100),
                      textwrap.fill(f"A, {on} on: {a['on']['text']!r}", 100)])
    fig.text(0.03, 0.01, text, fontsize=9, va="bottom", family="monospace")
    fig.get_layout_engine().set(rect=(0, 0.2, 1, 0.8))
    _title(fig, "Where CLVA steers the drift layers: positive anchors are boosted (w = 1 + alpha), negative "
                "anchors suppressed (w = 1 - beta)", report)
    fig.savefig(path)
