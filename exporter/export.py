"""`anchorrt export`: a Hugging Face checkpoint folder → an artifact folder (ONNX graphs + manifest + tokenizer).

Everything is written to a hidden temporary folder beside the destination and renamed into place at the end,
so an error or an interrupt leaves no partial output and never touches an existing artifact folder.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from anchorrt.runtime.errors import AnchorError, ArtifactError, CheckpointError
from anchorrt.runtime.manifest import FORMAT, FORMAT_VERSION, Manifest, replace_folder, write_manifest

# ONNX protobuf files cannot exceed 2 GiB; keep a margin and move weights to an external-data file above it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")

Progress = Callable[[str], None]


def versions() -> dict[str, str]:
    import importlib.metadata as md

    from anchorrt import __version__

    out = {"python": platform.python_version(), "anchorrt": __version__}  # the package's own, installed or not
    for dist in ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    return describe(model.graph.input), describe(model.graph.output)


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its own progress lines and warnings; keep them and show them only if the export fails."""
    buf = io.StringIO()
    torch_logger = logging.getLogger("torch.onnx")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    with contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield buf
        except Exception:
            sys.stderr.write(buf.getvalue()[-4000:])
            raise
        finally:
            torch_logger.setLevel(level)


def _name_total_length(path: Path) -> None:
    """torch names the present-KV length 'sequence + past_length' or 'past_length + sequence' at random; call it
    what the attention mask calls it, so every tool (and TensorRT's profiles) sees one symbol."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for out in model.graph.output:
        if out.name.startswith("present."):
            dim = out.type.tensor_type.shape.dim[2]
            if dim.dim_param and dim.dim_param != "total_length":
                dim.dim_param = "total_length"
                changed = True
    if changed:  # tensors keep their external-data references, so this rewrites only the graph proto
        onnx.save(model, str(path))


def _export_graph(spec, path: Path, opset: int) -> None:
    import torch

    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            spec.module, spec.args, dynamo=True, opset_version=opset, optimize=True, verbose=False,
            input_names=spec.input_names, output_names=spec.output_names, dynamic_shapes=spec.dynamic_shapes,
        )
        size = sum(p.numel() * p.element_size() for p in spec.module.parameters())
        program.save(str(path), external_data=size > EXTERNAL_DATA_THRESHOLD)
    _name_total_length(path)


def export_model(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int = 18,
    dtype: str = "fp32",
    allow_pickle: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    after_export: Callable[[Path, dict], None] | None = None,
    mitigation: str | list[str] | None = None,
    bake_options=None,
    precision_options=None,
    attention: str | None = None,
) -> Manifest:
    """Export `model_dir` to `out_dir`. `after_export(tmp_folder, manifest_data)` runs before the final rename
    (the CLI uses it to bake graph passes into the same atomic write). Every graph gets deterministic node names
    (graph_passes/naming.py); `mitigation` ("clva", "sevi", "clva,sevi") bakes those methods into the decoder with
    `bake_options` (a graph_passes.bake.BakeOptions; None: METHODS.md defaults) in the same atomic write.

    Precision: the graphs are always traced in fp32; `precision_options` (graph_passes.bake.PrecisionOptions:
    fp16 conversion, int4/int8 quantization) run as graph passes after mitigation, so mitigation subgraphs stay
    fp32 and are never quantized. `dtype="fp16"` (the former torch-fp16 export) is an alias of
    PrecisionOptions(precision="fp16").

    `attention`: "fused" (the default at opset 18: GroupQueryAttention with an in-place KV cache,
    graph_passes/fuse_attention.py) or "unfused" (the exporter's opset-18/23 form, for debugging); the manifest
    records the form and the runtime follows it."""
    from anchorrt.exporter.checkpoint import inspect_checkpoint
    from anchorrt.exporter.visalign.checkpoint import export_hook as visalign_export_hook

    say = progress or (lambda msg: None)
    out = Path(out_dir)
    if opset not in (18, 23):
        raise AnchorError(f"opset {opset} is not supported; use 18 (MatMul/Softmax attention) or 23 (Attention op)")
    if attention is None:
        attention = "fused" if opset == 18 else "unfused"
    if attention not in ("fused", "unfused"):
        raise AnchorError(f"--attention {attention} is not supported; use fused or unfused")
    if attention == "fused" and opset != 18:
        raise AnchorError("--attention fused is made from the opset-18 form; use --opset 18 or --attention unfused")
    if dtype not in ("fp32", "fp16"):
        raise AnchorError(f"export dtype '{dtype}' is not supported; use fp32 or fp16")
    from anchorrt.graph_passes.bake import PrecisionOptions, convert_into

    if precision_options is None:
        precision_options = PrecisionOptions(precision=dtype)
    elif dtype == "fp16" and precision_options.precision != "fp16":
        raise AnchorError("--dtype fp16 is an alias of --precision fp16; give one of them")
    precision_options.check()  # bad choices fail before the slow export
    if out.exists() and not force:
        raise ArtifactError(f"output folder '{out}' already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path '{out}' is a file; choose a folder name")
    ckpt = inspect_checkpoint(model_dir, allow_pickle=allow_pickle)
    from anchorrt.graph_passes.bake import export_hook as passes_hook
    from anchorrt.graph_passes.fuse_attention import FORM_FUSED, FORM_UNFUSED

    run_graph_passes = passes_hook(mitigation, bake_options, say,
                                   attention=FORM_FUSED if attention == "fused" else FORM_UNFUSED)  # checks the method names before the slow export
    _check_before_loading(ckpt, mitigation, bake_options)
    visalign = visalign_export_hook(ckpt)  # a VisAlign checkpoint: fusion into the embed graph (checked now, baked below)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the artifact gets the user's usual permissions
    try:
        manifest = _export_into(ckpt, tmp, opset, say)
        steps = ["node names"] + (["fused attention (GroupQueryAttention)"] if attention == "fused" else []) + \
            ([f"baking {mitigation if isinstance(mitigation, str) else ','.join(mitigation)}"] if mitigation else [])
        steps += (["VisAlign fusion"] if visalign is not None else []) + \
            (["precision"] if precision_options.changes_anything else []) + ["manifest"]
        say(f"[5/5] finishing: {', '.join(steps)}")
        if visalign is not None:
            visalign(tmp, manifest)
        run_graph_passes(tmp, manifest)  # node names in every graph; CLVA/SEVI if asked
        if precision_options.changes_anything:  # after mitigation: its subgraphs stay fp32
            say("converting precision: " + ", ".join(filter(None, [precision_options.precision,
                                                                   precision_options.quantize])))
            convert_into(tmp, manifest, precision_options, say=say)
        if after_export is not None:
            after_export(tmp, manifest)
        data = write_manifest(tmp, manifest)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out} ({sum((out / f).stat().st_size for f in data['files']) / 1e6:.1f} MB)")
    return Manifest(out, data)


def prompt_pad_id(tokenizer, fallback: int) -> int:
    """The id that left-pads prompts: the checkpoint tokenizer's pad token, which is what its processor pads with
    (a Qwen2 LLaVA has no pad_token_id in its config and pads with <|endoftext|>, not EOS: issue 13 item 9);
    `fallback` (the config's, else EOS) when the tokenizer has none."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else int(fallback)

def _check_before_loading(ckpt, mitigation, bake_options) -> None:
    """Everything config.json and the image-processor config can decide, before a weight is read (issue 13): the
    arch's own `check_config` hook (image processor, options; exporter/registry.py) and the mitigation layer choices
    against the decoder's layer count. A refusal here takes well under a second instead of a whole export."""
    from anchorrt.exporter.registry import check_config
    from anchorrt.graph_passes.bake import check_layer_choices, parse_methods

    facts = check_config(ckpt.architecture, ckpt.config, ckpt.path)
    if mitigation and "num_layers" in facts:
        # a method the arch bakes into another graph (InstructBLIP's CLVA: the Q-Former) is checked by that pass
        elsewhere = facts.get("method_graphs") or {}
        check_layer_choices([m for m in parse_methods(mitigation) if m not in elsewhere], bake_options,
                            facts["num_layers"])


def _export_into(ckpt, tmp: Path, opset: int, say: Progress) -> dict:
    import torch
    from anchorrt.exporter.archs.llava import load_processor
    from anchorrt.exporter.preprocessing import preprocessing_params
    from anchorrt.exporter.registry import get_arch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines replace transformers' weight-loading bar
    t0 = time.perf_counter()
    say(f"[1/5] loading {ckpt.architecture} from {ckpt.path}")
    arch_cls = get_arch(ckpt.architecture)
    arch = arch_cls(ckpt, dtype=torch.float32)  # fp16/int4/int8 come from graph passes (graph_passes/bake.py)
    # an arch module may read its own processor and preprocessing config (Qwen2-VL: tokenizer only, dynamic size)
    processor = (getattr(arch, "load_processor", None) or load_processor)(ckpt.path)
    if hasattr(arch, "preprocessing_params"):
        pre = arch.preprocessing_params(ckpt.path)
        crop = None
    else:
        pre = preprocessing_params(ckpt.path)
        crop = tuple(pre["crop_size"]) if pre.get("do_center_crop") else (pre["shortest_edge"], pre["shortest_edge"])
        crop = tuple(pre["resize_to"]) if pre.get("resize_to") else crop  # SigLIP: resized to exactly h x w
    specs = arch.graphs(image_size=crop)
    graphs = {}
    for i, spec in enumerate(specs, start=2):
        say(f"[{i}/{len(specs) + 2}] exporting {spec.role} graph (opset {opset})")
        path = tmp / f"{spec.role}.onnx"
        _export_graph(spec, path, opset)
        inputs, outputs = graph_io(path)
        graphs[spec.role] = {"file": path.name, "inputs": inputs, "outputs": outputs}
        ext = path.with_name(path.name + ".data")
        if ext.exists():
            graphs[spec.role]["external_data"] = ext.name
    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise CheckpointError(f"the tokenizer of '{ckpt.path}' has no fast (tokenizers) version; convert it first")
    backend.save(str(tmp / "tokenizer.json"))
    if hasattr(arch, "write_extra_files"):  # e.g. InstructBLIP's Q-Former tokenizer
        arch.write_extra_files(processor, tmp)
    for name in TOKENIZER_FILES:
        if (ckpt.path / name).is_file():
            shutil.copyfile(ckpt.path / name, tmp / name)
    fields = arch.manifest_fields()
    fields["tokens"]["pad_token_id"] = prompt_pad_id(tokenizer, fields["tokens"]["pad_token_id"])
    image_token = tokenizer.convert_ids_to_tokens(fields["tokens"]["image_token_id"])
    fields["tokens"]["image_token"] = image_token
    prompt = arch.prompt_template(processor)
    prompt["image_placeholder"] = image_token
    max_ctx = fields["dims"]["max_position_embeddings"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **fields,
        "prompt": prompt,
        "preprocessing": pre,
        "tokenizer": {"file": "tokenizer.json"},
        "graphs": graphs,
        "opset": opset,
        "precision": {"weights": "fp32", "activations": "fp32", "kv": "fp32"},
        "context_length": max_ctx,
        "mitigation": {},
        "passes": [],
        "versions": versions(),
        "source": {"model_dir_name": ckpt.path.name, "export_seconds": round(time.perf_counter() - t0, 1)},
    }
