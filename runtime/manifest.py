"""The artifact manifest: the only contract between export, the graph passes and the runtime.

`manifest.json` sits in the artifact folder beside the ONNX graphs and the tokenizer files. It records the
model's dimensions, special tokens, prompt format, preprocessing, each graph's inputs/outputs, what the
graph passes baked, the sha256 of every file, and the versions that made it. The runtime reads it and never
guesses; it refuses a folder whose files do not match their recorded hashes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError

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
        raise ArtifactError(f"manifest field {what} must be a plain file name, got {name!r}; re-export the model")
    return name


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise ArtifactError(f"manifest field {what} is missing or invalid; re-export the model")


def _pos_int(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    _expect(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{where}.{key}")
    return v


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
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise ArtifactError(f"'{path}' is not valid JSON ({exc.__class__.__name__}); re-export the model") from None
        validate(data)
        m = cls(folder, data)
        if verify:
            m.verify_files()
        return m

    def verify_files(self) -> None:
        """Every recorded file exists and matches its sha256; no graph or tokenizer file is unrecorded."""
        files = self.data["files"]
        for name, digest in files.items():
            p = self.folder / name
            if not p.is_file():
                raise ArtifactError(f"artifact file '{name}' is missing from '{self.folder}'; re-export the model")
            if file_sha256(p) != digest:
                raise ArtifactError(
                    f"artifact file '{name}' was modified (sha256 mismatch); re-export, or pass --no-verify if you changed it on purpose"
                )


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def validate(data: Any) -> None:
    """Structural checks: types, ranges and file names. Raises ArtifactError naming the first bad field."""
    _expect(isinstance(data, dict), "<root>")
    _expect(data.get("format") == FORMAT, "format")
    _expect(data.get("format_version") == FORMAT_VERSION, "format_version")
    dims = data.get("dims")
    _expect(isinstance(dims, dict), "dims")
    for key in ("hidden_size", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "max_position_embeddings", "image_size"):
        _pos_int(dims, key, "dims")
    _expect(dims["num_heads"] % dims["num_kv_heads"] == 0, "dims.num_kv_heads")
    tokens = data.get("tokens")
    _expect(isinstance(tokens, dict), "tokens")
    _pos_int(tokens, "tokens_per_image", "tokens")
    for key in ("image_token_id", "pad_token_id"):
        v = tokens.get(key)
        _expect(isinstance(v, int) and not isinstance(v, bool) and 0 <= v, f"tokens.{key}")
    eos = tokens.get("eos_token_ids")
    _expect(isinstance(eos, list) and all(isinstance(e, int) and e >= 0 for e in eos), "tokens.eos_token_ids")
    _expect(isinstance(tokens.get("image_token"), str) and tokens["image_token"], "tokens.image_token")
    prompt = data.get("prompt")
    _expect(isinstance(prompt, dict) and isinstance(prompt.get("template"), str), "prompt.template")
    _expect("{prompt}" in prompt["template"], "prompt.template")
    _expect(isinstance(data.get("preprocessing"), dict), "preprocessing")
    graphs = data.get("graphs")
    _expect(isinstance(graphs, dict), "graphs")
    for role in GRAPH_ROLES:
        g = graphs.get(role)
        _expect(isinstance(g, dict), f"graphs.{role}")
        _safe_name(g.get("file"), f"graphs.{role}.file")
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
    for role in GRAPH_ROLES:
        _expect(graphs[role]["file"] in files, f"files (no hash for graphs.{role}.file)")
    _expect(tok["file"] in files, "files (no hash for tokenizer.file)")
    _check_finite(data, "<root>")


def _check_finite(obj: Any, where: str) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ArtifactError(f"manifest field {where} is not a finite number; re-export the model")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")
