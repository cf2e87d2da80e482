"""The decoder's residual stream alone, in the three forms graph_passes/fuse_norm.py can give it: how long its norms
take per step on onnxruntime's CPU EP, without the rest of the decoder's noise (a whole decode step of the bench model
varies by ~10% between sessions on a shared VM; its norms are ~1% of it).

Graph: L layers x (RMSNorm -> a sublayer stand-in (Mul by a constant vector) -> residual Add) + the final norm, at
[1, S, hidden], written as the exporter writes it (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul), then

    decomposed   as exported
    sln          FuseNormPass()            SimplifiedLayerNormalization, residual Add kept (the fused form's default)
    skip         FuseNormPass(skip=True)   com.microsoft.SkipSimplifiedLayerNormalization

The forms run interleaved (order alternating per round); medians of CPU time per step (process_time: another load on
the machine matters less than for wall time) with 1 thread, wall time otherwise. The ORT profiler is not used: its
per-node cost (~2 us a node on this VM) is several times what these nodes take.

    python scripts/bench_fuse_norm.py [--rows 1 300 2100] [--layers 16] [--hidden 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def residual_stream(layers: int, hidden: int):
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    consts: list = []

    def const(name, array):
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
        consts.append(v)
        return v

    two, axes, eps = const("two", np.array(2.0, np.float32)), const("axes", np.array([-1], np.int64)), \
        const("eps", np.array(1e-5, np.float32))
    nodes: list = []

    def op(op_type, inputs, scope, last=hidden):
        node = ir.Node("", op_type, inputs, name=f"/model/{scope}/{op_type}_{len(nodes)}")
        out = node.outputs[0]
        out.name, out.dtype, out.shape = f"{node.name}_output_0", ir.DataType.FLOAT, ir.Shape([1, "rows", last])
        nodes.append(node)
        return out

    def norm(h, scope):
        w = const(f"{scope}.weight", rng.standard_normal(hidden).astype(np.float32))
        mean = op("ReduceMean", [op("Pow", [h, two], scope), axes], scope, 1)
        rsqrt = op("Reciprocal", [op("Sqrt", [op("Add", [mean, eps], scope, 1)], scope, 1)], scope, 1)
        return op("Mul", [w, op("Mul", [h, rsqrt], scope)], scope)

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, "rows", hidden]))
    h = x
    for layer in range(layers):
        for part in ("input_layernorm", "post_attention_layernorm"):
            scale = const(f"sub{layer}{part}", (0.1 * rng.standard_normal(hidden)).astype(np.float32))
            h = op("Add", [h, op("Mul", [norm(h, f"layers.{layer}/{part}"), scale], f"layers.{layer}/sub")],
                   f"layers.{layer}")
    y = norm(h, "norm")
    return ir.Model(ir.Graph([x], [y], nodes=nodes, initializers=consts, opset_imports={"": 18}), ir_version=10)


def main(argv=None) -> int:
    import onnx_ir as ir
    import onnxruntime as ort
    from anchorrt.graph_passes.fuse_norm import FuseNormPass

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 300, 2100])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    forms = {"decomposed": None, "sln": FuseNormPass(), "skip": FuseNormPass(skip=True)}
    sessions = {}
    for name, p in forms.items():
        model = residual_stream(args.layers, args.hidden)
        if p is not None:
            p(model)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.log_severity_level = 3
        sessions[name] = (ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so,
                                               providers=["CPUExecutionProvider"]), model.graph.num_nodes())
    clock = time.process_time if args.threads == 1 else time.perf_counter
    print(f"{args.layers} layers, hidden {args.hidden}, {args.threads} thread(s), "
          f"{'CPU' if args.threads == 1 else 'wall'} time per step, medians of {args.rounds} interleaved rounds")
    print("nodes: " + ", ".join(f"{k} {n}" for k, (_, n) in sessions.items()))
    for rows in args.rows:
        x = np.random.default_rng(1).standard_normal((1, rows, args.hidden), dtype=np.float32)
        outs = {}
        bindings = {}
        for name, (sess, _) in sessions.items():
            b = sess.io_binding()
            b.bind_cpu_input("x", x)
            b.bind_output(sess.get_outputs()[0].name)
            sess.run_with_iobinding(b)
            outs[name] = b.copy_outputs_to_cpu()[0]
            bindings[name] = b
        diff = max(float(np.abs(outs[k] - outs["decomposed"]).max()) for k in outs)
        reps = max(1, 2000 // rows)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        order = list(sessions)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                sess, b = sessions[name][0], bindings[name]
                t0 = clock()
                for _ in range(reps):
                    sess.run_with_iobinding(b)
                times[name].append((clock() - t0) / reps)
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        print(f"rows {rows:5d}: " + ", ".join(f"{k} {v:.3f} ms ({v / med['decomposed']:.2f}x)" for k, v in med.items())
              + f"; max |diff| {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
