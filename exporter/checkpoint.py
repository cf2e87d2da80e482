"""Checks a Hugging Face checkpoint folder before anything heavy is imported or written.

Every problem becomes a one-line `CheckpointError` naming the fix: a missing folder, a missing or broken
config.json, an architecture we have no exporter for, pickle-only weights (refused unless allowed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from anchorrt.runtime.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict
    architecture: str
    weight_files: tuple[Path, ...]
    uses_pickle: bool


def inspect_checkpoint(model_dir: str | Path, allow_pickle: bool = False) -> Checkpoint:
    from anchorrt.exporter.registry import supported_architectures

    path = Path(model_dir)
    if not path.exists():
        raise CheckpointError(f"model folder '{path}' does not exist; pass the folder that holds config.json")
    if not path.is_dir():
        raise CheckpointError(f"'{path}' is a file, not a model folder; pass the folder that holds config.json")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"'{path}' has no config.json; is this a Hugging Face checkpoint folder?")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{cfg_path}' is not valid JSON ({exc.__class__.__name__}); restore the file") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"'{cfg_path}' does not hold a JSON object; restore the file")
    archs = config.get("architectures") or []
    supported = supported_architectures()
    arch = archs[0] if archs else config.get("model_type", "<none>")
    if arch not in supported:
        from anchorrt.exporter.registry import refusal_for

        reason = refusal_for(arch) if isinstance(arch, str) else None
        if reason is not None:
            raise CheckpointError(reason)
        raise CheckpointError(
            f"architecture '{arch}' is not supported; supported: {', '.join(supported)}"
        )
    safes = tuple(sorted(path.glob("*.safetensors")))
    pickles = tuple(sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()))
    if not safes and not pickles:
        raise CheckpointError(f"'{path}' has no weights (*.safetensors); copy the model weights into the folder")
    if not safes:
        if not allow_pickle:
            raise CheckpointError(
                f"'{path}' has only pickle weights ({pickles[0].name}); pickle can run code when loaded: "
                "convert to safetensors, or pass --allow-pickle if you trust the source"
            )
        return Checkpoint(path, config, arch, pickles, True)
    for f in safes:
        check_safetensors(f)
    return Checkpoint(path, config, arch, safes, False)


def check_safetensors(path: Path) -> None:
    """Header sanity without loading tensors: the JSON header parses and the data section covers every tensor."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        raise CheckpointError(f"weights file '{path.name}' is corrupt (unreadable safetensors header); re-download it") from None
    if 8 + n + end != size:
        raise CheckpointError(
            f"weights file '{path.name}' is truncated or corrupt ({size} bytes, expected {8 + n + end}); re-download it"
        )
