"""CLVA inside InstructBLIP's Q-Former cross-attention (queries x image patches), baked into the qformer graph.

Paper: `papers/clva-cross-layer-visual-anchors.txt`, appendix B.1: "we adapt the double anchors mechanism by
applying the weighting formula directly within the internal cross-attention layers of the Qformer itself. During
the compression phase, the Qformer queries Q interact with the raw image features K, V", eq. 14:
`A~_Qf(i, j) = A_Qf(i, j) * (1 + alpha*Zpos(j) - beta*Zneg(j))`; METHODS.md, CLVA, last paragraph, and "Visual
positions". The paper gives eq. 14 and nothing else for the Q-Former; the reading AnchorRT fixes (the PyTorch
reference, exporter/reference/instructblip_reference.py, implements the same reading independently):

- Layers ("L" below) are the Q-Former's layers; only its cross-attention layers (every
  `cross_attention_frequency`-th, transformers' `layer_idx % f == 0`) have query x image attention. Defaults, as
  the paper's "the first layer as the negative anchor, while the positive anchor is set to layer L/2 - 2":
  `l_neg` = the first cross-attention layer, `l_pos` = the last cross-attention layer <= L//2 - 2 (the first one
  when none is), re-weighted ("drift") layers = every cross-attention layer after max(l_neg, l_pos). All three
  are bake-time choices (`--clva-l-neg/--clva-l-pos/--clva-drift-layers` name Q-Former layers for InstructBLIP);
  each must be a cross-attention layer and drift layers must come after both anchor layers (the anchors come from
  the same forward's unedited attention, METHODS.md step 7).
- Rows (the paper's "textual tokens i in T_txt"): the learned queries, all of them: in the Q-Former's
  cross-attention only the queries attend to the image ("the latent queries are forced to aggregate information
  from the relevant visual regions").
- Keys `V` (the paper's "visual token j in T_vis", "the raw image features"): the image patches, i.e. every
  vision-tower output token except CLS (token 0). The CLS key keeps w = 1 and is not in any statistic. (With CLS
  counted in V, eq. 1 would sum each row's whole softmax: Phi = 1 for every head, sigma = 0, no head selected.)
- `M(j)` (eq. 4, "A_h(last, j)" in the decoder, where the last row is the token being generated): every query row
  is produced at once and none is "last", so M is the mean over the query rows, like Phi: `M(j) = mean_{h in H}
  mean_{i in queries} A_h(i, j)`. Z(j) has no row index in eq. 14, so one map per image is what the equation asks.
- Re-weighting: every head, every query row of the drift layers, `w(j)` on patch keys (eq. 14), renormalised
  over all keys (eq. 11) == `softmax(logits + log w)` with -1e9 where w = 0, the decoder pass's form.
- Per image (the qformer graph's batch row is an image): `clva.enable`, `clva.alpha/beta/tau/lambda` [num_images],
  the decoder's flags and defaults (runtime/mitigation.py); the runtime feeds the request's flags to its image.
  Flag off: the bias is exactly 0.0 (`x + 0.0 == x`), and with every image off the `If` returns a zero bias.

Graph form:

    clva.enable [N] ─► any_on ─► If ─┬─ then: probs(l_neg), probs(l_pos) [N,H,Q,K] (the layers' own Softmax)
                                     │        Phi = mean_Q probs @ v [N,H] f64 ─► head sets [N,H]      eqs. 1-3
                                     │        M = mean_{H set} mean_Q probs [N,K] ─► z over V ─► Z     eqs. 4, 8-9
                                     │        bias = Where(enable, log w, 0) [N,1,1,K] fp32            eq. 10/14
                                     └─ else: bias = 0 [1,1,1,1]
    drift layer l:  logits [N,H,Q,K] ─► Add(·, bias) ─► Softmax ─► MatMul(·, v)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.base import Builder, GraphPass, PassError, add_graph_input, graph_input
from anchorrt.graph_passes.clva import select_head_set, weight_bias, zscore_mask
from anchorrt.graph_passes.regions import BOOL, DOUBLE, FLOAT
from anchorrt.graph_passes.shapes import annotate_missing

INT32 = ir.DataType.INT32
_CROSS = re.compile(r"/layer\.(\d+)/crossattention/")
QFORMER_INPUTS = ("image_embeds", "qformer_input_ids", "qformer_attention_mask")


@dataclass(frozen=True)
class QFormerClvaLayers:
    l_neg: int
    l_pos: int
    drift_layers: tuple[int, ...]
    cross_layers: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"l_neg": self.l_neg, "l_pos": self.l_pos, "drift_layers": list(self.drift_layers),
                "graph": "qformer", "cross_attention_layers": list(self.cross_layers)}


def resolve_qformer_layers(num_layers: int, cross_layers, l_neg: int | None = None, l_pos: int | None = None,
                           drift_layers=None, error=PassError) -> QFormerClvaLayers:
    """The defaults and rules of the module docstring; `error` is the exception class to raise."""
    cross = tuple(sorted(int(c) for c in cross_layers))
    if not cross:
        raise error("the Q-Former has no cross-attention layer; CLVA has nothing to re-weight")
    l_neg = cross[0] if l_neg is None else int(l_neg)
    if l_pos is None:
        below = [c for c in cross if c <= num_layers // 2 - 2]
        l_pos = below[-1] if below else cross[0]
    l_pos = int(l_pos)
    for what, layer in (("l_neg", l_neg), ("l_pos", l_pos)):
        if layer not in cross:
            raise error(f"CLVA {what}={layer} is not a Q-Former cross-attention layer (those are {list(cross)})")
    first = max(l_neg, l_pos)
    drift = tuple(c for c in cross if c > first) if drift_layers is None else tuple(sorted({int(x) for x in drift_layers}))
    bad = [x for x in drift if x not in cross or x <= first]
    if bad or not drift:
        raise error(f"CLVA drift layers {list(bad or drift)} must be a non-empty set of Q-Former cross-attention "
                    f"layers after both anchor layers (l_neg={l_neg}, l_pos={l_pos}; cross-attention layers "
                    f"{list(cross)}): they need the anchors of the same forward")
    return QFormerClvaLayers(l_neg, l_pos, drift, cross)


@dataclass
class CrossSite:
    layer: int
    softmax: ir.Node
    logits: ir.Value  # [N, H, Q, K] scaled q kᵀ, the Softmax input
    probs: ir.Value  # [N, H, Q, K]


def match_cross_attention(graph: ir.Graph) -> list[CrossSite]:
    """Each Q-Former layer's cross-attention Softmax (named `/qformer/encoder/layer.{i}/crossattention/...` by
    graph_passes/naming.py), ordered by layer. Exactly one per layer, over a static key count."""
    sites: dict[int, CrossSite] = {}
    for node in graph:
        if node.op_type != "Softmax" or node.domain != "":
            continue
        m = _CROSS.search(node.name or "")
        if m is None:
            continue
        layer = int(m.group(1))
        if layer in sites:
            raise PassError(f"Q-Former layer {layer} has two cross-attention Softmax nodes; not an AnchorRT qformer")
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() not in (-1, 3):
            raise PassError(f"Q-Former layer {layer}'s cross-attention Softmax is not over the keys")
        sites[layer] = CrossSite(layer, node, node.inputs[0], node.outputs[0])
    return [sites[k] for k in sorted(sites)]


class QFormerClvaPass(GraphPass):
    """Bake CLVA into the qformer graph; count = re-weighted cross-attention layers (0: nothing matched)."""

    name = "clva"

    def __init__(self, num_layers: int, cross_layers, num_image_tokens: int, l_neg: int | None = None,
                 l_pos: int | None = None, drift_layers=None):
        super().__init__()
        self.num_layers, self.cross, self.k = num_layers, tuple(cross_layers), int(num_image_tokens)
        self.l_neg, self.l_pos, self.drift_layers = l_neg, l_pos, drift_layers
        self.layers: QFormerClvaLayers | None = None
        self.form = "qformer_cross_attention"
        self.debug_outputs = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sites = {s.layer: s for s in match_cross_attention(graph)}
        if not sites:
            self.count = 0
            return ir.passes.PassResult(model, modified=False)
        if graph_input(graph, "clva.enable") is not None:
            raise PassError("CLVA is already baked into this Q-Former")
        if sorted(sites) != sorted(self.cross):
            raise PassError(f"the qformer graph has cross-attention in layers {sorted(sites)}, the manifest says "
                            f"{sorted(self.cross)}; re-export")
        layers = self.layers = resolve_qformer_layers(self.num_layers, self.cross, self.l_neg, self.l_pos,
                                                      self.drift_layers)
        if any(s.logits.dtype != FLOAT for s in sites.values()):
            raise PassError("CLVA needs the Q-Former's attention in float32; bake before converting precision")
        enable = add_graph_input(graph, "clva.enable", BOOL, ["num_images"])
        params = {k: add_graph_input(graph, f"clva.{k}", FLOAT, ["num_images"])
                  for k in ("alpha", "beta", "tau", "lambda")}
        b = Builder("qformer/clva", taken={n.name for n in graph.all_nodes()})
        any_on = b.op("Cast", [b.op("ReduceMax", [b.op("Cast", [enable], "enabled", to=INT32)], "enabled",
                                    keepdims=0)], "enabled", to=BOOL)
        then = b.child("anchors")
        bias = _anchor_bias(then, sites[layers.l_neg].probs, sites[layers.l_pos].probs, self.k, enable, params)
        otherwise = b.child("off")
        zero = otherwise.op("Identity", [otherwise.const(np.zeros((1, 1, 1, 1), np.float32), "zero_bias")], "bias")
        (bias_out,) = b.if_node(any_on, [bias], then.nodes, [zero], otherwise.nodes, "anchors", [FLOAT])
        graph.extend(b.nodes)
        for layer in layers.drift_layers:
            site = sites[layer]
            lb = Builder(f"qformer/encoder/layer.{layer}/crossattention/clva", taken=b._taken)
            biased = lb.op("Add", [site.logits, bias_out], "biased", dtype=FLOAT)
            graph.extend(lb.nodes)
            site.softmax.replace_input_with(0, biased)
        graph.sort()
        annotate_missing(model)  # every value this pass created gets a type and shape (graph_passes/shapes.py)
        self.count = len(layers.drift_layers)
        return ir.passes.PassResult(model, modified=True)


def _anchor_bias(b: Builder, probs_neg: ir.Value, probs_pos: ir.Value, k: int, enable: ir.Value,
                 params: dict[str, ir.Value]) -> ir.Value:
    """The `then` branch: METHODS.md steps 1-5 per image, with the module docstring's Q-Former reading.

        v = [0, 1, ..., 1] (K): the patch keys; CLS excluded
        probs(l) [N,H,Q,K] ─MatMul(·, v)─► [N,H,Q,1] ─f64, mean over Q─► Phi [N,H]          eq. 1
        Phi ─► sensitive (l_pos) / insensitive (l_neg) heads [N,H]                            eqs. 2-3
        probs(l) ─mean over Q─► [N,H,K] f64 ─mean over the head set─► M [N,K] ─► Z [N,K]      eqs. 4, 8-9
        Zpos, Zneg ─► log w [N,K] (0 on inactive images) ─► bias [N,1,1,K]                   eq. 10 / 14
    """
    ax1 = b.const(np.array([1], np.int64), "axes_1")
    ax2 = b.const(np.array([2], np.int64), "axes_2")
    ax3 = b.const(np.array([3], np.int64), "axes_3")
    one_d = b.const(np.float64(1.0), "one_d")
    patches = np.ones(k, dtype=bool)
    patches[0] = False  # CLS
    visual = b.const(patches[None, :], "visual")  # [1,K] bool
    vis_d = b.const(patches[None, :].astype(np.float64), "visual_d")  # [1,K]
    vis_col = b.const(patches.astype(np.float32)[:, None], "visual_col")  # [K,1]
    n_v = b.const(np.array([[float(patches.sum())]], np.float64), "v_count")  # [1,1]
    active_col = b.op("Unsqueeze", [enable, ax1], "active_col")  # [N,1]
    lam = b.op("Unsqueeze", [b.op("Cast", [params["lambda"]], "lambda_d", to=DOUBLE), ax1], "lambda_col")
    tau = b.op("Unsqueeze", [b.op("Cast", [params["tau"]], "tau_d", to=DOUBLE), ax1], "tau_col")

    def phi_of(probs: ir.Value, tag: str) -> ir.Value:
        on_v = b.op("MatMul", [probs, vis_col], f"{tag}/visual_mass")  # [N,H,Q,1] fp32
        on_v = b.op("Cast", [b.op("Squeeze", [on_v, ax3], f"{tag}/visual_mass")], f"{tag}/visual_mass", to=DOUBLE)
        return b.op("ReduceMean", [on_v, ax2], f"{tag}/phi", keepdims=0)  # [N,H]  eq. 1 over the query rows

    def anchor(probs: ir.Value, heads_set: ir.Value, tag: str) -> ir.Value:
        rows = b.op("ReduceMean", [b.op("Cast", [probs], f"{tag}/probs_d", to=DOUBLE), ax2], f"{tag}/row_mean",
                    keepdims=0)  # [N,H,K]: the query rows' mean stands for "the last row"
        h_d = b.op("Cast", [heads_set], f"{tag}/heads_d", to=DOUBLE)  # [N,H]
        n_h = b.op("ReduceSum", [h_d, ax1], f"{tag}/head_count", keepdims=1)  # [N,1]
        summed = b.op("MatMul", [b.op("Unsqueeze", [h_d, ax1], f"{tag}/heads_row"), rows], f"{tag}/m")  # [N,1,K]
        m = b.op("Div", [b.op("Squeeze", [summed, ax1], f"{tag}/m"), b.op("Max", [n_h, one_d], f"{tag}/m")],
                 f"{tag}/m")  # [N,K]  eq. 4
        return zscore_mask(b, m, n_h, vis_d, visual, n_v, tau, tag)

    insensitive = select_head_set(b, phi_of(probs_neg, "neg"), lam, active_col, "neg", sensitive=False)
    sensitive = select_head_set(b, phi_of(probs_pos, "pos"), lam, active_col, "pos", sensitive=True)
    zneg = anchor(probs_neg, insensitive, "neg")
    zpos = anchor(probs_pos, sensitive, "pos")
    bias = weight_bias(b, zpos, zneg, params["alpha"], params["beta"])  # [N,K]
    bias = b.op("Where", [active_col, bias, b.const(np.float32(0.0), "zero_f")], "bias_on")  # off: exactly 0
    return b.op("Unsqueeze", [bias, b.const(np.array([1, 2], np.int64), "axes_1_2")], "bias", dtype=FLOAT)
