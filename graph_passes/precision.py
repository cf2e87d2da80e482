"""fp16 conversion of an AnchorRT graph that keeps the numerically sensitive parts in fp32 (issue 6).

Which nodes run in fp16 ("half") is decided per node, on the exporter's graph as the mitigation passes left it:

    activation sources: the graph inputs named to become fp16 (decoder: inputs_embeds, past_key_values.*;
                        vision: pixel_values; embed: image_features) and every float weight (an initializer of
                        rank >= 2: projections, MLP, lm_head, embedding tables)
    half  = nodes reached from a source through float values, except the kept set below
    kept (fp32):
      - attention, opset 18:  Add(q kᵀ, mask [+ CLVA's log w]) ─► Softmax ─► IsNaN/Where       (FIELD-NOTES: an
                                                                                               fp16 bias costs ~1e-3)
      - attention, opset 23:  an `Attention` op whose mask is float (CLVA rewired it to mask + log w); a bool mask
                              keeps the op in fp16 (ONNX Runtime adds 0/-inf itself)
      NOT kept: the fused form's `GroupQueryAttention` runs in fp16 with its KV buffers (ONNX Runtime's CUDA kernel
      exists for fp16/bf16 only, and its `attention_bias` must have the op's type): the bias (mask, CLVA's log w,
      SEVI's edit; computed in fp32) is clipped to ±65504 before its Cast, so the mask's float32 minimum stays
      finite (an -inf bias would give a fully padded row NaN, and NaN keys/values poison every row through 0·NaN)
      - every node a mitigation pass added (no torch module scopes: CLVA's anchors and z-scores, SEVI's last-row
        logit edit, the attention probe, the shared float mask, VisAlign's fusion) and everything inside an `If`
      - normalisations: RMSNorm/LayerNorm (the decomposed Pow/ReduceMean/Sqrt chain or the fused op), computed in
        fp32 with Casts around
      - what no source reaches: the causal/padding mask built from `attention_mask`, the rotary cos/sin tables
        built from `position_ids` (cast to fp16 where the half graph reads them)

    value edges:  fp32 producer ─► half consumer:  Cast(to fp16)   (one per value; constants are converted instead)
                  half producer ─► fp32 consumer:  Cast(to fp32)   (an outer value read inside an If branch is cast
                                                                    inside that branch, so flags off pay nothing:
                                                                    the fp16 KV cache read by a mitigation branch)
    graph outputs: the ones named fp16 (present.*) become fp16; every other float output (logits, probe, debug)
                   stays fp32 through a Cast, so the runtime's sampler and the mitigation outputs are unchanged

The mitigation run-time inputs (`clva.*`, `sevi.*`, `visalign.v_bar`, ...) keep their declared dtypes. Written
from the ONNX operator specification (Cast, ConstantOfShape, Constant and the type constraints of the ops
involved); no converter's code was used. No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.attention_match import GQA, GQA_BIAS_INDEX, RECOMPUTED, match_attention
from anchorrt.graph_passes.base import GraphPass, PassError
from anchorrt.graph_passes.naming import SCOPES_KEY
from anchorrt.graph_passes.shapes import annotate_missing

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

# Inputs that the ONNX spec types as float32 whatever the data type (they are never converted).
_FLOAT32_ONLY_INPUTS = {("Resize", 1), ("Resize", 2)}
# Norm module scopes: LLaMA `input_layernorm`, `post_attention_layernorm`, `norm`; CLIP `layer_norm1/2`,
# `pre_layrnorm` (sic, transformers' name), `post_layernorm`.
_NORM_SCOPE = re.compile(r"/(?:[\w.]*_)?(?:layer_?norm\d*|layrnorm|norm)(?:/|$)")
_NORM_OPS = {"RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization"}  # the last keeps the residual sum it returns in fp32 too
# Scopes of the nodes the mitigation passes add (names from graph_passes/*: Builder scopes and debug Identities).
_MITIGATION_NAME = re.compile(r"^/(?:model/(?:clva|sevi|probe|attn_mask)|debug|visalign)/|/attn/sevi/")

# Which graph inputs/outputs become fp16 in each role (everything else keeps its declared dtype).
DEFAULT_IO = {
    "decoder": ({"inputs_embeds", "past_key_values.*"}, {"present.*"}),
    "vision": ({"pixel_values"}, {"image_features"}),
    "embed": ({"image_features"}, {"inputs_embeds"}),
}


def is_mitigation_node(node: ir.Node, main: ir.Graph) -> bool:
    """A node a mitigation pass added (or one inside a branch): never converted, never quantized."""
    if node.graph is not main or node.op_type == "If":
        return True
    return SCOPES_KEY not in node.metadata_props and bool(_MITIGATION_NAME.search(node.name or ""))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if p.endswith("*") and name.startswith(p[:-1]) or name == p:
            return True
    return False


def _is_norm(node: ir.Node) -> bool:
    return node.op_type in _NORM_OPS or bool(_NORM_SCOPE.search(node.name or ""))


def _infer_missing_dtypes(graph: ir.Graph) -> None:
    """torch.onnx leaves some value types unset (e.g. the Cos/Sin of the opset-23 rotary): elementwise ops take
    their first typed input's dtype, Cast its `to`, shape ops int64."""
    for node in graph:
        for out in node.outputs:
            if out.dtype is not None:
                continue
            if node.op_type == "Cast":
                out.dtype = ir.DataType(node.attributes["to"].value)
            elif node.op_type in ("Shape", "Size"):
                out.dtype = ir.DataType.INT64
            else:
                typed = next((v.dtype for v in node.inputs if v is not None and v.dtype is not None), None)
                if typed is not None:
                    out.dtype = typed


def _kept_attention_nodes(graph: ir.Graph) -> set[ir.Node]:
    """The attention nodes that stay fp32 (see the module docstring)."""
    kept: set[ir.Node] = set()
    for site in match_attention(graph):
        if site.form == GQA:  # runs in fp16, its bias clipped (see the module docstring)
            continue
        if site.form in RECOMPUTED:
            if site.mask.dtype == FLOAT:
                kept.add(site.anchor)
            continue
        kept.update((site.mask_node, site.anchor))
        probs = site.probs.producer()
        if probs is not None and probs is not site.anchor:  # the NaN guard: IsNaN + Where
            kept.add(probs)
            kept.update(n for n in (probs.inputs[0].producer(),) if n is not None)
    return kept


def _to_fp16_array(array: np.ndarray, what: str) -> np.ndarray:
    finite = array[np.isfinite(array)]
    if finite.size and float(np.abs(finite).max()) > FP16_MAX:
        raise PassError(f"{what} has values up to {float(np.abs(finite).max()):.3g}, beyond fp16's {FP16_MAX:g}; "
                        "keep this model in fp32 (drop --precision fp16)")
    return array.astype(np.float16)


class Fp16Pass(GraphPass):
    """Convert one graph (role: decoder, vision or embed) to fp16 as above; count = nodes now running in fp16.

    `fp16_inputs` / `fp16_outputs`: graph input/output names (a trailing `*` is a prefix) that become fp16;
    default: DEFAULT_IO[role]. After `call`, `kept` lists the nodes reached by the half graph but kept fp32
    (name -> reason), `casts` the number of Casts added."""

    name = "fp16"

    def __init__(self, role: str = "decoder", fp16_inputs: Iterable[str] | None = None,
                 fp16_outputs: Iterable[str] | None = None):
        super().__init__()
        if role not in DEFAULT_IO:
            raise PassError(f"unknown graph role '{role}'; known: {', '.join(DEFAULT_IO)}")
        self.role = role
        default_in, default_out = DEFAULT_IO[role]
        self.fp16_inputs = set(default_in if fp16_inputs is None else fp16_inputs)
        self.fp16_outputs = set(default_out if fp16_outputs is None else fp16_outputs)
        self.kept: dict[str, str] = {}
        self.casts = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if any(v.dtype == FLOAT16 for v in graph.inputs) or any(
                v.dtype == FLOAT16 for v in graph.initializers.values()):
            raise PassError(f"the {self.role} graph already has fp16 inputs or weights; it was converted before "
                            "(or exported with torch in fp16): convert an fp32 export")
        _infer_missing_dtypes(graph)
        original = {}  # value -> dtype before the pass (only floats matter)

        def remember(v: ir.Value | None) -> None:
            if v is not None and v not in original:
                original[v] = v.dtype

        for v in list(graph.inputs) + list(graph.initializers.values()):
            remember(v)
        for node in graph.all_nodes():
            for v in list(node.inputs) + list(node.outputs):
                remember(v)

        half = self._half_nodes(graph)
        if not half:
            self.count = 0
            return ir.passes.PassResult(model, modified=False)
        for v in graph.inputs:
            if v.dtype == FLOAT and _matches(v.name, self.fp16_inputs):
                v.dtype = FLOAT16
        for node in half:
            self._convert_node(node)
        self._convert_weights(graph, half)
        self._fix_edges(graph, half, original)
        self._fix_outputs(graph, original)
        graph.sort()
        self.count = len(half)
        annotate_missing(model)  # every value this pass created gets a type and shape
        return ir.passes.PassResult(model, modified=True)

    # -- which nodes ------------------------------------------------------------------------------------------
    def _half_nodes(self, graph: ir.Graph) -> set[ir.Node]:
        sources = {v for v in graph.inputs if v.dtype == FLOAT and _matches(v.name, self.fp16_inputs)}
        sources |= {v for v in graph.initializers.values()
                    if v.dtype == FLOAT and v.const_value is not None and len(v.const_value.shape) >= 2}
        kept_attention = _kept_attention_nodes(graph) if self.role == "decoder" else set()
        reached: set[ir.Value] = set(sources)
        half: set[ir.Node] = set()
        for node in graph:  # topological order
            if not any(v in reached for v in node.inputs if v is not None and v.dtype == FLOAT):
                continue
            reason = ("mitigation" if is_mitigation_node(node, graph) else
                      "attention softmax / mask" if node in kept_attention else
                      "normalisation" if _is_norm(node) else "")
            if reason:
                self.kept[node.name] = reason
            else:
                half.add(node)
            reached.update(out for out in node.outputs if out.dtype == FLOAT)  # kept nodes still carry activations
        return half

    # -- rewriting --------------------------------------------------------------------------------------------
    @staticmethod
    def _convert_node(node: ir.Node) -> None:
        if node.op_type == "Cast" and node.attributes["to"].value == FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", FLOAT16)
        elif node.op_type in ("ConstantOfShape", "Constant") and "value" in node.attributes:
            t = node.attributes["value"].value
            if t.dtype == FLOAT:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_to_fp16_array(t.numpy(), node.name)))
        for out in node.outputs:
            if out.dtype == FLOAT:
                out.dtype = FLOAT16

    @staticmethod
    def _wants_fp16(node: ir.Node, index: int, half: set[ir.Node]) -> bool:
        return node in half and (node.op_type, index) not in _FLOAT32_ONLY_INPUTS

    def _convert_weights(self, graph: ir.Graph, half: set[ir.Node]) -> None:
        """Float initializers read only by half nodes become fp16 in place (shared ones get a copy later)."""
        for v in list(graph.initializers.values()):
            uses = list(v.uses())
            if v.dtype != FLOAT or v.const_value is None or not uses or v.is_graph_output():
                continue
            if all(self._wants_fp16(u.node, u.idx, half) for u in uses):
                v.const_value = ir.tensor(_to_fp16_array(v.const_value.numpy(), f"weight '{v.name}'"), name=v.name)
                v.dtype = FLOAT16

    def _fix_edges(self, graph: ir.Graph, half: set[ir.Node], original: dict) -> None:
        made: dict[tuple, ir.Value] = {}
        for node in list(graph.all_nodes()):
            for i, v in enumerate(node.inputs):
                if v is None or original.get(v) != FLOAT:
                    continue
                want = FLOAT16 if self._wants_fp16(node, i, half) else FLOAT
                if v.dtype == want:
                    continue
                clip = want == FLOAT16 and node.op_type == "GroupQueryAttention" and i == GQA_BIAS_INDEX
                # an outer value read inside a branch is cast there (the branch runs only when its flag is on)
                local = node.graph if node.graph is not graph and not v.is_initializer() else None
                key = (v, want, clip, local)
                if key not in made:
                    made[key] = self._cast(graph, v, want, clip=clip, before=node if local is not None else None)
                node.replace_input_with(i, made[key])

    def _cast(self, graph: ir.Graph, v: ir.Value, to: ir.DataType, clip: bool = False,
              before: ir.Node | None = None) -> ir.Value:
        """`v` in dtype `to`: a converted copy of a constant, else a Cast placed after `v`'s producer (first in the
        main graph for a graph input) or, with `before`, just before that node in its own graph; `clip` first clips
        to fp16's finite range (Clip, fp32)."""
        suffix = "fp16" if to == FLOAT16 else "fp32"
        if v.is_initializer() and v.const_value is not None:  # a copy of the constant in the wanted dtype
            array = v.const_value.numpy()
            if clip:
                array = np.clip(array, -FP16_MAX, FP16_MAX)
            array = _to_fp16_array(array, f"weight '{v.name}'") if to == FLOAT16 else array.astype(np.float32)
            name = f"{v.name}/{suffix}"
            copy = ir.Value(name=name, type=ir.TensorType(to), shape=v.shape, const_value=ir.tensor(array, name=name))
            graph.register_initializer(copy)
            return copy
        producer = v.producer()
        name = f"/precision/{(v.name or 'value').strip('/')}/Cast_{suffix}"
        if before is not None:
            name += f"/in_{(before.name or 'branch').strip('/')}"
        nodes = []
        src = v
        if clip:
            nodes.append(ir.Node("", "Clip", [v, *self._fp16_bounds(graph)], name=f"{name}/Clip"))
            src = nodes[-1].outputs[0]
            src.name, src.dtype, src.shape = f"{name}/Clip_output_0", FLOAT, v.shape
        cast = ir.Node("", "Cast", [src], attributes=[ir.AttrInt64("to", to)], name=name)
        nodes.append(cast)
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = f"{name}_output_0", to, v.shape
        if before is not None:
            before.graph.insert_before(before, nodes)
        elif producer is not None and producer.graph is not None:
            producer.graph.insert_after(producer, nodes)
        elif graph.num_nodes():  # a graph input: first in the main graph
            graph.insert_before(graph.node(0), nodes)
        else:
            graph.extend(nodes)
        self.casts += 1
        return out

    @staticmethod
    def _fp16_bounds(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
        """fp16's finite range as two fp32 scalar initializers of `graph`, registered once and shared."""
        names = ("/precision/fp16_min", "/precision/fp16_max")
        if names[0] not in graph.initializers:
            for name, bound in zip(names, (-FP16_MAX, FP16_MAX)):
                graph.register_initializer(ir.Value(name=name, type=ir.TensorType(FLOAT), shape=ir.Shape([]),
                                                    const_value=ir.tensor(np.array(bound, np.float32), name=name)))
        return graph.initializers[names[0]], graph.initializers[names[1]]

    def _fix_outputs(self, graph: ir.Graph, original: dict) -> None:
        for k, v in enumerate(list(graph.outputs)):
            if original.get(v) != FLOAT:
                continue
            want = FLOAT16 if _matches(v.name, self.fp16_outputs) else FLOAT
            if v.dtype == want:
                continue
            name = v.name
            v.name = f"{name}/{'fp16' if v.dtype == FLOAT16 else 'fp32'}"
            cast = ir.Node("", "Cast", [v], attributes=[ir.AttrInt64("to", want)], name=f"/precision/{name}/Cast")
            out = cast.outputs[0]
            out.name, out.dtype, out.shape = name, want, v.shape
            graph.append(cast)
            graph.outputs[k] = out
            self.casts += 1

    def record(self) -> dict:
        reasons: dict[str, int] = {}
        for r in self.kept.values():
            reasons[r] = reasons.get(r, 0) + 1
        return {"graph": self.role, "fp16_nodes": self.count, "casts": self.casts,
                "kept_fp32": {"count": len(self.kept), "by_reason": reasons, "nodes": sorted(self.kept)}}
