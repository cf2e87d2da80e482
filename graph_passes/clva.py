"""CLVA (Cross-Layer Visual Anchors) baked into a decoder graph, as METHODS.md section CLVA defines it.

Paper: `papers/clva-cross-layer-visual-anchors.txt`, eqs. 1-4 and 8-11. Per pass, per batch row b:

    Phi_h  = mean_{i in T} sum_{j in V} A_h(i, j)                                   eq. 1   (l_neg and l_pos)
    H_sens = {h | Phi_h > mu + lam*sigma} at l_pos,  H_insens = {h | Phi_h < mu - lam*sigma} at l_neg   eqs. 2-3
    M(j)   = mean_{h in H} A_h(last, j), j in V                                     eq. 4
    Z(j)   = 1[(M(j) - mean_V M) / (std_V M + 1e-6) > tau]                          eqs. 8-9
    w(j)   = max(0, 1 + alpha*Zpos(j) - beta*Zneg(j))                               eq. 10
    drift layers, every head, T rows:  softmax(logits + mask + log w)  ==  A*w / sum(A*w)    eqs. 10-11

Graph form (one `If` for the whole pass, so a batch with every row off runs none of it):

    clva.enable [B] ─Cast─ReduceMax─Cast─► any_on ─► If ─┬─ then: regions, Phi, head sets, anchors, bias
                                                           │        clva_mask = Where(T row of an active b,
                                                           │                          mask + log w [B,1,1,K], mask)
                                                           └─ else: clva_mask = mask (Identity)
    drift layer l:   logits ─► Add(·, clva_mask) ─► Softmax ...            (opset 18, MatMul/Softmax form)
                     Attention(q, k, v, attn_mask=clva_mask)                (opset 23: the fused op is kept)

The bias is fp32 and exactly 0.0 outside (active row, T row, V key with w != 1), and `x + 0.0 == x`, so rows with
the flag off, passes without T rows and padded positions see the exporter's mask bit for bit; with every row
off the If hands back the mask itself. w = 0 becomes -1e9 (exp underflows to exactly 0), never log(0).

Statistics: Phi from the *unedited* probabilities of l_neg/l_pos (METHODS.md step 7). In the opset-18 form they
are the Softmax outputs of those layers. With the opset-23 `Attention` op the probabilities are not exposed, so
inside the `then` branch the two layers' q kᵀ is recomputed from the Attention's own q and k (only for the query
rows from the first T row of the batch on) and put through the same mask and Softmax; the layers' Attention
nodes stay as they are. On the fused form (GroupQueryAttention) the keys are the past buffer read in place plus the
node's new keys (graph_passes/regions.py `site_logits`; before, Concat(past[:, :, :P], new) copied both layers' key
caches every pass): at decode CLVA on then costs one read of the two layers' key buffers plus its ~185 small ops
(bench model of scripts/bench_mitigation.py, 8 layers, hidden 512, 1 thread, CPU time, the same session with the
flag off: ~1.065x at context 256 and ~1.10x at 1024, against ~1.07x and ~1.12x before; the key reads are 2 x 2 MB
of the ~135 MB a step reads at 1024, the ops ~0.3 ms whatever the model's size). The sum over V keys runs in fp32 (MatMul), everything after it (means over T rows, mu,
sigma, the anchor maps, z-scores and the threshold tests) in float64, population standard deviations, strict
inequalities. `sigma = 0` (all Phi equal) selects no head, decided as max == min like the reference.

Inputs added: `visual_mask` [batch, total_length] bool (shared with SEVI), `clva.enable` [batch] bool,
`clva.alpha`, `clva.beta`, `clva.tau`, `clva.lambda` [batch] float32. Layer choices are fixed here.
Debug outputs (optional): `clva.zpos`, `clva.zneg` [batch, total_length] bool, `clva.sensitive_heads`,
`clva.insensitive_heads` [batch, heads] bool (all False for rows that are off or have no T row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.attention_match import (
    GQA,
    RECOMPUTED,
    AttentionSite,
    match_attention,
    require_float32,
)
from anchorrt.graph_passes.base import (
    META_BASE_MASK,
    META_EFFECTIVE_MASK,
    META_LAYER,
    META_MASK_ROLE,
    Builder,
    GraphPass,
    PassError,
    add_graph_input,
    add_graph_output,
    graph_input,
)
from anchorrt.graph_passes.regions import (
    BOOL,
    DOUBLE,
    FLOAT,
    build_regions,
    query_rows,
    shared_float_mask,
    site_logits,
    slice_axis,
)
from anchorrt.graph_passes.shapes import annotate_missing, reduce_extreme

Z_EPS = 1e-6  # eq. 8
LOG_ZERO = -1e9  # the bias where w = 0: exp(-1e9 + any fp32 logit) is exactly 0
INT32 = ir.DataType.INT32

CLVA_INPUTS = {  # name -> (dtype, meaning); defaults and valid ranges live in runtime/mitigation.py
    "clva.enable": ("bool", "turn CLVA on for this batch row"),
    "clva.alpha": ("float32", "boost of positive-anchor visual keys (eq. 10)"),
    "clva.beta": ("float32", "suppression of negative-anchor visual keys (eq. 10)"),
    "clva.tau": ("float32", "z-score threshold of the anchor masks (eq. 9)"),
    "clva.lambda": ("float32", "head-selection width in population standard deviations (eqs. 2-3)"),
}
VISUAL_MASK_INPUT = ("visual_mask", "bool", ["batch", "total_length"],
                     "true at the image-token positions of the prompt (key columns); false for padding and every "
                     "generated token")
DEBUG_OUTPUTS = {
    "clva.zpos": ("bool", ["batch", "total_length"], "positive anchor mask Zpos"),
    "clva.zneg": ("bool", ["batch", "total_length"], "negative anchor mask Zneg"),
    "clva.sensitive_heads": ("bool", ["batch", "heads"], "sensitive heads of l_pos"),
    "clva.insensitive_heads": ("bool", ["batch", "heads"], "insensitive heads of l_neg"),
}


@dataclass(frozen=True)
class ClvaLayers:
    l_neg: int
    l_pos: int
    drift_layers: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"l_neg": self.l_neg, "l_pos": self.l_pos, "drift_layers": list(self.drift_layers)}


def resolve_clva_layers(num_layers: int, l_neg: int | None = None, l_pos: int | None = None,
                        drift_layers=None) -> ClvaLayers:
    """METHODS.md defaults (l_neg 0, l_pos L//2-2, drift l_pos+1..L-1) and the rule drift > max(l_neg, l_pos)."""
    l_neg = 0 if l_neg is None else int(l_neg)
    l_pos = num_layers // 2 - 2 if l_pos is None else int(l_pos)
    for what, layer in (("l_neg", l_neg), ("l_pos", l_pos)):
        if not 0 <= layer < num_layers:
            raise PassError(f"CLVA {what}={layer} is outside the model's layers 0..{num_layers - 1}")
    first = max(l_neg, l_pos) + 1
    drift = tuple(range(first, num_layers)) if drift_layers is None else tuple(sorted({int(x) for x in drift_layers}))
    bad = [x for x in drift if not first <= x < num_layers]
    if bad or not drift:
        raise PassError(f"CLVA drift layers {list(bad or drift)} must be a non-empty subset of {first}..{num_layers - 1}: "
                        f"they come after both anchor layers (l_neg={l_neg}, l_pos={l_pos}), whose unedited attention "
                        "they need in the same pass")
    return ClvaLayers(l_neg, l_pos, drift)


class ClvaPass(GraphPass):
    """Bake CLVA; count = drift layers rewritten (0 and the graph unchanged if no attention matches)."""

    name = "clva"

    def __init__(self, l_neg: int | None = None, l_pos: int | None = None, drift_layers=None,
                 debug_outputs: bool = False):
        super().__init__()
        self.l_neg, self.l_pos, self.drift_layers = l_neg, l_pos, drift_layers
        self.debug_outputs = debug_outputs
        self.layers: ClvaLayers | None = None
        self.form: str | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sites = match_attention(graph)
        if not sites:
            self.count = 0
            return ir.passes.PassResult(model, modified=False)
        if graph_input(graph, "clva.enable") is not None:
            raise PassError("CLVA is already baked into this decoder")
        require_float32(sites, "CLVA")
        self.form = sites[0].form
        layers = self.layers = resolve_clva_layers(len(sites), self.l_neg, self.l_pos, self.drift_layers)
        drift_sites = [sites[i] for i in layers.drift_layers]
        base = drift_sites[0].base_mask
        if any(s.base_mask is not base for s in sites):
            raise PassError("the decoder layers use different attention masks; CLVA expects the one shared causal mask")
        heads = _query_heads(sites[0])

        inputs_embeds = graph_input(graph, "inputs_embeds")
        attention_mask = graph_input(graph, "attention_mask")
        if inputs_embeds is None or attention_mask is None:
            raise PassError("the decoder has no inputs_embeds/attention_mask input; not an AnchorRT decoder graph")
        visual_mask = add_graph_input(graph, "visual_mask", BOOL, ["batch", "total_length"])
        enable = add_graph_input(graph, "clva.enable", BOOL, ["batch"])
        params = {k: add_graph_input(graph, f"clva.{k}", FLOAT, ["batch"]) for k in ("alpha", "beta", "tau", "lambda")}
        base_f = shared_float_mask(graph, base)

        taken = {n.name for n in graph.all_nodes()}
        b = Builder("model/clva", taken=taken)
        any_on = b.op("Cast", [b.op("ReduceMax", [b.op("Cast", [enable], "enabled", to=INT32)], "enabled", keepdims=0)],
                      "enabled", to=BOOL)

        then = b.child("anchors")
        outs = _anchor_branch(then, sites[layers.l_neg], sites[layers.l_pos], heads, base_f, attention_mask,
                              visual_mask, inputs_embeds, enable, params)
        otherwise = b.child("off")
        off_outs = [otherwise.op("Identity", [base_f], "mask")]
        dtypes = [FLOAT]
        then_outs = [outs["mask"]]
        if self.debug_outputs:
            then_outs += [outs[k] for k in ("zpos", "zneg", "sensitive", "insensitive")]
            off_outs += _debug_zeros(otherwise, attention_mask, heads)
            dtypes += [BOOL] * 4
        results = b.if_node(any_on, then_outs, then.nodes, off_outs, otherwise.nodes, "anchors", dtypes)
        clva_mask = results[0]
        graph.extend(b.nodes)

        for site in drift_sites:
            _rewire_mask(graph, site, clva_mask)
        if self.debug_outputs:
            for value, (name, (dtype, shape, _)) in zip(results[1:], DEBUG_OUTPUTS.items()):
                add_graph_output(graph, value, name, BOOL if dtype == "bool" else FLOAT,
                                 [d if d != "heads" else heads for d in shape])
        graph.sort()
        self.count = len(drift_sites)
        annotate_missing(model)  # every value this pass created gets a type and shape
        return ir.passes.PassResult(model, modified=True)


def _query_heads(site: AttentionSite) -> int:
    return site.query_heads()


def _rewire_mask(graph: ir.Graph, site: AttentionSite, clva_mask: ir.Value) -> None:
    """The drift layer reads `clva_mask`: its Add/Attention (or, where SEVI derives the fused node's bias from the
    layer's mask, SEVI's record of that mask), and any node a pass tagged as reading the layer's effective mask
    (SEVI's recomputed last row and decode-step bias, when SEVI was baked first)."""
    node = site.mask_node
    node.metadata_props.setdefault(META_BASE_MASK, site.base_mask.name)
    node.metadata_props[META_LAYER] = str(site.layer)
    if META_EFFECTIVE_MASK in node.metadata_props:  # the node's mask is derived from the layer's (SEVI, fused form)
        node.metadata_props[META_EFFECTIVE_MASK] = clva_mask.name
    else:
        node.replace_input_with(site.mask_index, clva_mask)
    for other in graph.all_nodes():
        if (other.metadata_props.get(META_MASK_ROLE) == "effective"
                and other.metadata_props.get(META_LAYER) == str(site.layer)):
            other.replace_input_with(0, clva_mask)


def _debug_zeros(b: Builder, attention_mask: ir.Value, heads: int) -> list[ir.Value]:
    false = ir.tensor(np.array([False]))
    shape_bk = b.op("Shape", [attention_mask], "batch_keys")
    batch = b.op("Shape", [attention_mask], "batch", start=0, end=1)
    shape_bh = b.op("Concat", [batch, b.const(np.array([heads], np.int64), "heads")], "batch_heads", axis=0)
    zk = [b.op("ConstantOfShape", [shape_bk], f"z{w}", value=false, dtype=BOOL) for w in ("pos", "neg")]
    zh = [b.op("ConstantOfShape", [shape_bh], f"{w}sensitive", value=false, dtype=BOOL) for w in ("", "in")]
    return zk + zh


def _anchor_branch(b: Builder, site_neg: AttentionSite, site_pos: AttentionSite, heads: int, base_f: ir.Value,
                   attention_mask, visual_mask, inputs_embeds, enable, params) -> dict[str, ir.Value]:
    """The `then` branch: steps 1-5 of METHODS.md for every row, masked by `active`.

        regions ─► t_rows [B,S], visual [B,K]
        probs(l) [B,H,R,K] ─MatMul(·, visual)─► [B,H,R,1] ─f64, mean over T rows─► Phi(l) [B,H]      eq. 1
        Phi ─► mu, sigma (population) ─► sensitive(l_pos) / insensitive(l_neg) [B,H]                eqs. 2-3
        probs(l)[:, :, last] ─f64─► mean over the head set ─► M [B,K] ─► z over V ─► Z [B,K]        eqs. 4, 8, 9
        Zpos, Zneg ─► w = max(0, 1 + alpha Zpos - beta Zneg) ─► bias = log w | -1e9  [B,K] fp32      eq. 10
        clva_mask = Where(active & T row [B,1,S,1], base + bias [B,1,1,K], base)                    eq. 11
    """
    r = build_regions(b, attention_mask, visual_mask, inputs_embeds)
    ax1 = b.const(np.array([1], np.int64), "axes_1")
    ax2 = b.const(np.array([2], np.int64), "axes_2")
    ax3 = b.const(np.array([3], np.int64), "axes_3")
    one_d = b.const(np.float64(1.0), "one_d")
    zero_d = b.const(np.float64(0.0), "zero_d")

    t_f = b.op("Cast", [r.t_rows], "t_rows_f", to=DOUBLE)  # [B,S]
    n_t = b.op("ReduceSum", [t_f, ax1], "t_count", keepdims=0)  # [B]
    active = b.op("And", [enable, b.op("Greater", [n_t, zero_d], "has_t_rows")], "active")  # [B]
    active_col = b.op("Unsqueeze", [active, ax1], "active_col")  # [B,1]
    vis_col = b.op("Unsqueeze", [b.op("Cast", [r.visual], "visual_f", to=FLOAT), b.const(np.array([1, 3], np.int64),
                                                                                         "axes_1_3")], "visual_col")
    n_t_col = b.op("Max", [b.op("Unsqueeze", [n_t, ax1], "t_count_col"), one_d], "t_count_safe")  # [B,1]
    vis_d = b.op("Cast", [r.visual], "visual_d", to=DOUBLE)  # [B,K]
    n_v = b.op("Max", [b.op("ReduceSum", [vis_d, ax1], "v_count", keepdims=1), one_d], "v_count_safe")  # [B,1]
    lam = b.op("Unsqueeze", [b.op("Cast", [params["lambda"]], "lambda_d", to=DOUBLE), ax1], "lambda_col")
    tau = b.op("Unsqueeze", [b.op("Cast", [params["tau"]], "tau_d", to=DOUBLE), ax1], "tau_col")

    rows_from = None
    if site_neg.form in RECOMPUTED:
        # Rows before the first T row of the batch cannot be T rows of any row: skip them in the recomputation.
        lowest = b.op("ReduceMin", [r.last_image], "first_t_row", keepdims=0)
        past = b.op("Sub", [r.total_len, r.seq_len], "past_len")
        first = b.op("Sub", [b.op("Add", [lowest, b.const(np.int64(1), "one_i")], "first_t_row"), past], "first_t_row")
        last = b.op("Sub", [r.seq_len, b.const(np.int64(1), "one_i")], "last_row")
        first = b.op("Min", [b.op("Max", [first, b.const(np.int64(0), "zero_i")], "first_t_row"), last], "first_t_row")
        rows_from = b.op("Unsqueeze", [first, b.const(np.array([0], np.int64), "axes_0")], "rows_from")  # [1]
        t_rows_r = slice_axis(b, r.t_rows, rows_from, 1, "t_rows_r")
        mask_r = slice_axis(b, base_f, rows_from, 2, "mask_r")
        t_f = b.op("Cast", [t_rows_r], "t_rows_r_f", to=DOUBLE)
        past_1d = b.op("Unsqueeze", [past, b.const(np.array([0], np.int64), "axes_0")], "past_len")  # [1] P

    def probs_of(site: AttentionSite, tag: str) -> ir.Value:
        if site.form not in RECOMPUTED:
            return site.probs  # [B,H,S,K], unedited (drift layers come later)
        sb = b.child(f"recompute_layer{site.layer}", same_graph=True)
        q_rows = query_rows(sb, site, rows_from, "q_rows")
        logits = site_logits(sb, site, q_rows, past_1d)  # [B, H, R, K]
        p = sb.op("Softmax", [sb.op("Add", [logits, mask_r], "masked")], "probs", axis=-1)
        if site.form == GQA:  # its mask is finite (fuse_attention.py): no fully masked row, no NaN to guard
            return p
        return sb.op("Where", [sb.op("IsNaN", [p], "probs"), sb.const(np.float32(0.0), "zero_f"), p], "probs")

    t_rows_d = b.op("Unsqueeze", [t_f, ax1], "t_rows_d")  # [B,1,R]

    def phi_of(probs: ir.Value, tag: str) -> ir.Value:
        on_v = b.op("MatMul", [probs, vis_col], f"{tag}/visual_mass")  # [B,H,R,1] fp32
        on_v = b.op("Cast", [b.op("Squeeze", [on_v, ax3], f"{tag}/visual_mass")], f"{tag}/visual_mass", to=DOUBLE)
        total = b.op("ReduceSum", [b.op("Mul", [on_v, t_rows_d], f"{tag}/t_mass"), ax2], f"{tag}/t_mass", keepdims=0)
        return b.op("Div", [total, n_t_col], f"{tag}/phi")  # [B,H]  eq. 1

    def head_set(phi: ir.Value, tag: str, sensitive: bool) -> ir.Value:
        return select_head_set(b, phi, lam, active_col, tag, sensitive)

    def anchor(probs: ir.Value, heads_set: ir.Value, tag: str) -> ir.Value:
        last = b.op("Gather", [probs, b.const(np.int64(-1), "last")], f"{tag}/last_row", axis=2)  # [B,H,K]
        last = b.op("Cast", [last], f"{tag}/last_row", to=DOUBLE)
        h_d = b.op("Cast", [heads_set], f"{tag}/heads_d", to=DOUBLE)  # [B,H]
        n_h = b.op("ReduceSum", [h_d, ax1], f"{tag}/head_count", keepdims=1)  # [B,1]
        summed = b.op("MatMul", [b.op("Unsqueeze", [h_d, ax1], f"{tag}/heads_row"), last], f"{tag}/m")  # [B,1,K]
        m = b.op("Div", [b.op("Squeeze", [summed, ax1], f"{tag}/m"), b.op("Max", [n_h, one_d], f"{tag}/m")],
                 f"{tag}/m")  # [B,K]  eq. 4
        return zscore_mask(b, m, n_h, vis_d, r.visual, n_v, tau, tag)

    probs_neg = probs_of(site_neg, "neg")
    probs_pos = probs_neg if site_pos is site_neg else probs_of(site_pos, "pos")
    insensitive = head_set(phi_of(probs_neg, "neg"), "neg", sensitive=False)
    sensitive = head_set(phi_of(probs_pos, "pos"), "pos", sensitive=True)
    zneg = anchor(probs_neg, insensitive, "neg")
    zpos = anchor(probs_pos, sensitive, "pos")

    bias = weight_bias(b, zpos, zneg, params["alpha"], params["beta"])  # [B,K]
    bias = b.op("Unsqueeze", [bias, b.const(np.array([1, 2], np.int64), "axes_1_2")], "bias")  # [B,1,1,K]
    rows = b.op("And", [r.t_rows, active_col], "rows")  # [B,S]
    rows = b.op("Unsqueeze", [rows, b.const(np.array([1, 3], np.int64), "axes_1_3")], "rows")  # [B,1,S,1]
    mask = b.op("Where", [rows, b.op("Add", [base_f, bias], "biased"), base_f], "mask", dtype=FLOAT)  # [B,1,S,K]
    return {"mask": mask, "zpos": zpos, "zneg": zneg, "sensitive": sensitive, "insensitive": insensitive}


# -- pieces shared with graph_passes/clva_qformer.py (CLVA inside InstructBLIP's Q-Former) ----------------------------

def select_head_set(b: Builder, phi: ir.Value, lam: ir.Value, active_col: ir.Value, tag: str,
                    sensitive: bool) -> ir.Value:
    """Eqs. 2-3: phi [B,H] float64, lam [B,1] float64 -> sensitive (Phi > mu + lam sigma) or insensitive
    (Phi < mu - lam sigma) heads [B,H] bool, population sigma, none when all Phi are equal, none on inactive rows."""
    ax1 = b.const(np.array([1], np.int64), "axes_1")
    mu = b.op("ReduceMean", [phi, ax1], f"{tag}/mu", keepdims=1)  # [B,1]
    dev = b.op("Sub", [phi, mu], f"{tag}/dev")
    sigma = b.op("Sqrt", [b.op("ReduceMean", [b.op("Mul", [dev, dev], f"{tag}/var"), ax1], f"{tag}/var",
                                              keepdims=1)], f"{tag}/sigma")
    spread = b.op("Greater", [reduce_extreme(b, phi, 1, f"{tag}/max"),
                              reduce_extreme(b, phi, 1, f"{tag}/min", largest=False)], f"{tag}/spread")
    width = b.op("Mul", [lam, sigma], f"{tag}/width")
    if sensitive:
        chosen = b.op("Greater", [phi, b.op("Add", [mu, width], f"{tag}/threshold")], f"{tag}/heads")  # eq. 2
    else:
        chosen = b.op("Less", [phi, b.op("Sub", [mu, width], f"{tag}/threshold")], f"{tag}/heads")  # eq. 3
    return b.op("And", [b.op("And", [chosen, spread], f"{tag}/heads"), active_col], f"{tag}/heads")  # [B,H]


def zscore_mask(b: Builder, m: ir.Value, n_h: ir.Value, vis_d: ir.Value, visual: ir.Value, n_v: ir.Value,
                tau: ir.Value, tag: str) -> ir.Value:
    """Eqs. 8-9: the anchor map m [B,K] float64 over the V keys (vis_d [B|1,K] float64 0/1, visual the same as
    bool, n_v [B|1,1] their count >= 1) -> Z [B,K] bool = z > tau on V; all False when the head set is empty
    (n_h [B,1] == 0)."""
    ax1 = b.const(np.array([1], np.int64), "axes_1")
    zero_d = b.const(np.float64(0.0), "zero_d")
    mean = b.op("Div", [b.op("ReduceSum", [b.op("Mul", [m, vis_d], f"{tag}/mean"), ax1], f"{tag}/mean",
                             keepdims=1), n_v], f"{tag}/mean")
    centred = b.op("Sub", [m, mean], f"{tag}/centred")
    dev = b.op("Mul", [centred, vis_d], f"{tag}/dev")
    std = b.op("Sqrt", [b.op("Div", [b.op("ReduceSum", [b.op("Mul", [dev, dev], f"{tag}/var"), ax1],
                                                f"{tag}/var", keepdims=1), n_v], f"{tag}/var")], f"{tag}/std")
    z = b.op("Div", [centred, b.op("Add", [std, b.const(np.float64(Z_EPS), "z_eps")], f"{tag}/std_eps")],
             f"{tag}/z")  # eq. 8
    marked = b.op("And", [b.op("Greater", [z, tau], f"{tag}/z_mask"), visual], f"{tag}/z_mask")  # eq. 9
    return b.op("And", [marked, b.op("Greater", [n_h, zero_d], f"{tag}/non_empty")], f"{tag}/z_mask")  # [B,K]


def weight_bias(b: Builder, zpos: ir.Value, zneg: ir.Value, alpha: ir.Value, beta: ir.Value) -> ir.Value:
    """Eq. 10 in fp32 (as the attention runs) and its log as an additive bias: zpos, zneg [B,K] bool, alpha, beta
    [B] float32 -> log w [B,K] float32, LOG_ZERO where w = 0, exactly 0.0 where w = 1."""
    ax1 = b.const(np.array([1], np.int64), "axes_1")
    zpos_f = b.op("Cast", [zpos], "zpos_f", to=FLOAT)
    zneg_f = b.op("Cast", [zneg], "zneg_f", to=FLOAT)
    alpha = b.op("Unsqueeze", [alpha, ax1], "alpha_col")
    beta = b.op("Unsqueeze", [beta, ax1], "beta_col")
    w = b.op("Add", [b.const(np.float32(1.0), "one_f"), b.op("Mul", [alpha, zpos_f], "boost")], "w")
    w = b.op("Max", [b.op("Sub", [w, b.op("Mul", [beta, zneg_f], "suppress")], "w"), b.const(np.float32(0.0),
                                                                                               "zero_f")], "w")
    positive = b.op("Greater", [w, b.const(np.float32(0.0), "zero_f")], "w_positive")
    log_w = b.op("Log", [b.op("Where", [positive, w, b.const(np.float32(1.0), "one_f")], "w_safe")], "log_w")
    return b.op("Where", [positive, log_w, b.const(np.float32(LOG_ZERO), "log_zero")], "bias")  # [B,K]
