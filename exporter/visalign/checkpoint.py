"""The VisAlign checkpoint format, and the export hook that bakes the fusion into the embed graph.

A VisAlign checkpoint is a Hugging Face LLaVA folder plus the fusion weights and a config entry naming them
(METHODS.md, VisAlign):

    config.json            {..., "visalign": {"weights": "visalign.safetensors", "hidden_size": 4096,
                                              "init": "identity", "format_version": 1, "training": {...}}}
    model.safetensors      the LLaVA weights (projector and, after stage 2, the LLM trained with the fusion)
    visalign.safetensors   visalign.weight [d, 2d] (e_t columns first), visalign.bias [d], float32

Nothing here imports torch: the file is read with `safetensors.numpy` through the graph pass's reader, so the
checkpoint, the export hook and `anchorrt bake --visalign` agree on one format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anchorrt.graph_passes.visalign import WEIGHTS_FILE, FusionWeights, read_fusion_weights
from anchorrt.runtime.errors import CheckpointError

CONFIG_KEY = "visalign"
FORMAT_VERSION = 1
INITS = ("identity", "xavier")


@dataclass(frozen=True)
class VisAlignEntry:
    weights_path: Path
    hidden_size: int
    init: str
    raw: dict


def model_hidden_size(model_dir: Path, config: dict) -> int:
    """The LLM's hidden size. transformers drops default values from a saved config (llava-1.5-7b's text_config
    has no hidden_size: Llama's default 4096), so fall back to transformers' own reading."""
    text = config.get("text_config") or {}
    if isinstance(text.get("hidden_size"), int):
        return text["hidden_size"]
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).text_config.hidden_size)


def read_entry(model_dir: str | Path, config: dict | None = None) -> VisAlignEntry | None:
    """The checkpoint's VisAlign entry (None when it has none), checked against the model's hidden size."""
    model_dir = Path(model_dir)
    if config is None:
        try:
            config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read '{model_dir / 'config.json'}' ({exc.__class__.__name__})") from None
    entry = config.get(CONFIG_KEY)
    if entry is None:
        return None
    where = f"'{model_dir / 'config.json'}' entry \"{CONFIG_KEY}\""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} must be an object like {{\"weights\": \"{WEIGHTS_FILE}\", \"hidden_size\": d}}")
    name = entry.get("weights")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise CheckpointError(f"{where} needs \"weights\": a file name in the checkpoint folder, got {name!r}")
    hidden = entry.get("hidden_size")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
        raise CheckpointError(f"{where} needs \"hidden_size\": a positive integer, got {hidden!r}")
    model_hidden = model_hidden_size(model_dir, config)
    if hidden != model_hidden:
        raise CheckpointError(f"{where} is for hidden size {hidden} but the model's is {model_hidden}; "
                              "the fusion was trained for another model")
    init = entry.get("init", "identity")
    return VisAlignEntry(model_dir / name, hidden, str(init), dict(entry))


def load_fusion_weights(model_dir: str | Path, config: dict | None = None) -> tuple[VisAlignEntry, FusionWeights] | None:
    """Entry and weights of a VisAlign checkpoint (None for a plain LLaVA folder)."""
    entry = read_entry(model_dir, config)
    if entry is None:
        return None
    return entry, read_fusion_weights(entry.weights_path, hidden_size=entry.hidden_size)


def write_entry(folder: str | Path, hidden_size: int, init: str, training: dict | None = None) -> dict:
    """Add the VisAlign entry to `folder/config.json` (the weights file is written by the caller)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config[CONFIG_KEY] = {"weights": WEIGHTS_FILE, "hidden_size": int(hidden_size), "init": init,
                          "format_version": FORMAT_VERSION, **({"training": training} if training else {})}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return config[CONFIG_KEY]


def export_hook(ckpt) -> Callable[[Path, dict], None] | None:
    """For `export_model`: None for a plain checkpoint; for a VisAlign one, a hook `(tmp_folder, manifest)` that
    runs the graph pass on the exported embed graph (the decoder is left as it is). The entry and the weights
    are checked here, before the slow export, so a mismatched hidden size fails at once."""
    loaded = load_fusion_weights(ckpt.path, ckpt.config)
    if loaded is None:
        return None
    _, weights = loaded

    def bake(tmp: Path, manifest: dict) -> None:
        from anchorrt.graph_passes.visalign import bake_visalign

        bake_visalign(tmp, manifest, weights, origin="export")

    return bake
