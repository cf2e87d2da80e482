"""Weight quantization of the decoder's projections as graph passes (issue 6): int4 weight-only `MatMulNBits`
(ONNX Runtime contrib op, CPU and CUDA) and dynamic int8 (`DynamicQuantizeLinear` + `MatMulInteger`, for the CPU).

Only `MatMul(x, W)` with W a constant rank-2 initializer [K, N] in the main graph, added by the exporter (the
q/k/v/o projections, the MLP and lm_head), is rewritten. Excluded by construction, and listed in `excluded`:
the attention score MatMuls (q kᵀ and P·V: both operands are activations), every node a mitigation pass added
(no torch scopes, a mitigation scope name, or inside an `If` branch; precision.is_mitigation_node), and the
opset-23 `Attention` op, which is never touched (ONNX Runtime's own quantizer turns it into its `QAttention` and
the model no longer loads; FIELD-NOTES).

int4, com.microsoft.MatMulNBits (ONNX Runtime ContribOperators.md: B uint8 [N, n_blocks, blob_size] with
blob_size = block_size * bits / 8, two 4-bit codes per byte, the lower K index in the low nibble; scales [N *
n_blocks] in A's dtype; zero_points uint8 [N * ceil(n_blocks / 2)], packed the same way, default 8; the weight
is dequantized as (code - zero_point) * scale along K):

    x [.., K] ─MatMul(·, W [K, N])─► y        ==>        x ─MatMulNBits(·, B, scales[, zero_points])─► y
    per column n, per block of `block_size` rows of K:
        symmetric:  scale = max|w| / 7,            code = clip(round(w / scale), -8, 7) + 8   (zero point 8)
        asymmetric: scale = (max(w,0) - min(w,0)) / 15, zp = clip(round(-min / scale), 0, 15),
                    code = clip(round(w / scale) + zp, 0, 15)
    K is zero-padded to a whole number of blocks (padded codes meet no row of x).

int8, dynamic (the ONNX ops; ONNX Runtime fuses them into its DynamicQuantizeMatMul kernel):

    x ─DynamicQuantizeLinear─► x_q uint8, x_scale, x_zp ─MatMulInteger(x_q, W_q int8 [K,N], x_zp)─► int32
      ─Cast(float)─► ─Mul(x_scale * w_scale [N])─► y          W_q = round(W / w_scale), w_scale = max|W[:, n]| / 127

`reduce_range` keeps the weight codes in [-64, 63] (7 bits), the range ONNX Runtime's quantizer uses for x86
CPUs without VNNI, where u8 x s8 products are summed in pairs into saturating int16.
No torch here.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.base import GraphPass, PassError
from anchorrt.graph_passes.naming import SCOPES_KEY
from anchorrt.graph_passes.precision import is_mitigation_node
from anchorrt.graph_passes.shapes import annotate_missing

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
MS_DOMAIN = "com.microsoft"
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32  # finer scales than ORT's 128: the error that matters on small hidden sizes; 2x the scales
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0: unset (A's type), 1 fp32, 2 fp16, 3 bf16, 4 int8 compute (CPU, fastest)


def weight_matmuls(graph: ir.Graph) -> tuple[list[tuple[ir.Node, np.ndarray]], dict[str, str]]:
    """The MatMuls a quantizer may rewrite, with their weight [K, N], and every other MatMul with the reason it
    is excluded (node name -> reason)."""
    chosen: list[tuple[ir.Node, np.ndarray]] = []
    excluded: dict[str, str] = {}
    for node in graph.all_nodes():
        if node.op_type != "MatMul" or node.domain != "":
            continue
        w = node.inputs[1]
        const = w is not None and w.is_initializer() and w.const_value is not None
        if is_mitigation_node(node, graph):
            excluded[node.name] = "mitigation subgraph"
        elif not const:
            excluded[node.name] = "activation x activation (attention scores or values)"
        elif len(w.const_value.shape) != 2 or w.dtype not in (FLOAT, FLOAT16):
            excluded[node.name] = "weight is not a rank-2 float matrix"
        else:
            chosen.append((node, w.const_value.numpy()))
    return chosen, excluded


def _replace(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], out: ir.Value) -> None:
    """Put `new_nodes` where `old` was; `out` takes over the old output (name, type, uses, graph-output slot)."""
    old_out = old.outputs[0]
    name, dtype, shape = old_out.name, old_out.dtype, old_out.shape
    old_out.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.insert_after(old, new_nodes)
    weight = old.inputs[1]
    graph.remove(old, safe=True)
    out.name, out.dtype, out.shape = name, dtype, shape
    if weight is not None and weight.is_initializer() and not weight.uses():
        graph.initializers.pop(weight.name)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _scoped_name(node: ir.Node, op_type: str) -> str:
    """`/model/layers.0/attn/q_proj/MatMul_0` -> `/model/layers.0/attn/q_proj/MatMulNBits_0`."""
    head, _, tail = (node.name or "/graph/MatMul_0").rpartition("/")
    return f"{head}/{tail.replace('MatMul', op_type, 1)}"


# ------------------------------------------------------------------------------------------------------ int4


def quantize_int4_blocks(w: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray | None]:
    """W [K, N] -> (B uint8 [N, n_blocks, block_size // 2], scales float32 [N, n_blocks], zero_points uint8
    [N, ceil(n_blocks / 2)] packed, or None when symmetric (the op's default 8))."""
    k, n = w.shape
    n_blocks = -(-k // block_size)
    wt = np.zeros((n, n_blocks * block_size), np.float32)
    wt[:, :k] = w.T.astype(np.float32)
    blocks = wt.reshape(n, n_blocks, block_size)
    if symmetric:
        scale = np.abs(blocks).max(axis=-1) / 7.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        codes = np.clip(np.rint(blocks / scale[..., None]), -8, 7) + 8
        zp = None
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = ((hi - lo) / 15.0).astype(np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        zero = np.clip(np.rint(-lo / scale), 0, 15)
        codes = np.clip(np.rint(blocks / scale[..., None]) + zero[..., None], 0, 15)
        zero = zero.astype(np.uint8)
        if n_blocks % 2:
            zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], axis=1)
        zp = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
    codes = codes.astype(np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, scale, zp


def dequantize_int4_blocks(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int) -> np.ndarray:
    """The inverse, from the op's documented layout: -> W [K, N] float32 (a reference for tests)."""
    n, n_blocks, _ = packed.shape
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, n_blocks, -1).astype(np.float32)
    if zero_points is None:
        zero = np.full((n, n_blocks), 8.0, np.float32)
    else:
        zero = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :n_blocks].astype(np.float32)
    w = (codes - zero[..., None]) * scales.reshape(n, n_blocks)[..., None]
    return w.reshape(n, -1)[:, :k].T


class Int4WeightPass(GraphPass):
    """int4 weight-only quantization (see the module docstring); count = MatMuls rewritten."""

    name = "int4"

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, symmetric: bool = True, accuracy_level: int = 0):
        super().__init__()
        if block_size not in BLOCK_SIZES:
            raise PassError(f"block size {block_size} is not supported; choose one of {', '.join(map(str, BLOCK_SIZES))}")
        if accuracy_level not in ACCURACY_LEVELS:
            raise PassError(f"accuracy level {accuracy_level} is not supported; choose 0 (unset), 1 (fp32), 2 (fp16), "
                            "3 (bf16) or 4 (int8 compute)")
        self.block_size, self.symmetric, self.accuracy_level = block_size, symmetric, accuracy_level
        self.excluded: dict[str, str] = {}
        self.quantized: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if any(n.op_type in ("MatMulNBits", "MatMulInteger") for n in graph):
            raise PassError("this decoder is already quantized; quantize an fp32 (or fp16) artifact")
        chosen, self.excluded = weight_matmuls(graph)
        for node, w in chosen:
            k, n = w.shape
            dtype = node.inputs[1].dtype
            packed, scales, zp = quantize_int4_blocks(w, self.block_size, self.symmetric)
            base = node.inputs[1].name
            inputs = [node.inputs[0], _initializer(graph, f"{base}/int4", packed),
                      _initializer(graph, f"{base}/int4_scales", scales.reshape(-1).astype(dtype.numpy()))]
            if zp is not None:
                inputs.append(_initializer(graph, f"{base}/int4_zero_points", zp.reshape(-1)))
            new = ir.Node(MS_DOMAIN, "MatMulNBits", inputs, name=_scoped_name(node, "MatMulNBits"),
                          attributes=[ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 4),
                                      ir.AttrInt64("block_size", self.block_size),
                                      ir.AttrInt64("accuracy_level", self.accuracy_level)],
                          metadata_props={key: v for key, v in node.metadata_props.items() if key == SCOPES_KEY})
            _replace(graph, node, [new], new.outputs[0])
            self.quantized.append(new.name)
        if chosen:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        self.count = len(chosen)
        annotate_missing(model)  # every value this pass created gets a type and shape
        return ir.passes.PassResult(model, modified=bool(chosen))

    def record(self) -> dict:
        return {"method": "int4 weight-only (com.microsoft.MatMulNBits)", "bits": 4, "block_size": self.block_size,
                "symmetric": self.symmetric, "accuracy_level": self.accuracy_level, "quantized": len(self.quantized),
                "excluded": self.excluded}


# ------------------------------------------------------------------------------------------------------ int8


def quantize_int8_columns(w: np.ndarray, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (W_q int8 [K, N], scale float32 [N]) symmetric per output column."""
    limit = 63.0 if reduce_range else 127.0
    scale = np.abs(w).max(axis=0).astype(np.float32) / limit
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -limit - (1 if reduce_range else 0), limit).astype(np.int8)
    return q, scale


def _int8_op(scope: str, meta: dict, op_type: str, inputs: list, what: str = "", num_outputs: int = 1,
             **attrs) -> ir.Node:
    node = ir.Node("", op_type, inputs, num_outputs=num_outputs, name=f"{scope}/int8/{what}{op_type}",
                   attributes=[ir.AttrInt64(k, v) for k, v in attrs.items()], metadata_props=dict(meta))
    for i, out in enumerate(node.outputs):
        out.name = f"{node.name}_output_{i}"
    return node


class Int8DynamicPass(GraphPass):
    """Dynamic int8 quantization of the weight MatMuls for the CPU; count = MatMuls rewritten."""

    name = "int8"

    def __init__(self, reduce_range: bool = False):
        super().__init__()
        self.reduce_range = reduce_range
        self.excluded: dict[str, str] = {}
        self.quantized: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if any(n.op_type in ("MatMulNBits", "MatMulInteger") for n in graph):
            raise PassError("this decoder is already quantized; quantize an fp32 artifact")
        chosen, self.excluded = weight_matmuls(graph)
        for node, w in chosen:
            if node.inputs[0].dtype != FLOAT or node.inputs[1].dtype != FLOAT:
                raise PassError(f"dynamic int8 needs fp32 activations ('{node.name}' runs in "
                                f"{(node.inputs[0].dtype or FLOAT).name.lower()}); use int8 without --precision fp16, "
                                "or --quantize int4 for fp16")
            q, scale = quantize_int8_columns(w, self.reduce_range)
            base, scope = node.inputs[1].name, node.name or f"/graph/MatMul_{len(self.quantized)}"
            meta = {key: v for key, v in node.metadata_props.items() if key == SCOPES_KEY}

            dq = _int8_op(scope, meta, "DynamicQuantizeLinear", [node.inputs[0]], num_outputs=3)  # per call, per tensor
            x_q, x_scale, x_zp = dq.outputs
            x_q.dtype, x_scale.dtype, x_zp.dtype = ir.DataType.UINT8, FLOAT, ir.DataType.UINT8
            mm = _int8_op(scope, meta, "MatMulInteger", [x_q, _initializer(graph, f"{base}/int8", q), x_zp])
            mm.outputs[0].dtype = ir.DataType.INT32
            cast = _int8_op(scope, meta, "Cast", [mm.outputs[0]], to=FLOAT)
            cast.outputs[0].dtype = FLOAT
            both = _int8_op(scope, meta, "Mul", [x_scale, _initializer(graph, f"{base}/int8_scale", scale)], "scale/")
            both.outputs[0].dtype = FLOAT
            out = _int8_op(scope, meta, "Mul", [cast.outputs[0], both.outputs[0]], "out/")
            _replace(graph, node, [dq, mm, cast, both, out], out.outputs[0])
            self.quantized.append(mm.name)
        self.count = len(chosen)
        annotate_missing(model)  # every value this pass created gets a type and shape
        return ir.passes.PassResult(model, modified=bool(chosen))

    def record(self) -> dict:
        return {"method": "dynamic int8 (DynamicQuantizeLinear + MatMulInteger), CPU", "bits": 8,
                "weights": "int8 symmetric per output column", "activations": "uint8 per tensor, per call",
                "reduce_range": self.reduce_range, "quantized": len(self.quantized), "excluded": self.excluded}
