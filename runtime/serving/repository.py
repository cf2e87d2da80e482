"""`anchorrt serve triton ARTIFACT -o REPO`: a Triton model repository that serves an artifact (issue 19).

    REPO/
      anchorrt/                    the model: one response per request
        config.pbtxt               Python backend, dynamic batching, instance group (KIND_CPU | KIND_GPU)
        1/model.py                 runtime/serving/model.py
        1/artifact/                a copy of the artifact folder (graphs, manifest, tokenizer)
        1/anchorrt/runtime/        a copy of the runtime package (numpy, onnxruntime, tokenizers, Pillow; no torch)
      anchorrt_stream/             the same Pipeline in decoupled mode: one response per generated token
        config.pbtxt               model_transaction_policy { decoupled: true }; parameters point at ../anchorrt/1
        1/model.py

The layout and fields follow Triton's model repository and model configuration documentation
(https://github.com/triton-inference-server/server/blob/main/docs/user_guide/model_repository.md,
 .../model_configuration.md: `max_batch_size`, `input`/`output` with `dims` excluding the batch dimension,
 `instance_group` `kind`/`count`/`gpus`, `dynamic_batching.max_queue_delay_microseconds`, `parameters`;
 .../decoupled_models.md: `model_transaction_policy { decoupled: true }`). The folder is self-contained: copy it to
any Triton deployment whose Python backend environment has numpy, onnxruntime (-gpu for KIND_GPU), tokenizers and
Pillow. It is written into a temporary folder beside REPO and renamed into place (never half-written).

`max_batch_size`: the manifest's `serving.max_batch_size` when the artifact records one, else 8; `--max-batch-size`
overrides. It counts requests; an IAVA request decodes two rows (runtime/iava.py), so the Pipeline's largest batch
is twice this.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from anchorrt.runtime.errors import FlagError
from anchorrt.runtime.manifest import Manifest, replace_folder
from anchorrt.runtime.pipeline import refuse_fp32_fused_on_gpu

MODEL_NAME = "anchorrt"
STREAM_SUFFIX = "_stream"
DEFAULT_MAX_BATCH = 8
INPUTS = (("IMAGE", "TYPE_STRING", (1,)), ("PROMPT", "TYPE_STRING", (1,)))
OUTPUTS = (("TEXT", "TYPE_STRING", (1,)), ("TOKEN_IDS", "TYPE_INT64", (-1,)), ("FINISH_REASON", "TYPE_STRING", (1,)))
_RUNTIME = Path(__file__).resolve().parents[1]  # the runtime package


def _copy_runtime(version: Path) -> None:
    """The runtime package under its import name, `anchorrt.runtime`, beside model.py: the repository needs no
    AnchorRT install, and the copy holds nothing but the runtime (no exporter, no graph passes)."""
    from anchorrt import __version__

    package = version / "anchorrt"
    shutil.copytree(_RUNTIME, package / "runtime",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "profile", "eval"))
    (package / "__init__.py").write_text(f'"""AnchorRT\'s runtime, copied into a Triton model repository."""\n\n'
                                         f'__version__ = "{__version__}"\n')


def max_batch_from_manifest(manifest: Manifest) -> int:
    """The manifest's `serving.max_batch_size` (validated by runtime/manifest.py: an integer in [1, 4096]), else 8."""
    return manifest.data.get("serving", {}).get("max_batch_size", DEFAULT_MAX_BATCH)


def config_text(name: str, *, max_batch_size: int, kind: str = "cpu", instances: int = 1,
                gpus: tuple[int, ...] = (), max_queue_delay_us: int = 2000, decoupled: bool = False,
                parameters: dict[str, str] | None = None, comment: str = "") -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    def tensors(items) -> str:
        rows = [f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(str(d) for d in dims)} ] }}' for n, t, dims in items]
        return ",\n".join(rows)

    group = f"count: {instances} kind: {'KIND_GPU' if kind == 'gpu' else 'KIND_CPU'}"
    if kind == "gpu" and gpus:
        group += f" gpus: [ {', '.join(str(g) for g in gpus)} ]"
    lines = [f"# {line}" for line in comment.splitlines()] + [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        f"input [\n{tensors(INPUTS)}\n]",
        f"output [\n{tensors(OUTPUTS)}\n]",
        f"instance_group [ {{ {group} }} ]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}",
    ]
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def write_repository(artifact: str | Path, out: str | Path, *, name: str = MODEL_NAME, kind: str = "cpu",
                     instances: int = 1, gpus: tuple[int, ...] = (), max_batch_size: int | None = None,
                     max_queue_delay_us: int = 2000, streaming: bool = True, force: bool = False,
                     verify: bool = True, intra_op_threads: int | None = None, max_image_pixels: int | None = None,
                     max_new_tokens_limit: int = 1024) -> Path:
    """Write the model repository for `artifact` into `out` (atomically); returns `out`."""
    out = Path(out)
    if kind not in ("cpu", "gpu"):
        raise FlagError(f"kind must be cpu or gpu, got {kind!r}")
    for what, value, lo in (("instances", instances, 1), ("max_queue_delay_us", max_queue_delay_us, 0),
                            ("max_new_tokens_limit", max_new_tokens_limit, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise FlagError(f"{what} must be an integer >= {lo}, got {value!r}")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise FlagError(f"model name {name!r} must be letters, digits, '-' or '_' (it is a folder and a URL part)")
    manifest = Manifest.load(artifact, verify=verify)  # a broken artifact fails here, before anything is written
    if kind == "gpu":  # the fp32 fused form cannot run on CUDA: refused before anything is written
        refuse_fp32_fused_on_gpu(manifest, ["CUDAExecutionProvider"])
    if max_batch_size is None:
        max_batch_size = max_batch_from_manifest(manifest)
    elif isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= 4096:
        raise FlagError(f"max_batch_size must be an integer in [1, 4096], got {max_batch_size!r}")
    if out.exists() and not force:
        raise FlagError(f"{out} exists; pass --force to replace it")
    if out.resolve() == manifest.folder.resolve() or manifest.folder.resolve() in out.resolve().parents:
        raise FlagError(f"{out} is inside the artifact; write the repository elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        params = {"artifact": "artifact", "runtime_path": ".", "verify": "true" if verify else "false",
                  "max_new_tokens_limit": str(max_new_tokens_limit)}
        if intra_op_threads:
            params["intra_op_threads"] = str(int(intra_op_threads))
        if max_image_pixels:
            params["max_image_pixels"] = str(int(max_image_pixels))
        comment = (f"Written by `anchorrt serve triton` for the artifact {manifest.folder.name} "
                   f"({manifest.data.get('architecture', '?')}).\nRequest parameters: see runtime/serving/params.py.")
        common = dict(max_batch_size=max_batch_size, kind=kind, instances=instances, gpus=tuple(gpus),
                      max_queue_delay_us=max_queue_delay_us)
        version = tmp / name / "1"
        version.mkdir(parents=True)
        shutil.copy2(Path(__file__).with_name("model.py"), version / "model.py")
        shutil.copytree(manifest.folder, version / "artifact")
        _copy_runtime(version)
        (tmp / name / "config.pbtxt").write_text(config_text(name, parameters=params, comment=comment, **common))
        if streaming:
            stream = tmp / (name + STREAM_SUFFIX)
            (stream / "1").mkdir(parents=True)
            shutil.copy2(Path(__file__).with_name("model.py"), stream / "1" / "model.py")
            shared = dict(params, artifact=f"../../{name}/1/artifact", runtime_path=f"../../{name}/1")
            (stream / "config.pbtxt").write_text(config_text(name + STREAM_SUFFIX, decoupled=True, parameters=shared,
                                                             comment=comment, **common))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
