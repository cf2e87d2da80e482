"""Bake mitigation methods into an artifact folder's decoder, atomically and without torch.

    manifest = bake("out/llava", ["clva", "sevi"], BakeOptions(sevi_start_layer=8))
    anchorrt bake out/llava --mitigation clva,sevi [--clva-l-pos 14] [--sevi-start-layer 8] [--debug-outputs]

The folder is checked (sha256 of every file), the methods are validated (known, not baked yet), then everything
happens in a hidden sibling folder: unchanged files are hard-linked (copied where links are not possible), the
decoder is loaded with onnx-ir, run through the passes (names, then CLVA, then SEVI: the order both methods
assume when baked together; baking one after the other also works) and written there; the manifest gets
`mitigation.<method>` (layer choices, every added input with dtype, shape, default and meaning, the parameters the
runtime accepts, debug outputs, the pass count), the pass counts in `passes`, the decoder's new inputs/outputs,
and fresh sha256 hashes. A rename puts the result in place; on any error the original folder is untouched.

The exporter calls `bake_into(folder, manifest_data, ...)` through its `after_export` hook, on its own temporary
folder, so `anchorrt export --mitigation clva` is one atomic write too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
from anchorrt.graph_passes.base import GraphPass, PassError
from anchorrt.graph_passes.clva import CLVA_INPUTS, VISUAL_MASK_INPUT, ClvaPass, resolve_clva_layers
from anchorrt.graph_passes.clva import DEBUG_OUTPUTS as CLVA_DEBUG
from anchorrt.graph_passes.clva_qformer import QFormerClvaPass
from anchorrt.graph_passes.fuse_attention import FORM_FUSED, FORM_UNFUSED, FuseAttentionPass
from anchorrt.graph_passes.fuse_norm import FuseNormPass
from anchorrt.graph_passes.fuse_rotary import MAX_TABLE_POSITIONS, FuseRotaryPass
from anchorrt.graph_passes.naming import AssignNodeNames
from anchorrt.graph_passes.pack_matmul import PackMatMulPass
from anchorrt.graph_passes.pack_qkv import HALF_REASON, PackQkvPass, UnpackQkvPass
from anchorrt.graph_passes.pipeline import has_external_data, run_on_model, save_model
from anchorrt.graph_passes.probe import ProbePass, resolve_probe_layers
from anchorrt.graph_passes.sevi import DEFAULT_START_LAYER, SEVI_INPUTS, SeviPass
from anchorrt.runtime.manifest import MANIFEST_NAME, Manifest, replace_folder, write_manifest
from anchorrt.runtime.mitigation import PARAMS

METHOD_ORDER = ("clva", "sevi", "probe")  # the probe reads attention as CLVA leaves it
PAPERS = {"clva": "papers/clva-cross-layer-visual-anchors.txt",
          "sevi": "papers/sevi-attention-information-flow-abstract.txt (arXiv 2505.14257)",
          "probe": "papers/iava-instruction-aligned-visual-attention.txt (arXiv 2503.18556)"}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BakeOptions:
    """Bake-time choices. None = METHODS.md default (CLVA: l_neg 0, l_pos L//2-2, drift l_pos+1..L-1)."""

    clva_l_neg: int | None = None
    clva_l_pos: int | None = None
    clva_drift_layers: tuple[int, ...] | None = None
    sevi_start_layer: int = DEFAULT_START_LAYER
    debug_outputs: bool = False
    probe_layers: tuple[int, ...] | None = None  # IAVA's attention probe; None: every layer


def parse_methods(mitigation: str | Sequence[str]) -> list[str]:
    """'clva,sevi' or ['sevi', 'clva'] -> ['clva', 'sevi'] (canonical order); unknown or repeated -> PassError."""
    items = [m.strip().lower() for m in (mitigation.split(",") if isinstance(mitigation, str) else mitigation)]
    items = [m for m in items if m]
    if not items:
        raise PassError(f"no mitigation method given; choose from {', '.join(METHOD_ORDER)}")
    unknown = [m for m in items if m not in METHOD_ORDER]
    if unknown:
        raise PassError(f"unknown mitigation method {unknown[0]!r}; known: {', '.join(METHOD_ORDER)}")
    if len(set(items)) != len(items):
        raise PassError(f"mitigation method listed twice: {','.join(items)}")
    return [m for m in METHOD_ORDER if m in items]


def check_layer_choices(methods: str | Sequence[str], options: BakeOptions | None, num_layers: int) -> None:
    """Every layer choice of `methods` against a decoder of `num_layers` layers, before any graph (or weight) is
    loaded: `export` calls this with the count from config.json, `bake` with the manifest's. PassError, one line.

    SEVI's start_layer is literal (METHODS.md "SEVI"): at start_layer >= num_layers no layer would change, so asking
    for SEVI there is refused (the default 8 on a model of 8 layers or fewer) rather than baking a no-op.
    An empty list (every method goes into another graph, e.g. InstructBLIP's Q-Former CLVA) checks nothing."""
    if not isinstance(methods, str) and not methods:
        return
    methods = parse_methods(methods)
    options = options or BakeOptions()
    if "clva" in methods:
        resolve_clva_layers(num_layers, options.clva_l_neg, options.clva_l_pos, options.clva_drift_layers)
    if "sevi" in methods:
        start = int(options.sevi_start_layer)
        if start < 0:
            raise PassError(f"SEVI start_layer must be >= 0, got {start}")
        if start >= num_layers:
            raise PassError(f"sevi: start_layer {start} leaves this {num_layers}-layer model unchanged (METHODS.md: "
                            f"start_layer is literal, SEVI edits layers start_layer..L-1); choose --sevi-start-layer "
                            f"below {num_layers}")
    if "probe" in methods:
        resolve_probe_layers(num_layers, options.probe_layers)


def _check_not_baked(methods: Sequence[str], data: dict, where: str) -> None:
    baked = data.get("mitigation") or {}
    for m in methods:
        if m in baked:
            raise PassError(f"{m} is already baked into '{where}' (layers: "
                            f"{baked[m].get('layers', {})}); re-export to bake it with other choices")


def _method_graphs(data: dict | None) -> dict[str, str]:
    """{method: graph role} for methods an architecture bakes outside the decoder, from the architecture's own
    manifest entry (InstructBLIP: {"clva": "qformer"}, METHODS.md: CLVA runs inside its Q-Former)."""
    if not isinstance(data, dict):
        return {}
    arch = data.get(str(data.get("model_type")))
    graphs = arch.get("method_graphs") if isinstance(arch, dict) else None
    return {str(k): str(v) for k, v in graphs.items()} if isinstance(graphs, dict) else {}


def _by_graph(methods: Sequence[str], data: dict | None) -> dict[str, list[str]]:
    """Methods grouped by the graph they are baked into, decoder first."""
    targets = _method_graphs(data)
    out: dict[str, list[str]] = {}
    for m in methods:
        out.setdefault(targets.get(m, "decoder"), []).append(m)
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "decoder"))


def _qformer_passes(methods: Sequence[str], options: BakeOptions, data: dict) -> list[GraphPass]:
    info = data["instructblip"]
    out: list[GraphPass] = [AssignNodeNames()]
    for m in methods:
        if m != "clva":
            raise PassError(f"{m} cannot be baked into the qformer graph")
        out.append(QFormerClvaPass(info["qformer_layers"], info["cross_attention_layers"], info["image_tokens"],
                                   options.clva_l_neg, options.clva_l_pos, options.clva_drift_layers))
    return out


ROLE_PASSES = {"qformer": _qformer_passes}  # graph role -> pass list builder (the decoder's is `_passes`)


def _role_passes(role: str, methods: Sequence[str], options: BakeOptions, data: dict) -> list[GraphPass]:
    return _passes(methods, options) if role == "decoder" else ROLE_PASSES[role](methods, options, data)


def _passes(methods: Sequence[str], options: BakeOptions) -> list[GraphPass]:
    out: list[GraphPass] = [AssignNodeNames(), UnpackQkvPass()]  # the methods read pattern C (attention_match.py)
    if "clva" in methods:
        out.append(ClvaPass(options.clva_l_neg, options.clva_l_pos, options.clva_drift_layers, options.debug_outputs))
    if "sevi" in methods:
        out.append(SeviPass(options.sevi_start_layer, options.debug_outputs))
    if "probe" in methods:
        out.append(ProbePass(options.probe_layers))
    out.append(PackQkvPass())  # last: flags off runs the packed, self-rotating attention (graph_passes/pack_qkv.py)
    return out


def describe_io(model: ir.Model) -> tuple[list[dict], list[dict]]:
    """The manifest's {name, dtype, shape} lists, as the exporter writes them."""

    def describe(values) -> list[dict]:
        return [{"name": v.name, "dtype": v.dtype.numpy().name,
                 "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])]} for v in values]

    return describe(model.graph.inputs), describe(model.graph.outputs)


def _input_record(name: str, dtype: str, shape: list, default, meaning: str) -> dict:
    return {"dtype": dtype, "shape": shape, "default": default, "meaning": meaning}


def _method_record(method: str, p: GraphPass, opset: int, role: str = "decoder") -> dict:
    if isinstance(p, ProbePass):
        return {**p.record(), "opset": opset}
    if role != "decoder":
        return _graph_method_record(method, p, opset, role)
    visual = _input_record(VISUAL_MASK_INPUT[0], VISUAL_MASK_INPUT[1], VISUAL_MASK_INPUT[2], False, VISUAL_MASK_INPUT[3])
    table = CLVA_INPUTS if method == "clva" else SEVI_INPUTS
    params = PARAMS[method]
    by_input = {param.input: (key, param) for key, param in params.items()}
    inputs = {"visual_mask": visual}
    for name, (dtype, meaning) in table.items():
        default = False if name.endswith(".enable") else by_input[name][1].default
        valid = "" if name.endswith(".enable") else f"; valid {by_input[name][1].rule}"
        inputs[name] = _input_record(name, dtype, ["batch"], default, meaning + valid)
    record = {
        "version": 1,
        "paper": PAPERS[method],
        "semantics": f"METHODS.md section {method.upper()}",
        "form": p.form,
        "opset": opset,
        "pass_count": p.count,
        "inputs": inputs,
        "parameters": {key: {"input": param.input, "default": param.default, "valid": param.rule}
                       for key, param in params.items()},
    }
    if method == "clva":
        record["layers"] = p.layers.as_dict()
        record["statistics_dtype"] = "float64 (sums over keys in float32)"
        record["bias_dtype"] = "float32"
        if p.debug_outputs:
            record["debug_outputs"] = {k: {"dtype": d, "shape": s, "meaning": mn} for k, (d, s, mn) in CLVA_DEBUG.items()}
    else:
        record["layers"] = {"start_layer": p.start_layer, "edited_layers": list(p.layers)}
        if p.debug_outputs:
            record["debug_outputs"] = {f"sevi.head_class.{i}": {
                "dtype": "int8", "shape": ["batch", "heads"],
                "meaning": "0 vision, 1 global text, 2 local text, -1 not classified"} for i in p.layers}
    return record


def _graph_method_record(method: str, p: GraphPass, opset: int, role: str) -> dict:
    """The record of a method baked into another graph than the decoder (InstructBLIP's Q-Former CLVA): its
    inputs are per image ([num_images]) and the runtime feeds them to that graph."""
    params = PARAMS[method]
    by_input = {param.input: (key, param) for key, param in params.items()}
    inputs = {}
    for name, (dtype, meaning) in CLVA_INPUTS.items():
        default = False if name.endswith(".enable") else by_input[name][1].default
        valid = "" if name.endswith(".enable") else f"; valid {by_input[name][1].rule}"
        inputs[name] = _input_record(name, dtype, ["num_images"], default, meaning + " (per image)" + valid)
    return {
        "version": 1, "paper": PAPERS[method] + ", appendix B.1 (eq. 14)",
        "semantics": "METHODS.md section CLVA, last paragraph; reading in graph_passes/clva_qformer.py",
        "graph": role, "form": p.form, "opset": opset, "pass_count": p.count, "inputs": inputs,
        "parameters": {key: {"input": param.input, "default": param.default, "valid": param.rule}
                       for key, param in params.items()},
        "layers": p.layers.as_dict(), "statistics_dtype": "float64 (sums over keys in float32)",
        "bias_dtype": "float32",
    }


def _no_op_error(p: GraphPass, data: dict, src: Path) -> PassError:
    layers = data["dims"]["num_layers"]
    if p.name == "sevi" and getattr(p, "form", None):
        why = (f"start_layer {p.start_layer} leaves this {layers}-layer model unchanged (METHODS.md: start_layer is "
               f"literal); choose --sevi-start-layer below {layers}")
    else:
        why = "no decoder layer's attention matched"
    return PassError(f"{p.name} matched nothing in '{src}': {why}")


def transform_into(folder: Path, data: dict, passes: Sequence[GraphPass], source: Path | None = None,
                   say: Progress | None = None, require_match: bool = False, role: str = "decoder") -> dict[str, int]:
    """Run `passes` on `source/<decoder>` (default: `folder`), write the decoder into `folder` and update `data` (the
    manifest dict) in place: decoder inputs/outputs, the `passes` log, a `mitigation` record per CLVA/SEVI pass.
    `folder` must not be visible to users yet. `require_match`: a mitigation pass that matches nothing is an error.
    -> {pass_name: count}."""
    say = say or (lambda msg: None)
    graph = data["graphs"][role]
    src = (source or folder) / graph["file"]
    model = ir.load(src)
    counts = run_on_model(model, passes)
    mitigation_passes = [p for p in passes if isinstance(p, (ClvaPass, SeviPass, ProbePass, QFormerClvaPass))]
    if require_match:
        for p in mitigation_passes:
            if p.count == 0:
                raise _no_op_error(p, data, src)
    if not any(counts.values()) and source is None:
        return counts  # nothing changed; the file in `folder` is already the one to keep
    ext = has_external_data(src)
    save_model(model, folder / graph["file"], ext)
    graph["inputs"], graph["outputs"] = describe_io(model)
    if ext:
        graph["external_data"] = ext
    data["passes"] = list(data.get("passes") or []) + [
        {"graph": role, "pass": p.name, "count": p.count} for p in passes
        if p.count or not isinstance(p, AssignNodeNames)]
    mitigation = dict(data.get("mitigation") or {})
    for p in mitigation_passes:
        if p.count:
            mitigation[p.name] = _method_record(p.name, p, int(data.get("opset", 0)), role)
    data["mitigation"] = mitigation
    return counts


def bake_into(folder: Path, data: dict, methods: Sequence[str], options: BakeOptions,
              source: Path | None = None, say: Progress | None = None) -> dict[str, int]:
    """Bake `methods` with `options` (see `transform_into`). -> {pass_name: count}."""
    methods = parse_methods(methods)
    _check_not_baked(methods, data, str(source or folder))
    counts: dict[str, int] = {}
    groups = _by_graph(methods, data)
    if "decoder" in groups:  # a method baked into another graph names that graph's layers (its pass checks them)
        check_layer_choices(groups["decoder"], options, int(data["dims"]["num_layers"]))
    for role, ms in groups.items():
        (say or (lambda msg: None))(f"baking {', '.join(ms)} into {data['graphs'][role]['file']}")
        counts.update(transform_into(folder, data, _role_passes(role, ms, options, data), source, say,
                                     require_match=True, role=role))
    return counts


def name_graphs(folder: Path, data: dict, roles: Sequence[str] = ("vision", "embed", "decoder")) -> dict[str, int]:
    """The exporter's hook step: deterministic node names in the graphs of a fresh export folder."""
    counts = {}
    for role in roles:
        path = folder / data["graphs"][role]["file"]
        model = ir.load(path)
        p = AssignNodeNames()
        run_on_model(model, [p])
        save_model(model, path, has_external_data(path))
        counts[role] = p.count
        data["passes"] = list(data.get("passes") or []) + [{"graph": role, "pass": p.name, "count": p.count}]
    return counts


def fused_form_passes(data: dict | None = None) -> list[GraphPass]:
    """The fused decoder form, in order; the first fuses the attention (its count must be every layer), the rest
    are optional fusions of the same form (a count of 0 leaves that part as exported). `data`: the manifest of the
    export being fused (the rotary tables cover its context length; without it rotary stays as exported)."""
    return [FuseAttentionPass(),
            FuseRotaryPass(rotary_table_positions(data)),
            PackMatMulPass(),
            FuseNormPass(),
            PackQkvPass()]


def fuse_into(folder: Path, data: dict, say: Progress | None = None) -> dict[str, int]:
    """The fused decoder form (graph_passes/fuse_attention.py and the fusions after it) in a fresh export folder;
    records `manifest["attention"]`, which the runtime follows (runtime/kv_cache.py: one buffer written in place)."""
    (say or (lambda msg: None))("fusing attention: GroupQueryAttention with an in-place KV cache")
    passes = fused_form_passes(data)
    counts = transform_into(folder, data, [AssignNodeNames(), *passes], say=say)
    _record_fused(passes, data, say)
    return counts


def _record_fused(passes: Sequence[GraphPass], data: dict, say: Progress | None = None) -> None:
    first = passes[0]
    if first.count != data["dims"]["num_layers"]:
        raise PassError(f"fused attention in {first.count} of {data['dims']['num_layers']} decoder layers; use "
                        "--attention unfused")
    data["attention"] = {"form": FORM_FUSED, "op": "com.microsoft.GroupQueryAttention", "kv_cache": "in_place",
                         "row_lengths": True,  # seqlens_k per row from the mask (graph_passes/fuse_attention.py)
                         "pass_count": first.count, "fusions": {p.name: p.count for p in passes[1:]}}
    left = {}  # a fusion's layers left as exported, by reason (e.g. fuse_rotary on M-RoPE)
    for p in passes[1:]:
        for layer, reason in sorted((getattr(p, "skipped", None) or {}).items()):
            left.setdefault(p.name, {}).setdefault(reason, []).append(layer)
    if left:
        data["attention"]["left_as_exported"] = left
        for name, reasons in left.items():
            for reason, layers in reasons.items():
                (say or (lambda msg: None))(f"{name}: layers {layers} left as exported: {reason}")
    for p in passes:  # the rotary tables end at max_positions: the runtime refuses longer prompts (runtime/prompt.py)
        if isinstance(p, FuseRotaryPass) and p.count and p.max_positions < _context_length(data):
            (say or (lambda msg: None))(f"rotary tables capped at {p.max_positions} positions: context_length "
                                        f"{_context_length(data)} -> {p.max_positions}")
            data["context_length"] = p.max_positions


def _context_length(data: dict) -> int:
    return int(data.get("context_length") or data["dims"]["max_position_embeddings"])


def rotary_table_positions(data: dict | None) -> int | None:
    """Rows of the fused rotary's cos/sin tables: the manifest's context length, at most MAX_TABLE_POSITIONS."""
    return None if data is None else min(_context_length(data), MAX_TABLE_POSITIONS)


def fuse_artifact(artifact_dir: str | os.PathLike, progress: Progress | None = None, verify: bool = True) -> Manifest:
    """The fused form of an existing unfused, unbaked fp32 artifact folder (atomically; e.g. for benchmarks that
    export once and compare both forms). -> the new Manifest."""
    folder = Path(artifact_dir)
    passes: list[GraphPass] = []

    def check(data: dict) -> None:
        if data.get("attention", {}).get("form", FORM_UNFUSED) != FORM_UNFUSED:
            raise PassError(f"'{folder}' is already fused")
        if data.get("mitigation"):
            raise PassError(f"'{folder}' has mitigation baked in; fuse the plain export, then bake")

    def build(data: dict) -> list[GraphPass]:
        passes[:] = fused_form_passes(data)
        return [AssignNodeNames(), *passes]

    manifest, _ = transform_artifact(folder, build, progress, verify, check=check,
                                     record=lambda data: _record_fused(passes, data, progress))
    if passes[0].count == 0:
        raise PassError(f"no decoder layer's attention in '{folder}' has the opset-18 form; nothing to fuse")
    return manifest


def export_hook(methods: Sequence[str] | None = None, options: BakeOptions | None = None,
                say: Progress | None = None, attention: str = FORM_UNFUSED) -> Callable[[Path, dict], None]:
    """`after_export` for `export_model`: name every graph's nodes, fuse the attention (`attention="gqa"`), then
    bake `methods` (if any) on that form."""
    methods = parse_methods(methods) if methods else []
    if attention not in (FORM_FUSED, FORM_UNFUSED):
        raise PassError(f"attention form '{attention}' is unknown; use {FORM_FUSED} or {FORM_UNFUSED}")

    def hook(folder: Path, data: dict) -> None:
        baked = set(_by_graph(methods, data)) if methods else set()
        fuse = attention == FORM_FUSED
        # the decoder is named by its method passes when methods are baked into it, by the fusion when it is fused
        name_graphs(folder, data, [r for r in data["graphs"] if r not in baked and not (fuse and r == "decoder")])
        if fuse:
            fuse_into(folder, data)  # export's [5/5] line names the fusion
        else:
            data["attention"] = {"form": FORM_UNFUSED}
        if methods:  # names the decoder's nodes first, then bakes
            bake_into(folder, data, methods, options or BakeOptions(), say=say)

    return hook


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def transform_artifact(artifact_dir: str | os.PathLike, passes: Sequence[GraphPass] | Callable, progress: Progress | None = None,
                       verify: bool = True, require_match: bool = False,
                       check: Callable[[dict], None] | None = None,
                       other_graphs: Callable[[dict], dict[str, list[GraphPass]]] | None = None,
                       record: Callable[[dict], None] | None = None) -> tuple[Manifest, dict[str, int]]:
    """Run `passes` on an artifact folder's decoder, atomically (a hidden sibling folder, then a rename); the
    manifest is updated and re-hashed. `check(manifest_data)` runs before anything is copied, `record(manifest_data)`
    after the passes, before the manifest is written. `other_graphs(data)`: {role: passes} for other graphs rewritten
    in the same write (InstructBLIP's qformer)."""
    folder = Path(artifact_dir)
    manifest = Manifest.load(folder, verify=verify)  # ArtifactError: missing, not an artifact, modified files
    if check is not None:
        check(manifest.data)
    data = dict(manifest.data)
    more = other_graphs(data) if other_graphs is not None else {}
    if callable(passes):  # built from the manifest (which methods go to which graph)
        passes = passes(data)
    rewritten = _graph_files(data, (["decoder"] if passes else []) + list(more))
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.bake-", dir=folder.resolve().parent))
    os.chmod(tmp, folder.stat().st_mode & 0o777)
    try:
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.name not in rewritten:
                _link_or_copy(p, tmp / p.name)
        counts = transform_into(tmp, data, passes, source=folder, say=progress, require_match=require_match) \
            if passes else {}
        for role, role_passes in more.items():
            counts.update(transform_into(tmp, data, role_passes, source=folder, say=progress,
                                         require_match=require_match, role=role))
        if not any(counts.values()):
            shutil.rmtree(tmp, ignore_errors=True)
            return manifest, counts
        if record is not None:
            record(data)
        written = write_manifest(tmp, data)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest(folder, written), counts


def bake(artifact_dir: str | os.PathLike, mitigation: str | Sequence[str], options: BakeOptions | None = None,
         progress: Progress | None = None, verify: bool = True) -> Manifest:
    """Bake `mitigation` into the artifact folder (atomically). -> the new Manifest."""
    say = progress or (lambda msg: None)
    methods = parse_methods(mitigation)
    folder = Path(artifact_dir)

    def check(data: dict) -> None:
        _check_not_baked(methods, data, str(folder))
        _check_mitigation_bakeable(data, str(folder))
        decoder_methods = _by_graph(methods, data).get("decoder", [])
        check_layer_choices(decoder_methods, options, int(data["dims"]["num_layers"]))  # before a graph is read
        say(f"baking {', '.join(methods)} into {folder}")

    options = options or BakeOptions()
    split: dict[str, list[str]] = {}

    def others(data: dict) -> dict[str, list[GraphPass]]:
        split.update(_by_graph(methods, data))
        return {role: _role_passes(role, ms, options, data) for role, ms in split.items() if role != "decoder"}

    def decoder_passes(data: dict) -> list[GraphPass]:
        return _passes(split["decoder"], options) if "decoder" in split else []

    manifest, counts = transform_artifact(folder, decoder_passes, progress, verify,
                                          require_match=True, check=check, other_graphs=others)
    say(f"baked {', '.join(methods)} into {folder}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return manifest


def bake_visalign_weights(artifact_dir: str | os.PathLike, weights: str | os.PathLike, progress: Progress | None = None,
                          verify: bool = True) -> Manifest:
    """`anchorrt bake OUT --visalign FILE`: add VisAlign's fusion (graph_passes/visalign.py) to the embed graph of
    an artifact folder, atomically (a hidden sibling folder, then a rename). The fusion's training also changes the
    projector: bake it onto an export of the checkpoint it was trained with (exporting the VisAlign checkpoint
    itself does this in one step)."""
    from anchorrt.graph_passes.visalign import bake_visalign

    say = progress or (lambda msg: None)
    folder = Path(artifact_dir)
    manifest = Manifest.load(folder, verify=verify)
    if not Path(weights).is_file():
        raise PassError(f"VisAlign weights file '{weights}' does not exist; pass the visalign.safetensors a "
                        "`anchorrt visalign train` run wrote")
    data = dict(manifest.data)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.bake-", dir=folder.resolve().parent))
    os.chmod(tmp, folder.stat().st_mode & 0o777)
    try:
        for p in sorted(folder.iterdir()):  # the pass writes a new embed file and renames it: links stay intact
            if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST_NAME:
                _link_or_copy(p, tmp / p.name)
        count = bake_visalign(tmp, data, weights, origin="bake")
        written = write_manifest(tmp, data)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"baked visalign into {folder}: visalign {count}")
    return Manifest(folder, written)




# ---------------------------------------------------------------------------------- precision / quantization

PRECISIONS = ("fp32", "fp16")
QUANTIZE = ("int4", "int8")


@dataclass(frozen=True)
class PrecisionOptions:
    """What `bake --precision/--quantize` and `export --precision/--quantize` do (graph_passes/precision.py and
    quantize.py). `vision`: the vision graph's precision, None = fp16 with --precision fp16 or --quantize int4, else
    fp32 (it is never quantized). The embed graph follows the decoder's activations (see `convert_into`)."""

    precision: str = "fp32"
    quantize: str | None = None
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    reduce_range: bool = True  # int8: 7-bit weight codes (see quantize.py)
    vision: str | None = None

    def check(self) -> PrecisionOptions:
        from anchorrt.graph_passes.quantize import ACCURACY_LEVELS, BLOCK_SIZES

        if self.precision not in PRECISIONS:
            raise PassError(f"precision '{self.precision}' is not supported; use fp32 or fp16")
        if self.vision not in (None, *PRECISIONS):
            raise PassError(f"vision precision '{self.vision}' is not supported; use fp32 or fp16")
        if self.quantize not in (None, *QUANTIZE):
            raise PassError(f"quantization '{self.quantize}' is not supported; use int4 (GPU and CPU) or int8 (CPU)")
        if self.quantize == "int8" and self.precision == "fp16":
            raise PassError("int8 is dynamic quantization for the CPU and needs fp32 activations; use "
                            "--quantize int4 with --precision fp16, or drop --precision fp16")
        if self.block_size not in BLOCK_SIZES:
            raise PassError(f"block size {self.block_size} is not supported; choose one of "
                            f"{', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise PassError(f"accuracy level {self.accuracy_level} is not supported; choose 0 (unset), 1 (fp32), "
                            "2 (fp16), 3 (bf16) or 4 (int8 compute)")
        return self

    @property
    def vision_precision(self) -> str:
        """The vision graph is never quantized; by default it is fp16 whenever the decoder targets a GPU-style
        precision (fp16, or int4 weights: the issue's "the vision graph stays fp16 by default"), and fp32 with
        fp32 or CPU int8 decoders (onnxruntime's CPU EP would only cast fp16 back)."""
        if self.vision:
            return self.vision
        return "fp16" if self.precision == "fp16" or self.quantize == "int4" else "fp32"

    @property
    def changes_anything(self) -> bool:
        return self.precision != "fp32" or self.quantize is not None or self.vision_precision != "fp32"


def _check_convertible(data: dict, where: str) -> None:
    p = data.get("precision") or {}
    if p.get("activations", "fp32") != "fp32" or p.get("weights", "fp32") != "fp32" or p.get("graphs"):
        raise PassError(f"'{where}' is already converted (weights {p.get('weights')}, activations "
                        f"{p.get('activations')}); convert an fp32 export instead")


def _check_mitigation_bakeable(data: dict, where: str) -> None:
    """Mitigation passes run before precision passes: an fp16 decoder cannot take them any more."""
    p = data.get("precision") or {}
    if p.get("activations", "fp32") != "fp32":
        raise PassError(f"'{where}' was converted to {p['activations']}; mitigation must be baked first: bake it into "
                        "the fp32 export, then `anchorrt bake OUT --precision fp16` (or export with both)")


def _precision_passes(role: str, options: PrecisionOptions) -> list[GraphPass]:
    from anchorrt.graph_passes.precision import Fp16Pass
    from anchorrt.graph_passes.quantize import Int4WeightPass, Int8DynamicPass

    passes: list[GraphPass] = []
    vision16 = options.vision_precision == "fp16"
    half = options.precision == "fp16"
    if role == "vision" and vision16:
        passes.append(Fp16Pass("vision", fp16_outputs={"image_features"}))
    elif role == "embed" and (half or vision16):
        # image_features follows the vision graph's output; inputs_embeds the decoder's input.
        passes.append(Fp16Pass("embed", fp16_inputs={"image_features"} if vision16 else set(),
                               fp16_outputs={"inputs_embeds"} if half else set()))
    elif role == "decoder":
        if half:
            # The fused form's GroupQueryAttention converts too, KV buffers included (ONNX Runtime's CUDA kernel is
            # fp16/bf16 only; its bias is clipped to fp16's range, graph_passes/precision.py): the present stays the
            # node's own output, written in place. It is unpacked first: the fp16 (CUDA) form keeps the separate
            # rotations checked on the GPU (graph_passes/pack_qkv.py, HALF_REASON).
            passes += [UnpackQkvPass(), Fp16Pass("decoder")]
        if options.quantize == "int4":
            passes.append(Int4WeightPass(options.block_size, options.symmetric, options.accuracy_level))
        elif options.quantize == "int8":
            passes.append(Int8DynamicPass(options.reduce_range))
    return passes


def convert_into(folder: Path, data: dict, options: PrecisionOptions, source: Path | None = None,
                 say: Progress | None = None) -> dict[str, dict[str, int]]:
    """Run the precision/quantization passes on the graphs of `source` (default `folder`), write them into `folder`
    and record it in `data` (the manifest dict): `precision` {weights, activations, kv, graphs, quantization,
    fp16}, the graphs' inputs/outputs and the `passes` log. Runs after any mitigation pass (its subgraphs are
    kept fp32 and never quantized). The embed graph is converted with the decoder: its table is as large as
    lm_head and an fp16 decoder rounds its input to fp16 anyway, so fp16 storage loses nothing and halves it;
    VisAlign's fusion in it stays fp32. -> {role: {pass: count}}."""
    say = say or (lambda msg: None)
    options.check()
    counts: dict[str, dict[str, int]] = {}
    record: dict = {}
    for role in ("vision", "embed", "decoder"):
        passes = _precision_passes(role, options)
        if not passes:
            continue
        graph = data["graphs"][role]
        src = (source or folder) / graph["file"]
        say(f"{role}: {', '.join(p.name for p in passes)}")
        model = ir.load(src)
        counts[role] = run_on_model(model, passes)
        # Written beside, then renamed over: the source may be this very file (weights read lazily from it).
        stage = Path(tempfile.mkdtemp(prefix=".precision-", dir=folder))
        try:
            ext = has_external_data(src)
            save_model(model, stage / graph["file"], ext)
            for name in (graph["file"], ext):
                if name:
                    os.replace(stage / name, folder / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        graph["inputs"], graph["outputs"] = describe_io(model)
        data["passes"] = list(data.get("passes") or []) + [{"graph": role, "pass": p.name, "count": p.count}
                                                           for p in passes]
        for p in passes:
            if isinstance(p, UnpackQkvPass):
                _record_unpacked(data, p.layers)
            elif p.name == "fp16":
                record.setdefault("fp16", {})[role] = p.record()
            else:
                record["quantization"] = p.record()
    half = options.precision == "fp16"
    data["precision"] = {
        "weights": options.quantize or options.precision,
        "activations": options.precision,
        "kv": "fp16" if half else "fp32",
        "graphs": {"vision": options.vision_precision, "embed": "fp16" if half else "fp32",
                   "decoder": options.precision + (f"+{options.quantize}" if options.quantize else "")},
        **record,
    }
    return counts


def _record_unpacked(data: dict, layers: Sequence[int]) -> None:
    """The fp16 conversion unpacked these layers' q/k/v (pack_qkv.HALF_REASON): the manifest's fused-form record says
    so, as it says of any layer the export left as it was."""
    attention = data.get("attention")
    if not layers or not isinstance(attention, dict):
        return
    attention.setdefault("fusions", {})["pack_qkv"] = 0
    left = attention.setdefault("left_as_exported", {})
    left["pack_qkv"] = {**(left.get("pack_qkv") or {}), HALF_REASON: sorted(layers)}


def _hidden_copy(folder: Path, source: Path, skip: set[str]) -> Path:
    """A hidden sibling of `folder` holding hard links (or copies) of `source`'s files except `skip`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.bake-", dir=folder.resolve().parent))
    os.chmod(tmp, folder.stat().st_mode & 0o777)
    for p in sorted(source.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name not in skip:
            _link_or_copy(p, tmp / p.name)
    return tmp


def _graph_files(data: dict, roles) -> set[str]:
    out = {MANIFEST_NAME}
    for role in roles:
        g = data["graphs"][role]
        out |= {g["file"]} | ({g["external_data"]} if g.get("external_data") else set())
    return out


def convert_precision(artifact_dir: str | os.PathLike, options: PrecisionOptions, mitigation: str | None = None,
                      bake_options: BakeOptions | None = None, progress: Progress | None = None,
                      verify: bool = True) -> Manifest:
    """`anchorrt bake OUT [--mitigation M] --precision/--quantize ...`: mitigation first (if given), then the
    precision passes, in one atomic write (hidden sibling folders, then a rename). Every rewritten graph is read
    from one folder and written into another, so nothing is written through a hard link. -> the new Manifest."""
    say = progress or (lambda msg: None)
    options.check()
    folder = Path(artifact_dir)
    manifest = Manifest.load(folder, verify=verify)
    data = dict(manifest.data)
    methods = parse_methods(mitigation) if mitigation else []
    if methods:
        _check_not_baked(methods, data, str(folder))
        _check_mitigation_bakeable(data, str(folder))
    if not options.changes_anything:
        raise PassError("nothing to convert: give --precision fp16 and/or --quantize int4|int8")
    _check_convertible(data, str(folder))
    roles = [r for r in ("vision", "embed", "decoder") if _precision_passes(r, options)]
    staged: list[Path] = []
    try:
        source = folder
        if methods:
            say(f"baking {', '.join(methods)}")
            staged.append(_hidden_copy(folder, folder, _graph_files(data, ["decoder"])))
            transform_into(staged[-1], data, _passes(methods, bake_options or BakeOptions()), source=folder, say=say,
                           require_match=True)
            source = staged[-1]
        staged.append(_hidden_copy(folder, source, _graph_files(data, roles)))
        counts = convert_into(staged[-1], data, options, source=source, say=say)
        written = write_manifest(staged[-1], data)
        replace_folder(staged[-1], folder)
        staged.pop()
    finally:
        for tmp in staged:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"converted {folder}: " + "; ".join(f"{role} " + ", ".join(f"{k} {v}" for k, v in c.items())
                                            for role, c in counts.items()))
    return Manifest(folder, written)
