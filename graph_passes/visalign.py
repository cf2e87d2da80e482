"""VisAlign's fusion baked into an exported `embed` graph, behind a run-time flag (no torch).

VisAlign (`papers/visalign-refining-textual-embeddings.txt`; METHODS.md section VisAlign) refines every text
token embedding with the mean of the request's projected visual tokens:

    e'_t = W [e_t ; v_bar] + b          W: d x 2d (e_t first), b: d
    v_bar = mean of the request's projected visual tokens (all of its images)

Image positions keep the projected visual embeddings. `W [e ; v] = W_e e + W_v v` with `W = [W_e | W_v]`, so
the graph applies `W_e` per token and `W_v v_bar + b` once per row, which is the same function without
materialising the concatenation (and without repeating v_bar S times).

The pass rewrites the `inputs_embeds` output of the embed graph:

    image_mask [B,S] ──Not──► is_text [B,S] ──────────────┐
    visalign.enable [B] ──Unsqueeze(1)──► [B,1] ─────────And──► [B,S] ──Unsqueeze(-1)──► fuse_here [B,S,1] ──┐
                                                                                                           │
    e (base inputs_embeds) [B,S,d] ──MatMul(W_eᵀ)──► [B,S,d] ──Add──► fused [B,S,d] ────────────────► Where ──► inputs_embeds
    visalign.v_bar [B,d] ──MatMul(W_vᵀ)──Add(b)──Unsqueeze(1)──► [B,1,d] ──┘                              ▲ (else)
    e ─────────────────────────────────────────────────────────────────────────────────────────────────────┘

- `visalign.enable` [batch] bool: per-row flag. Off selects `e` through `Where`, so the base embeddings come
  out bit for bit (a multiply-by-zero blend would not survive inf/nan and costs a rounding).
- `visalign.v_bar` [batch, d]: the request's v_bar. It is an input, not computed in the graph, because decode
  steps carry no image features (`image_mask` is all false there): the runtime computes it once per request
  from the prefill's image features (`runtime/visalign.py`) and feeds the same array to the prefill and to
  every decode step, which is what teacher-forced training sees (one v_bar for the whole sequence).

Weights come from `visalign.safetensors` (`visalign.weight` [d, 2d], `visalign.bias` [d], the layout of
`torch.nn.Linear(2d, d)`), read with `safetensors.numpy` (numpy only). They are cast to the graph's float type.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.base import GraphPass, PassError
from anchorrt.graph_passes.pipeline import has_external_data, save_model
from anchorrt.graph_passes.shapes import annotate_missing
from anchorrt.runtime.errors import ArtifactError, CheckpointError

PASS_NAME = "visalign"
WEIGHTS_FILE = "visalign.safetensors"
WEIGHT_KEY = "visalign.weight"  # [d, 2d]: columns 0..d-1 act on e_t, d..2d-1 on v_bar
BIAS_KEY = "visalign.bias"  # [d]
ENABLE_INPUT = "visalign.enable"
V_BAR_INPUT = "visalign.v_bar"
EMBEDS_OUTPUT = "inputs_embeds"
IMAGE_MASK_INPUT = "image_mask"
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


# -- the weights file ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusionWeights:
    weight: np.ndarray  # [d, 2d] float32
    bias: np.ndarray  # [d] float32
    sha256: str = ""
    source: str = ""

    @property
    def hidden_size(self) -> int:
        return int(self.bias.shape[0])


def read_fusion_weights(path: str | Path, hidden_size: int | None = None) -> FusionWeights:
    """Read and check `visalign.safetensors`. Every problem is a one-line CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"VisAlign weights '{path}' do not exist; train them with `anchorrt visalign train`")
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise CheckpointError("reading VisAlign weights needs the safetensors package: `pip install safetensors`") from None
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own untyped errors on a corrupt header
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"VisAlign weights '{path.name}' are unreadable ({first}); re-train or re-copy them") from None
    missing = [k for k in (WEIGHT_KEY, BIAS_KEY) if k not in tensors]
    if missing:
        raise CheckpointError(f"VisAlign weights '{path.name}' lack {', '.join(missing)} (found {', '.join(sorted(tensors)) or 'nothing'})")
    weight, bias = tensors[WEIGHT_KEY], tensors[BIAS_KEY]
    d = bias.shape[0] if bias.ndim == 1 else -1
    if bias.ndim != 1 or weight.shape != (d, 2 * d):
        raise CheckpointError(f"VisAlign weights '{path.name}' have shapes {list(weight.shape)} and {list(bias.shape)}; "
                              "expected [d, 2d] and [d]")
    if hidden_size is not None and d != hidden_size:
        raise CheckpointError(f"VisAlign weights '{path.name}' are for hidden size {d} but the model's is {hidden_size}; "
                              "they were trained for another model")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise CheckpointError(f"VisAlign weights '{path.name}' contain inf or nan; the training diverged")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return FusionWeights(weight.astype(np.float32), bias.astype(np.float32), digest, path.name)


# -- the pass --------------------------------------------------------------------------------------------------------
class VisAlignPass(GraphPass):
    """Add the fusion to an embed graph. `count` is 1 when the graph was rewritten, 0 (with `reason`) when not."""

    name = PASS_NAME

    def __init__(self, weights: FusionWeights):
        super().__init__()
        self.weights = weights
        self.reason = ""

    def check(self, graph: ir.Graph) -> str:
        """'' when the graph is an embed graph this pass can rewrite, else why not."""
        inputs = {v.name: v for v in graph.inputs}
        outputs = [v for v in graph.outputs if v.name == EMBEDS_OUTPUT]
        if ENABLE_INPUT in inputs or V_BAR_INPUT in inputs:
            return f"the graph already has {ENABLE_INPUT}: VisAlign is baked in"
        if len(outputs) != 1:
            return f"no '{EMBEDS_OUTPUT}' output: not an embed graph"
        if IMAGE_MASK_INPUT not in inputs or inputs[IMAGE_MASK_INPUT].dtype != ir.DataType.BOOL:
            return f"no bool '{IMAGE_MASK_INPUT}' input: the graph cannot tell image positions from text"
        embeds = outputs[0]
        if embeds.dtype not in _FLOAT_TYPES:
            return f"'{EMBEDS_OUTPUT}' is {embeds.dtype}, not float32 or float16"
        if embeds.shape is None or len(embeds.shape) != 3:
            return f"'{EMBEDS_OUTPUT}' has no [batch, sequence, hidden] shape"
        d = embeds.shape[2]
        if not isinstance(d, int) or d != self.weights.hidden_size:
            return f"'{EMBEDS_OUTPUT}' has hidden size {d}, the VisAlign weights {self.weights.hidden_size}"
        return ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.reason = self.check(graph)
        if self.reason:
            self.count = 0
            return ir.passes.PassResult(model, modified=False)
        self._rewrite(graph)
        self.count = 1
        annotate_missing(model)  # every value this pass created gets a type and shape
        return ir.passes.PassResult(model, modified=True)

    def _rewrite(self, graph: ir.Graph) -> None:
        base = next(v for v in graph.outputs if v.name == EMBEDS_OUTPUT)
        image_mask = next(v for v in graph.inputs if v.name == IMAGE_MASK_INPUT)
        dtype, d = base.dtype, self.weights.hidden_size
        batch = base.shape[0]
        np_dtype = np.float16 if dtype == ir.DataType.FLOAT16 else np.float32
        w = self.weights.weight

        def const(name: str, array: np.ndarray) -> ir.Value:
            tensor = ir.tensor(array, name=name)
            value = ir.val(name, tensor.dtype, ir.Shape(array.shape), const_value=tensor)
            graph.register_initializer(value)
            return value

        w_text = const("visalign.weight_text_T", np.ascontiguousarray(w[:, :d].T).astype(np_dtype))  # [d, d]
        w_visual = const("visalign.weight_visual_T", np.ascontiguousarray(w[:, d:].T).astype(np_dtype))  # [d, d]
        bias = const("visalign.bias", self.weights.bias.astype(np_dtype))  # [d]
        axis1 = const("visalign.axes_1", np.array([1], dtype=np.int64))
        axis_last = const("visalign.axes_last", np.array([-1], dtype=np.int64))

        enable = ir.val(ENABLE_INPUT, ir.DataType.BOOL, [batch])
        v_bar = ir.val(V_BAR_INPUT, dtype, [batch, d])
        graph.inputs.extend([enable, v_bar])

        nodes: list[ir.Node] = []

        def op(what: str, op_type: str, *inputs: ir.Value) -> ir.Value:
            node = ir.node(op_type, list(inputs), name=f"/visalign/{what}/{op_type}")
            node.outputs[0].name = f"/visalign/{what}/{op_type}_output_0"
            nodes.append(node)
            return node.outputs[0]

        # which positions are fused: text positions of enabled rows
        is_text = op("is_text", "Not", image_mask)  # [B, S]
        row_on = op("enable", "Unsqueeze", enable, axis1)  # [B, 1]
        fuse_here = op("fuse_here", "Unsqueeze", op("fuse_here", "And", is_text, row_on), axis_last)  # [B, S, 1]
        # W [e ; v_bar] + b = W_e e + (W_v v_bar + b): the visual half once per row
        text_part = op("text", "MatMul", base, w_text)  # [B, S, d]
        visual_part = op("visual", "Add", op("visual", "MatMul", v_bar, w_visual), bias)  # [B, d]
        visual_part = op("visual", "Unsqueeze", visual_part, axis1)  # [B, 1, d]
        fused = op("fused", "Add", text_part, visual_part)  # [B, S, d]
        out = op("select", "Where", fuse_here, fused, base)  # [B, S, d]

        for v in (is_text, row_on, fuse_here):
            v.dtype = ir.DataType.BOOL
        for v in (text_part, visual_part, fused, out):
            v.dtype = dtype
        out.shape = ir.Shape(list(base.shape))
        graph.extend(nodes)
        index = next(i for i, v in enumerate(graph.outputs) if v is base)
        base.name = "/visalign/base_inputs_embeds"
        out.name = EMBEDS_OUTPUT
        graph.outputs[index] = out


def apply_visalign(model: ir.Model | str | Path, weights: FusionWeights | str | Path,
                   out_path: str | Path | None = None) -> int:
    """Bake the fusion into an embed graph (an ir.Model, changed in place, or an .onnx path, rewritten in place
    or saved to `out_path`). Returns the number of fusions added (1); a graph that does not fit fails loudly."""
    fusion = weights if isinstance(weights, FusionWeights) else read_fusion_weights(weights)
    path = None if isinstance(model, ir.Model) else Path(model)
    ir_model = model if path is None else ir.load(str(path))
    visalign = VisAlignPass(fusion)
    visalign(ir_model)
    if visalign.count != 1:
        where = f" '{path.name}'" if path is not None else ""
        raise PassError(f"cannot add VisAlign to the embed graph{where}: {visalign.reason}")
    if path is not None or out_path is not None:
        target = Path(out_path) if out_path is not None else path
        # a new file renamed over the target (never written in place); weights stay external if they were
        external = f"{target.name}.data" if has_external_data(path if path is not None else target) else None
        save_model(ir_model, target, external)
    return visalign.count


# -- the manifest ---------------------------------------------------------------------------------------------------
def describe_inputs(model: ir.Model) -> list[dict]:
    """Graph inputs in the manifest's format (as `anchorrt.exporter.export.graph_io` writes them)."""
    out = []
    for v in model.graph.inputs:
        dims = [d.value if isinstance(d, ir.SymbolicDim) else int(d) for d in (v.shape or [])]
        out.append({"name": v.name, "dtype": np.dtype(v.dtype.numpy()).name, "shape": dims})
    return out


def record_visalign(manifest: dict, weights: FusionWeights, embed_model: ir.Model, *, enabled_by_default: bool = True,
                    origin: str = "export") -> dict:
    """Write the `mitigation.visalign` section, refresh the embed graph's inputs and add a `passes` entry.

    `manifest` is the manifest dict (changed in place and returned); the caller writes it (file hashes)."""
    d = weights.hidden_size
    v_bar = next((v for v in embed_model.graph.inputs if v.name == V_BAR_INPUT), None)
    if v_bar is None:
        raise PassError(f"the embed graph has no {V_BAR_INPUT} input: run VisAlignPass on it first")
    manifest.setdefault("mitigation", {})["visalign"] = {
        "method": "VisAlign (visually refined text embeddings), METHODS.md section VisAlign",
        "graph": "embed",
        "inputs": {
            ENABLE_INPUT: {"dtype": "bool", "shape": ["batch"], "default": enabled_by_default,
                           "meaning": "per row: true fuses the text embeddings with v_bar; false gives the base "
                                      "embeddings exactly"},
            V_BAR_INPUT: {"dtype": np.dtype(v_bar.dtype.numpy()).name, "shape": ["batch", d], "default": None,
                          "meaning": "per row: mean of the request's projected visual tokens (image_features rows at "
                                     "its image positions, all images); computed once from the prefill's features "
                                     "and fed unchanged in every decode step"},
        },
        "fusion": "e' = W [e ; v_bar] + b on text positions; image positions unchanged",
        "hidden_size": d,
        "weights": {"file": weights.source or WEIGHTS_FILE, "sha256": weights.sha256},
        "origin": origin,
    }
    graphs = manifest.get("graphs", {})
    if "embed" in graphs:
        graphs["embed"]["inputs"] = describe_inputs(embed_model)
    manifest["passes"] = list(manifest.get("passes") or []) + [{"graph": "embed", "pass": PASS_NAME, "count": 1}]
    return manifest


def bake_visalign(folder: str | Path, manifest: dict, weights: FusionWeights | str | Path, *,
                  origin: str = "bake", enabled_by_default: bool = True) -> int:
    """The whole step on an artifact folder (the export's temporary folder or a `bake` target): rewrite the
    embed graph named by `manifest`, then record it in `manifest` (not written here). Returns the count."""
    folder = Path(folder)
    hidden = manifest.get("dims", {}).get("hidden_size")
    fusion = weights if isinstance(weights, FusionWeights) else read_fusion_weights(weights, hidden_size=hidden)
    if hidden is not None and fusion.hidden_size != hidden:
        raise CheckpointError(f"VisAlign weights are for hidden size {fusion.hidden_size} but the artifact's is {hidden}")
    if "visalign" in manifest.get("mitigation", {}):
        raise ArtifactError(f"'{folder}' already has VisAlign baked in; start from a plain export")
    path = folder / manifest["graphs"]["embed"]["file"]
    model = ir.load(str(path))
    count = apply_visalign(model, fusion, out_path=path)
    record_visalign(manifest, fusion, model, enabled_by_default=enabled_by_default, origin=origin)
    return count
