"""The artifact manifest: the only contract between export, the graph passes and the runtime.

`manifest.json` sits in the artifact folder beside the ONNX graphs and the tokenizer files. It records the
model's dimensions, special tokens, prompt format, preprocessing, each graph's inputs/outputs, what the
graph passes baked, the sha256 of every file, and the versions that made it. The runtime reads it and never
guesses; it refuses a folder whose files do not match their recorded hashes.

An artifact folder may come from an untrusted source (SECURITY.md). Before any graph reaches onnxruntime,
`Manifest.load` checks, with or without the sha256 check (`verify=False` skips only the hashes):
- the manifest's schema: types, ranges (with upper bounds, so that a forged manifest cannot ask the runtime for
  terabytes of KV cache) and file names without path separators;
- every recorded file is a regular file inside the folder (a symlink that leads out of it, a FIFO or a device is
  refused: reading either would read outside the artifact or block for ever);
- every tensor of every graph whose data lives outside the .onnx file (`external_data` `location`) names a plain
  file of the folder that the manifest records, so its hash is checked too: `../x`, `/etc/passwd` and the like are
  refused here, whatever the onnxruntime version would do with them. The .onnx files are walked with a small
  protobuf wire-format reader (field numbers from onnx/onnx.proto), not with the onnx package, which the runtime
  does not install;
- the decoder has one past key and value input per layer the manifest declares, with its head count and head size.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anchorrt.runtime.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
FORMAT = "anchorrt-artifact"
FORMAT_VERSION = 1
GRAPH_ROLES = ("vision", "embed", "decoder")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_folder(folder: Path) -> dict[str, str]:
    """sha256 of every regular file in `folder` (flat), the manifest itself excepted."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST_NAME or p.name.startswith("."):
            continue
        if p.is_dir():
            raise ArtifactError(f"unexpected sub-folder '{p.name}' in artifact folder '{folder}'; artifacts are flat")
        out[p.name] = file_sha256(p)
    return out


def write_manifest(folder: Path, data: dict) -> dict:
    """Fill in `files` (sha256 of everything in the folder) and write manifest.json atomically."""
    data = dict(data)
    data["files"] = hash_folder(folder)
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_NAME)
    return data


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out` atomically (renames on one filesystem); an existing `out` is moved
    aside first and restored if the swap fails, so readers see the old folder or the new one, never a mix."""
    if not out.exists():
        os.replace(tmp, out)
        return
    backup = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _safe_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise ArtifactError(f"manifest field {_printable(what)} must be a plain file name, got {name!r}; re-export the model")
    return name


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise ArtifactError(f"manifest field {_printable(what)} is missing or invalid; re-export the model")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pos_int(d: dict, key: str, where: str, limit: int | None = None) -> int:
    v = d.get(key)
    _expect(_is_int(v) and v > 0 and (limit is None or v <= limit), f"{where}.{key}")
    return v


# Upper bounds on the dimensions, far above any released LLaVA-style model (LLaVA-1.5-13B: 40 layers, 5120 wide,
# 4096 positions). They bound what a forged manifest can make the runtime allocate before a graph runs.
DIM_LIMITS = {
    "hidden_size": 65_536, "vocab_size": 4_194_304, "num_layers": 1_024, "num_heads": 1_024, "num_kv_heads": 1_024,
    "head_dim": 1_024, "max_position_embeddings": 1_048_576, "image_size": 8_192,
}


def _check_mitigation_record(method: Any, record: Any) -> None:
    """The parts of a baked method's record that the runtime reads: dicts where it expects dicts, and finite
    numbers for the parameter defaults (the runtime feeds them to the graph)."""
    where = f"mitigation.{method}"
    _expect(isinstance(method, str) and isinstance(record, dict), where)
    for part in ("inputs", "parameters") + (("layers",) if method in ("clva", "sevi") else ()):
        _expect(isinstance(record.get(part, {}), dict), f"{where}.{part}")
    for name, spec in record.get("inputs", {}).items():
        _expect(isinstance(spec, dict), f"{where}.inputs.{name}")
    for name, spec in record.get("parameters", {}).items():
        _expect(isinstance(spec, dict), f"{where}.parameters.{name}")
        default = spec.get("default", 0.0)
        _expect(isinstance(default, (int, float)) and not isinstance(default, bool) and math.isfinite(default)
                and abs(default) <= 3.4e38, f"{where}.parameters.{name}.default")


@dataclass
class Manifest:
    folder: Path
    data: dict = field(repr=False)

    # -- typed views of the fields the runtime uses -----------------------------------------------------
    @property
    def dims(self) -> dict:
        return self.data["dims"]

    @property
    def tokens(self) -> dict:
        return self.data["tokens"]

    @property
    def prompt(self) -> dict:
        return self.data["prompt"]

    @property
    def preprocessing(self) -> dict:
        return self.data["preprocessing"]

    @property
    def mitigation(self) -> dict:
        return self.data.get("mitigation", {})

    @property
    def attention_form(self) -> str:
        """"gqa": fused GroupQueryAttention whose KV cache is written in place (graph_passes/fuse_attention.py);
        "unfused": the exporter's form (past in, past+new out). Artifacts from before the field are unfused."""
        return self.data.get("attention", {}).get("form", "unfused")

    @property
    def row_lengths(self) -> bool:
        """The fused decoder reads each row's cache length from its mask (`attention.row_lengths`, set by the fused
        form since issue 18): a row may hold fewer slots than the batch's longest (runtime/iava.py compacts IAVA's
        contrastive rows). Older fused artifacts give every row total_length - 1 slots."""
        attention = self.data.get("attention", {})
        return attention.get("form") == "gqa" and attention.get("row_lengths") is True

    @property
    def kv_precision(self) -> str:
        """The KV cache's dtype: `precision.kv` since issue 6; older artifacts: the activations'; unconverted: fp32."""
        precision = self.data.get("precision", {})
        return precision.get("kv", precision.get("activations", "fp32"))

    def graph(self, role: str) -> dict:
        return self.data["graphs"][role]

    def graph_path(self, role: str) -> Path:
        return self.folder / self.data["graphs"][role]["file"]

    def save(self) -> None:
        self.data = write_manifest(self.folder, self.data)

    # -- loading -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> Manifest:
        folder = Path(folder)
        if not folder.is_dir():
            raise ArtifactError(f"artifact folder '{folder}' does not exist; run `anchorrt export MODEL -o {folder}` first")
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(f"'{folder}' has no {MANIFEST_NAME}; it is not an AnchorRT artifact folder (re-export)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
            validate(data)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise ArtifactError(f"'{path}' is not valid JSON ({exc.__class__.__name__}); re-export the model") from None
        except RecursionError:  # found by tests/test_fuzz.py: "[[[[..." deeper than Python's recursion limit
            raise ArtifactError(f"'{path}' is nested too deeply to be a manifest; re-export the model") from None
        m = cls(folder, data)
        m.check_files()
        if verify:
            m.verify_files()
        return m

    def check_files(self) -> None:
        """The checks that do not read whole files (done even with verify=False): every recorded file is a regular
        file inside the folder; the graphs' external data stays in the folder; the decoder's KV inputs match dims."""
        root = self.folder.resolve()
        for name in self.data["files"]:
            p = self.folder / name
            if not os.path.lexists(p):
                continue  # verify_files names it; with --no-verify onnxruntime or the tokenizer will
            real = p.resolve()
            if real.parent != root and root not in real.parents:
                raise ArtifactError(f"artifact file '{_printable(name)}' is a link to '{_printable(str(real))}', outside the "
                                    f"artifact folder; refusing it (copy the file into the folder instead)")
            try:
                mode = os.stat(real).st_mode
            except OSError:
                raise ArtifactError(f"artifact file '{_printable(name)}' cannot be read; re-export the model") from None
            if not stat.S_ISREG(mode):
                raise ArtifactError(f"artifact file '{_printable(name)}' is not a regular file; re-export the model")
        for role in GRAPH_ROLES:
            path = self.graph_path(role)
            if path.is_file():
                check_onnx_file(path, self.data["files"], self.dims if role == "decoder" else None)

    def verify_files(self) -> None:
        """Every recorded file exists and matches its sha256; no graph or tokenizer file is unrecorded."""
        files = self.data["files"]
        for name, digest in files.items():
            p = self.folder / name
            if not p.is_file():
                raise ArtifactError(f"artifact file '{_printable(name)}' is missing from '{self.folder}'; re-export the model")
            if file_sha256(p) != digest:
                raise ArtifactError(
                    f"artifact file '{name}' was modified (sha256 mismatch); re-export, or pass --no-verify if you changed it on purpose"
                )


def _printable(text: str) -> str:
    """Keep messages on one line whatever a forged file name holds."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)[:200]


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


ATTENTION_FORMS = ("gqa", "unfused")  # manifest["attention"]["form"]; see Manifest.attention_form


def validate(data: Any) -> None:
    """Structural checks: types, ranges and file names. Raises ArtifactError naming the first bad field."""
    _expect(isinstance(data, dict), "<root>")
    _expect(data.get("format") == FORMAT, "format")
    version = data.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        made_by = data.get("versions", {}).get("anchorrt") if isinstance(data.get("versions"), dict) else None
        by = f" (written by AnchorRT {_printable(str(made_by))})" if made_by else ""
        raise ArtifactError(f"this artifact's manifest format {version}{by} is newer than this AnchorRT reads "
                            f"(format {FORMAT_VERSION}); upgrade AnchorRT (pip install -U anchorrt) or re-export the "
                            "model with this version")
    _expect(version == FORMAT_VERSION, "format_version")
    dims = data.get("dims")
    _expect(isinstance(dims, dict), "dims")
    for key, limit in DIM_LIMITS.items():
        _pos_int(dims, key, "dims", limit)
    _expect(dims["num_heads"] % dims["num_kv_heads"] == 0, "dims.num_kv_heads")
    tokens = data.get("tokens")
    _expect(isinstance(tokens, dict), "tokens")
    context = data.get("context_length", dims["max_position_embeddings"])
    _expect(_is_int(context) and 0 < context <= dims["max_position_embeddings"], "context_length")
    _pos_int(tokens, "tokens_per_image", "tokens", context - 1)
    vocab = dims["vocab_size"]
    for key in ("image_token_id", "pad_token_id"):
        v = tokens.get(key)
        _expect(_is_int(v) and 0 <= v < vocab, f"tokens.{key}")
    eos = tokens.get("eos_token_ids")
    _expect(isinstance(eos, list) and all(_is_int(e) and 0 <= e < vocab for e in eos), "tokens.eos_token_ids")
    _expect(isinstance(tokens.get("image_token"), str) and tokens["image_token"], "tokens.image_token")
    prompt = data.get("prompt")
    _expect(isinstance(prompt, dict) and isinstance(prompt.get("template"), str), "prompt.template")
    _expect("{prompt}" in prompt["template"], "prompt.template")
    placeholder = prompt.get("image_placeholder", tokens["image_token"])
    _expect(isinstance(placeholder, str) and placeholder != "", "prompt.image_placeholder")
    _expect(isinstance(prompt.get("image_separator", ""), str), "prompt.image_separator")
    _expect(isinstance(data.get("preprocessing"), dict), "preprocessing")
    for key in ("precision", "mitigation"):
        _expect(isinstance(data.get(key, {}), dict), key)
    for method, record in data.get("mitigation", {}).items():
        _check_mitigation_record(method, record)
    attention = data.get("attention", {})
    _expect(isinstance(attention, dict), "attention")
    _expect(attention.get("form", "unfused") in ATTENTION_FORMS, "attention.form")
    _expect(isinstance(attention.get("row_lengths", False), bool), "attention.row_lengths")
    serving = data.get("serving", {})  # optional (issue 19): what a Triton repository of this artifact uses
    _expect(isinstance(serving, dict), "serving")
    if "max_batch_size" in serving:
        _pos_int(serving, "max_batch_size", "serving", 4096)
    graphs = data.get("graphs")
    _expect(isinstance(graphs, dict), "graphs")
    extra_roles = tuple(r for r in graphs if r not in GRAPH_ROLES)  # an architecture's own graphs (InstructBLIP's qformer)
    for role in GRAPH_ROLES + extra_roles:
        g = graphs.get(role)
        _expect(isinstance(g, dict), f"graphs.{role}")
        _safe_name(g.get("file"), f"graphs.{role}.file")
        if g.get("external_data") is not None:
            _safe_name(g["external_data"], f"graphs.{role}.external_data")
        for io in ("inputs", "outputs"):
            _expect(isinstance(g.get(io), list) and all(isinstance(x, dict) and isinstance(x.get("name"), str)
                                                         for x in g[io]), f"graphs.{role}.{io}")
    tok = data.get("tokenizer")
    _expect(isinstance(tok, dict), "tokenizer")
    _safe_name(tok.get("file"), "tokenizer.file")
    files = data.get("files")
    _expect(isinstance(files, dict) and files, "files")
    for name, digest in files.items():
        _safe_name(name, "files")
        _expect(isinstance(digest, str) and len(digest) == 64, f"files[{name!r}]")
    for role in GRAPH_ROLES + extra_roles:
        _expect(graphs[role]["file"] in files, f"files (no hash for graphs.{role}.file)")
        if graphs[role].get("external_data") is not None:
            _expect(graphs[role]["external_data"] in files, f"files (no hash for graphs.{role}.external_data)")
    _expect(tok["file"] in files, "files (no hash for tokenizer.file)")
    for method, record in data.get("mitigation", {}).items():  # a method baked outside the decoder names its graph
        _expect(record.get("graph", "decoder") in graphs, f"mitigation.{method}.graph")
    _check_finite(data, "<root>")


def _check_finite(obj: Any, where: str) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ArtifactError(f"manifest field {_printable(where)} is not a finite number; re-export the model")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


# -- ONNX files, read without the onnx package -----------------------------------------------------------------------
# Protobuf wire format: a message is a run of (key varint = field << 3 | wire type, value). Wire type 0 is a varint,
# 1 eight bytes, 2 a varint length then that many bytes (strings, bytes, sub-messages), 5 four bytes. Field numbers
# from onnx/onnx.proto. Only messages that can hold tensors are descended into; raw tensor bytes are skipped by
# their length, so a 2 GB graph costs one pass over its (few thousand) message headers.
_SUBMESSAGES = {
    "model": {7: "graph", 20: "training", 25: "function"},  # ModelProto.graph / training_info / functions
    "training": {1: "graph", 2: "graph"},  # TrainingInfoProto.initialization / algorithm
    "function": {7: "node"},  # FunctionProto.node
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto.node / initializer / sparse_initializer
    "node": {5: "attribute"},  # NodeProto.attribute
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},  # t g tensors graphs
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto.values / indices
}
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14  # TensorProto.name / external_data / data_location
_GRAPH_INPUT = 11  # GraphProto.input: ValueInfoProto(name=1, type=2: TypeProto(tensor_type=1: (shape=2: (dim=1))))
_MAX_DEPTH = 64  # graphs nest in If/Loop/Scan attributes; a forged file could nest them without end


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """Yield (field number, wire type, value): the int of a varint, (start, end) of a length-delimited field."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed
            yield number, wire, (pos, pos + n)
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed
        else:
            raise _Malformed


def _text(buf, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _external_tensors(buf, kind: str, start: int, end: int, depth: int = 0):
    """Yield (tensor name, external-data location or None) for every tensor stored outside the file."""
    if depth > _MAX_DEPTH:
        raise _Malformed
    if kind == "tensor":
        name, location, external = "", None, False
        for number, wire, value in _fields(buf, start, end):
            if number == _TENSOR_NAME and wire == 2:
                name = _text(buf, value)
            elif number == _TENSOR_LOCATION and wire == 0:
                external = external or value == 1  # DataLocation.EXTERNAL
            elif number == _TENSOR_EXTERNAL and wire == 2:
                external = True
                entry = {k: _text(buf, v) for k, w, v in _fields(buf, *value) if w == 2}  # key = 1, value = 2
                if entry.get(1) == "location":
                    location = entry.get(2, "")
        if external:
            yield name, location
        return
    children = _SUBMESSAGES[kind]
    for number, wire, value in _fields(buf, start, end):
        if wire == 2 and number in children:
            yield from _external_tensors(buf, children[number], *value, depth + 1)


def _graph_inputs(buf, start: int, end: int) -> dict[str, list[int | None]]:
    """Top-level graph inputs: name -> static dims (None where the dim is symbolic or missing)."""
    out: dict[str, list[int | None]] = {}
    for number, wire, value in _fields(buf, start, end):
        if number != _GRAPH_INPUT or wire != 2:
            continue
        name, dims = "", []
        for n1, w1, v1 in _fields(buf, *value):
            if n1 == 1 and w1 == 2:
                name = _text(buf, v1)
            elif n1 == 2 and w1 == 2:  # TypeProto
                for n2, w2, v2 in _fields(buf, *v1):
                    if n2 == 1 and w2 == 2:  # tensor_type
                        for n3, w3, v3 in _fields(buf, *v2):
                            if n3 == 2 and w3 == 2:  # shape
                                for n4, w4, v4 in _fields(buf, *v3):
                                    if n4 == 1 and w4 == 2:  # dim: dim_value = 1 (varint), dim_param = 2
                                        static = [v for k, w, v in _fields(buf, *v4) if k == 1 and w == 0]
                                        dims.append(static[0] if static else None)
        out[name] = dims
    return out


def check_onnx_file(path: str | os.PathLike, recorded: dict | None = None, dims: dict | None = None) -> None:
    """Refuse an ONNX file whose external data would be read from anywhere but a plain file of its own folder
    (a recorded one, when `recorded` is the manifest's `files`); with `dims` (the decoder), also one whose past
    key/value inputs disagree with the manifest's dims. The backend calls it before onnxruntime opens a graph."""
    path = Path(path)
    name = path.name
    root = path.parent.resolve()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph = None
            for number, wire, value in _fields(buf, 0, len(buf)):
                if number == 7 and wire == 2:
                    graph = value
            if graph is None:
                raise _Malformed
            for tensor, location in _external_tensors(buf, "model", 0, len(buf)):
                if location is None or location != os.path.basename(location) or location in ("", ".", "..") \
                        or "\\" in location or "\x00" in location or os.path.isabs(location):
                    raise ArtifactError(
                        f"graph '{name}' reads tensor '{_printable(tensor)}' from '{_printable(str(location))}', "
                        "outside the artifact folder; refusing to load it (re-export the model from a trusted source)")
                real = (path.parent / location).resolve()
                if real.parent != root:
                    raise ArtifactError(
                        f"graph '{name}' reads tensor '{_printable(tensor)}' from '{_printable(location)}', a link to "
                        f"'{_printable(str(real))}' outside the artifact folder; refusing to load it (copy the file in)")
                if recorded is not None and location not in recorded:
                    raise ArtifactError(
                        f"graph '{name}' reads tensor '{_printable(tensor)}' from '{_printable(location)}', a file the "
                        "manifest does not record (so its hash is not checked); re-export the model")
            inputs = _graph_inputs(buf, *graph) if dims is not None else {}
    except (_Malformed, ValueError, OSError, RecursionError):
        raise ArtifactError(f"graph '{name}' is not a valid ONNX file; re-export the model") from None
    if dims is not None:
        _check_kv_inputs(name, inputs, dims)


def _check_kv_inputs(name: str, inputs: dict[str, list[int | None]], dims: dict) -> None:
    past = {k: v for k, v in inputs.items() if k.startswith("past_key_values.")}
    want = {f"past_key_values.{i}.{kind}" for i in range(dims["num_layers"]) for kind in ("key", "value")}
    if set(past) != want:
        raise ArtifactError(f"graph '{name}' has {len(past)} past key/value inputs but the manifest declares "
                            f"{dims['num_layers']} layers ({len(want)} expected); re-export the model")
    for key, shape in past.items():
        expect = [None, dims["num_kv_heads"], None, dims["head_dim"]]  # [B, KVH, P, D]
        if len(shape) != 4 or any(e is not None and s != e for s, e in zip(shape, expect)):
            raise ArtifactError(f"graph '{name}' input {key} has shape {shape}, but the manifest declares "
                                f"{dims['num_kv_heads']} KV heads of size {dims['head_dim']}; re-export the model")
