"""`anchorrt profile ARTIFACT_DIR`: per-stage timings, sweeps, mitigation A/B, memory, plots (runtime.profile).

The measurement is torch-free. `--model MODEL_DIR` adds an interleaved comparison with transformers eager `generate`
on the same image and prompt; only that option imports torch, and only when given.

Every option is parsed here rather than by click's types, so that a bad value is one line `error: ...` (exit 2)
like the rest of the CLI, not click's usage block.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from anchorrt.cli_common import friendly as _friendly
from anchorrt.runtime.errors import CheckpointError, FlagError

DEVICES = ("cpu", "cuda")


def _int(name: str, text: str, lo: int) -> int:
    try:
        v = int(text.strip())
    except (ValueError, AttributeError):
        raise FlagError(f"{name} must be an integer >= {lo}, got {text!r}") from None
    if v < lo:
        raise FlagError(f"{name} must be an integer >= {lo}, got {v}")
    return v


def _int_list(name: str, text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise FlagError(f"{name} must be a comma-separated list of positive integers (e.g. 1,2,4), got {text!r}") from None
    bad = [v for v in values if v < 1]
    if bad:
        raise FlagError(f"{name} must hold positive integers only, got {bad[0]}")
    if len(set(values)) != len(values):
        raise FlagError(f"{name} lists a value twice: {text!r}")
    return values


class TransformersEager:
    """The reference side of the comparison: transformers eager `generate` on the same image and prompt, timed as
    scripts/bench_foundation.py does (inputs prepared once; greedy; exactly `new_tokens` tokens)."""

    name = "transformers eager generate"

    def __init__(self, model_dir: Path, template: str, prompt: str, image, device: str, fp16: bool):
        try:
            import torch
            from transformers import AutoProcessor, LlavaForConditionalGeneration
        except ImportError as exc:
            raise CheckpointError(f"--model needs torch and transformers ({exc.name or exc} is missing): "
                                  "`pip install anchorrt[export]`") from None
        self.torch = torch
        self.device = device
        dtype = torch.float16 if fp16 and device == "cuda" else torch.float32
        processor = AutoProcessor.from_pretrained(model_dir)
        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager",
                                                                   dtype=dtype).eval().to(device)
        self.inputs = processor(images=[image], text=[template.replace("{prompt}", prompt)], return_tensors="pt")
        self.inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in self.inputs.items()}
        self._info = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                      "device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                      "prompt_tokens": int(self.inputs["input_ids"].shape[1]), "model_dir": str(model_dir)}

    def generate(self, new_tokens: int) -> float:
        torch = self.torch
        if self.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            self.model.generate(**self.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def info(self) -> dict:
        return dict(self._info)


@click.command("profile")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", default="profile-out", show_default=True, type=click.Path(path_type=Path),
              help="Folder for profile.json, the plots and the onnxruntime traces.")
@click.option("--batch-sizes", default="1,2,4", show_default=True, help="Batch sweep (requests per call).")
@click.option("--contexts", default="auto", show_default=True,
              help="Context sweep in prompt tokens (image included), e.g. 600,1024; auto: 3 points up to the limit.")
@click.option("--images", default="1,2,4", show_default=True, help="Image-count sweep (preprocess + vision encoder).")
@click.option("--warmup", default="1", show_default=True, help="Warm-up rounds (not measured).")
@click.option("--repeats", default="5", show_default=True, help="Measured rounds.")
@click.option("--new-tokens", default="32", show_default=True, help="Tokens generated per run (stop tokens ignored).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--prompt", default=None, help="The base prompt (default: a short describe-the-image request).")
@click.option("--image", default=None, help="Image file (default: a fixed random 400x500 image).")
@click.option("--no-mitigation", is_flag=True, help="Skip the on/off A/B of the baked mitigation methods.")
@click.option("--ort-trace", is_flag=True, help="Also write onnxruntime's own profiler trace (chrome-trace JSON).")
@click.option("--model", "model_dir", default=None, type=click.Path(path_type=Path),
              help="PyTorch checkpoint folder: compare with transformers eager generate (needs anchorrt[export]).")
@click.option("--no-plots", is_flag=True, help="Write the JSON and the table only.")
@click.option("--threads", default=None, help="onnxruntime intra-op threads (default: its own choice).")
@click.option("--allow-fallback", is_flag=True, help="Accept a silent CPU fallback of the GPU provider.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifact files.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@_friendly
def profile(artifact_dir: Path, out_dir: Path, batch_sizes: str, contexts: str, images: str, warmup: str,
            repeats: str, new_tokens: str, device: str, prompt: str | None, image: str | None, no_mitigation: bool,
            ort_trace: bool, model_dir: Path | None, no_plots: bool, threads: str | None, allow_fallback: bool,
            no_verify: bool, quiet: bool) -> None:
    """Profile an artifact folder: where the time goes, how it scales, what each mitigation costs."""
    from anchorrt.runtime.profile import ProfileSettings, format_table, run_profile, write_outputs
    from anchorrt.runtime.profile.measure import Progress
    from anchorrt.runtime.profile.sweep import DEFAULT_PROMPT, default_image

    if device not in DEVICES:
        raise FlagError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    settings = ProfileSettings(
        batch_sizes=_int_list("--batch-sizes", batch_sizes),
        contexts=None if contexts.strip().lower() == "auto" else _int_list("--contexts", contexts),
        images=_int_list("--images", images),
        warmup=_int("--warmup", warmup, 0),
        repeats=_int("--repeats", repeats, 1),
        new_tokens=_int("--new-tokens", new_tokens, 2),
        device=device,
        prompt=DEFAULT_PROMPT if prompt is None else prompt,
        image=image,
        mitigation=not no_mitigation,
        verify=not no_verify,
        allow_fallback=allow_fallback,
        threads=None if threads is None else _int("--threads", threads, 1),
    ).validate()
    if out_dir.exists() and not out_dir.is_dir():
        raise FlagError(f"--out '{out_dir}' exists and is not a folder; pass another --out")
    if not no_plots:
        from anchorrt.runtime.profile.plots import require_matplotlib

        require_matplotlib()  # before minutes of measurement, not after
    reference = None
    if model_dir is not None:
        import importlib.util

        from anchorrt.runtime.manifest import Manifest
        from anchorrt.runtime.preprocess import load_image

        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"--model '{model_dir}' is not a checkpoint folder (no config.json)")
        def absent(name: str) -> bool:
            try:
                return importlib.util.find_spec(name) is None
            except ImportError:  # a finder that refuses it (the torch-free test does this)
                return True

        missing = [m for m in ("torch", "transformers") if absent(m)]
        if missing:
            raise CheckpointError(f"--model needs torch and transformers ({', '.join(missing)} missing): "
                                  "`pip install anchorrt[export]`")
        m = Manifest.load(artifact_dir, verify=False)
        fp16 = m.data.get("precision", {}).get("weights") == "fp16"

        def reference() -> TransformersEager:  # loaded after the measured rounds: its memory stays out of them
            img = load_image(image) if image else default_image()
            return TransformersEager(model_dir, m.prompt["template"], settings.prompt, img, device, fp16=fp16)
    report = run_profile(artifact_dir, settings, progress=Progress(enabled=not quiet), reference=reference,
                         trace_dir=out_dir if ort_trace else None)
    path = write_outputs(report, out_dir, plots=not no_plots)
    click.echo(format_table(report), nl=False)
    extras = [f"{len(report['plots'])} plots"] if not no_plots else []
    if report.get("ort_trace"):
        extras.append(f"{len(report['ort_trace'])} onnxruntime traces")
    click.echo(f"wrote {path}" + (f" ({', '.join(extras)})" if extras else ""), err=True)
