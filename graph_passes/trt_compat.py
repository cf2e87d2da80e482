"""Will TensorRT's ONNX parser take our graphs? A static check that needs no TensorRT and no GPU.

Every node of every graph of an artifact (If/Loop bodies included) is looked up, by domain and op type, in
TensorRT's published ONNX operator support (`graph_passes/trt_ops_table.py`, onnx-tensorrt `docs/operators.md`
for TensorRT 10.15). Each (graph, op) gets one of:

    yes         in the table, and any restriction that applies to our use was checked and holds
    restricted  in the table with a restriction this check cannot decide statically (listed as the reason)
    no          absent from the table, marked unsupported, a non-default domain (com.microsoft MatMulNBits, ...),
                added after the targeted version, or a restriction that our graph breaks (the reason says which)

The restrictions checked here are the ones our exports meet: the opset-23 `Attention` op (no past/present, no
softcap, 4-D Q/K/V), `If` branch outputs (distinct names, equal ranks), constant `axes`/`axis`/`K` inputs, input
data types against the table's "Supported Types" (the op's first input; e.g. CumSum lists floats only).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from anchorrt.graph_passes.trt_ops_table import ADDED_IN, OPSET_RANGE, SOURCE, TABLE_VERSION, load_table
from anchorrt.runtime.errors import ArtifactError, FlagError

DEFAULT_DOMAINS = ("", "ai.onnx")
STATUSES = ("yes", "restricted", "no")

# onnx.TensorProto data type -> the names operators.md uses
_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
               16: "BF16", 17: "FP8", 22: "INT4", 23: "FP4", 4: "UINT16", 5: "INT16", 12: "UINT32", 13: "UINT64",
               8: "STRING", 21: "UINT4", 18: "FP8", 19: "FP8", 20: "FP8"}
_CONST_INPUTS = {  # op -> (input index that must be a build-time constant, the restriction's words)
    **{op: (1, "axes must be an initializer") for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "CumSum": (1, "axis must be a build-time constant"),
    "TopK": (1, "K must be a build-time constant"),
    "OneHot": (1, "depth must be a build-time constant"),
}
_RESOLVABLE_INPUTS = {"Squeeze": 1, "Unsqueeze": 1}  # "axes must be resolvable to a constant": a constant is enough


@dataclass
class OpRow:
    graph: str  # artifact role (vision, embed, decoder)
    domain: str  # "" for the default ONNX domain
    op_type: str
    count: int
    status: str  # yes | restricted | no
    reason: str = ""

    @property
    def op(self) -> str:
        return self.op_type if self.domain in DEFAULT_DOMAINS else f"{self.domain}::{self.op_type}"


@dataclass
class CompatReport:
    trt_version: str
    source: str
    rows: list[OpRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # graph-level: opset out of range, ...
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.status != "no" for r in self.rows)

    def table(self) -> str:
        head = ("graph", "op", "count", "supported", "reason")
        lines = [head] + [(r.graph, r.op, str(r.count), r.status, r.reason) for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(4)]
        out = ["  ".join(c.ljust(w) for c, w in zip(line[:4], widths)) + "  " + line[4] for line in lines]
        return "\n".join(x.rstrip() for x in out)

    def summary(self) -> str:
        n = Counter(r.status for r in self.rows)
        verdict = "compatible" if self.ok else "NOT compatible"
        return (f"TensorRT {self.trt_version}: {verdict} ({n['yes']} yes, {n['restricted']} restricted, {n['no']} no "
                f"op types; table: {self.source})")


def parse_version(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)*\s*", str(text))
    if not m:
        raise FlagError(f"--trt-version {text!r} is not a version; give one like 10.15")
    major, minor = int(m.group(1)), int(m.group(2))
    if major != 10:
        raise FlagError(f"--trt-version {text}: the embedded operator table covers TensorRT 10.x only; give 10.x")
    if (major, minor) > parse_version_raw(TABLE_VERSION):
        raise FlagError(f"--trt-version {text} is newer than the embedded table ({TABLE_VERSION}); "
                        f"check with --trt-version {TABLE_VERSION} or update graph_passes/trt_ops_table.py")
    return major, minor


def parse_version_raw(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def _opset_range(target: tuple[int, int]) -> tuple[int, int] | None:
    """The inclusive opset range of the newest recorded version <= target (None if none is recorded)."""
    known = sorted((parse_version_raw(v), r) for v, r in OPSET_RANGE.items())
    best = None
    for v, r in known:
        if v <= target:
            best = r
    return best


class _Scope:
    """What a graph (and the graphs around it) knows: constants and value types/ranks."""

    def __init__(self, graph, outer: _Scope | None = None):
        self.const = set(outer.const) if outer else set()
        self.types = dict(outer.types) if outer else {}
        self.ranks = dict(outer.ranks) if outer else {}
        for init in graph.initializer:
            self.const.add(init.name)
            self.types[init.name] = init.data_type
            self.ranks[init.name] = len(init.dims)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            t = vi.type.tensor_type
            if t.elem_type:
                self.types[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.ranks[vi.name] = len(t.shape.dim)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                self.const.update(node.output)


def _attr(node, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_node(node, scope: _Scope, table: dict, target: tuple[int, int]) -> tuple[str, str]:
    """-> (status, reason) for one node."""
    domain, op = node.domain, node.op_type
    if domain not in DEFAULT_DOMAINS:
        hint = " (int4 weight-only for ONNX Runtime; for TensorRT use an fp16 artifact or TensorRT's own Q/DQ " \
               "quantization)" if op == "MatMulNBits" else ""
        return "no", f"{domain} op{hint}; TensorRT's ONNX parser imports only the default ONNX domain"
    if op not in table:
        return "no", f"not in TensorRT's ONNX operator table ({TABLE_VERSION})"
    supported, types, restriction = table[op]
    if not supported:
        return "no", f"TensorRT does not support {op}" + (f": {restriction}" if restriction else "")
    if op in ADDED_IN and target < parse_version_raw(ADDED_IN[op]):
        return "no", f"supported from TensorRT {ADDED_IN[op]} on (targeted: {target[0]}.{target[1]})"
    # data type of the op's first input (its "data"), or of its output for ops without inputs
    probe = next((x for x in node.input if x), None) or (node.output[0] if node.output else None)
    dtype = _TYPE_NAMES.get(scope.types.get(probe, 0))
    if dtype == "DOUBLE":
        return "restricted", "DOUBLE input: TensorRT casts DOUBLE down to FLOAT"
    if dtype and types and dtype not in types:
        return "no", f"input type {dtype} is not among TensorRT's types for {op} ({', '.join(types)})"
    problems = _restriction_problems(node, scope)
    if problems is None:
        return ("restricted", restriction) if restriction else ("yes", "")
    if problems:
        return "no", "; ".join(problems)
    return "yes", f"checked: {restriction}" if restriction else ""


def _restriction_problems(node, scope: _Scope) -> list[str] | None:
    """The restriction of `node`'s op checked on this node: [] holds, [why...] broken, None cannot be decided."""
    op = node.op_type
    if op == "Attention":
        bad = []
        names = ("Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")
        bad += [f"{names[i]} input is used" for i in (4, 5, 6) if len(node.input) > i and node.input[i]]
        outs = ("Y", "present_key", "present_value", "qk_matmul_output")
        bad += [f"{outs[i]} output is used" for i in (1, 2, 3) if len(node.output) > i and node.output[i]]
        if _attr(node, "qk_matmul_output_mode", 0):
            bad.append("qk_matmul_output_mode is set")
        if _attr(node, "softcap", 0.0):
            bad.append("softcap is set")
        ranks = [scope.ranks.get(x) for x in list(node.input[:3]) + list(node.input[3:4]) if x]
        bad += [f"{x} is {r}-D, not 4-D" for x, r in zip(node.input, ranks) if r is not None and r != 4]
        if bad or all(r is not None for r in ranks):
            return bad
        return None
    if op == "If":
        then_g, else_g = _attr(node, "then_branch"), _attr(node, "else_branch")
        if then_g is None or else_g is None:
            return None
        bad = []
        for t, e in zip(then_g.output, else_g.output):
            if t.name == e.name:
                bad.append(f"both branches name an output '{t.name}'")
            rt = len(t.type.tensor_type.shape.dim) if t.type.tensor_type.HasField("shape") else None
            re_ = len(e.type.tensor_type.shape.dim) if e.type.tensor_type.HasField("shape") else None
            if rt is not None and re_ is not None and rt != re_:
                bad.append(f"branch outputs '{t.name}'/'{e.name}' have ranks {rt} and {re_}")
        return bad
    if op in _CONST_INPUTS:
        idx, words = _CONST_INPUTS[op]
        if len(node.input) <= idx or not node.input[idx]:
            return []  # attribute form or default: nothing to resolve
        return [] if node.input[idx] in scope.const else [f"{words}; '{node.input[idx]}' is computed"]
    if op in _RESOLVABLE_INPUTS:
        idx = _RESOLVABLE_INPUTS[op]
        if len(node.input) <= idx or not node.input[idx] or node.input[idx] in scope.const:
            return []
        return None  # computed axes may still fold to a constant inside TensorRT
    if op == "TopK":
        return [] if _attr(node, "sorted", 1) == 1 else ["sorted must be 1"]
    if op == "LayerNormalization":
        return [f"output {i} is used" for i in (1, 2) if len(node.output) > i and node.output[i]]
    if op == "ScatterND":
        r = _attr(node, "reduction", b"none")
        r = r.decode() if isinstance(r, bytes) else r
        return [] if r == "none" else [f"reduction {r!r} is not supported"]
    if op == "Constant":
        return [f"attribute {a.name} is unsupported" for a in node.attribute
                if a.name in ("sparse_value", "value_string", "value_strings")]
    if op == "RotaryEmbedding":
        if len(node.input) > 3 and node.input[3]:
            t = _TYPE_NAMES.get(scope.types.get(node.input[3], 0))
            if t is None:
                return None
            return [] if t == "INT64" else [f"position_ids is {t}, not INT64"]
        return []
    return None


def check_graph(model, graph_name: str, trt_version: str = TABLE_VERSION) -> tuple[list[OpRow], list[str]]:
    """Check one onnx.ModelProto. -> (rows aggregated by op and verdict, graph-level problems)."""
    import onnx

    target = parse_version(trt_version)
    table = load_table()
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    rng = _opset_range(target)
    if opset is not None and rng is not None and not rng[0] <= opset <= rng[1]:
        problems.append(f"{graph_name}: opset {opset} is outside TensorRT {target[0]}.{target[1]}'s range "
                        f"{rng[0]}..{rng[1]}")
    try:  # types and ranks of intermediate values; the weights are not needed for that
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - best effort: without it fewer restrictions can be decided
        pass
    counts: Counter = Counter()

    def walk(graph, outer: _Scope | None):
        scope = _Scope(graph, outer)
        for node in graph.node:
            status, reason = _check_node(node, scope, table, target)
            counts[(node.domain if node.domain not in DEFAULT_DOMAINS else "", node.op_type, status, reason)] += 1
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, scope)
                for g in a.graphs:
                    walk(g, scope)

    walk(model.graph, None)
    rows = [OpRow(graph_name, d, op, n, status, reason) for (d, op, status, reason), n in counts.items()]
    rows.sort(key=lambda r: (STATUSES.index(r.status) * -1, r.domain, r.op_type, r.reason))
    return rows, problems


def check_artifact(folder: str | Path, trt_version: str = TABLE_VERSION, verify: bool = True) -> CompatReport:
    """Check every graph of an artifact folder (weights are not loaded)."""
    import onnx
    from anchorrt.runtime.manifest import GRAPH_ROLES, Manifest

    target = parse_version(trt_version)
    manifest = Manifest.load(folder, verify=verify)
    report = CompatReport(f"{target[0]}.{target[1]}", SOURCE)
    if f"{target[0]}.{target[1]}" != TABLE_VERSION:
        report.notes.append(f"the table is TensorRT {TABLE_VERSION}'s; for {target[0]}.{target[1]} only the recorded "
                            f"additions ({', '.join(f'{k} in {v}' for k, v in ADDED_IN.items())}) and opset ranges "
                            "are taken into account")
    for role in GRAPH_ROLES:
        path = manifest.graph_path(role)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others
            raise ArtifactError(f"cannot read graph '{path.name}' ({exc.__class__.__name__}); re-export") from None
        rows, problems = check_graph(model, role, trt_version)
        report.rows += rows
        report.problems += problems
    return report
