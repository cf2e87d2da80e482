"""Issue 6's GPU measurements in one run: the runtime on the CUDA execution provider vs PyTorch eager on the same GPU.

    python scripts/bench_gpu.py --shape bench   --precision fp16                  # 8-layer, hidden-512 bench model
    python scripts/bench_gpu.py --shape llava7b --precision fp16 --quantize int4  # LLaVA-1.5-7B-shaped, random weights
    python scripts/bench_gpu.py --shape tiny --device cpu --bandwidth-gbs 20      # a smoke run anywhere (tests use it)

For one random-weight LLaVA (built in code; no download) it exports fp32 with CLVA, SEVI and the IAVA probe baked,
converts to `--precision` / `--quantize` (graph_passes: mitigation stays fp32), and measures, at each batch size:
time to first token (vision + embed + prefill + first token), decode tokens/s, the per-step time with CLVA+SEVI on
vs off (ratio), the step with every flag off vs a plain export without mitigation (ratio: what the baked `If`s
cost when nothing is on), peak GPU memory (nvidia-smi, the device's used memory minus what it used before the
sessions), and the roofline fraction = decoder weight bytes read per step / step time / the device's memory bandwidth. With
`--torch-eager` (default on CUDA) transformers' eager `generate` in fp16 on the same GPU, in the same run, gives the
comparison ratios. Prints a table and writes `--json`.

First run on an NVIDIA H200 on 2026-11-28 (figures in README.md, before the flags-off / plain column existed); check
`session.get_providers()[0]` in the header line (a CPU fallback is refused unless --allow-fallback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # exporter.testing.TinyLlavaSpec fields
    "tiny": dict(layers=8, hidden=64, heads=8, kv_heads=8, intermediate=128, vision_hidden=32, vision_layers=2,
                 vision_heads=4, image_size=32, patch_size=8),
    "bench": dict(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1376, vision_hidden=128, vision_layers=2,
                  vision_heads=4, image_size=336, patch_size=14, max_position_embeddings=2048),
    # LLaVA-1.5-7B: Vicuna-7B (32 x 4096, 32 heads, MLP 11008) + CLIP ViT-L/14-336 (24 x 1024, 16 heads) -> 576 tokens
    "llava7b": dict(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vision_hidden=1024,
                    vision_layers=24, vision_heads=16, image_size=336, patch_size=14, max_position_embeddings=4096),
}
# HBM bandwidth from NVIDIA's data sheets (GB/s), matched on nvidia-smi's name; --bandwidth-gbs overrides.
BANDWIDTH_GBS = {"H200": 4800, "H100 80GB HBM3": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "A100-SXM4-80GB": 2039,
                 "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "L40S": 864, "L4": 300, "A10": 600}


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def bandwidth_for(name: str | None) -> float | None:
    if not name:
        return None
    hits = [gbs for key, gbs in BANDWIDTH_GBS.items() if key in name]
    return float(max(hits)) if hits else None


class GpuMemory:
    """Peak used device memory (MiB) sampled with nvidia-smi every 50 ms while running (None without nvidia-smi)."""

    def __init__(self):
        self.peak = self.base = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _used() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10)
            return float(out.stdout.split()[0]) if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _poll(self):
        while not self._stop.wait(0.05):
            used = self._used()
            if used is not None and (self.peak is None or used > self.peak):
                self.peak = used

    def __enter__(self):
        if self.base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def peak_mib(self) -> float | None:
        return None if self.base is None or self.peak is None else self.peak - self.base


def decoder_weight_bytes(art: Path) -> int:
    """Bytes of the decoder's initializers (what one decode step reads at least once)."""
    import onnx

    model = onnx.load(str(art / "decoder.onnx"), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        bits = {onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16, onnx.TensorProto.FLOAT: 32,
                onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.INT64: 64, onnx.TensorProto.INT32: 32,
                onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT8: 8, onnx.TensorProto.BOOL: 8}.get(t.data_type, 32)
        total += n * bits // 8
    return total


def build(folder: Path, shape: str, precision: str, quantize: str | None, baked: bool = True) -> tuple[Path, Path]:
    """-> (checkpoint folder, artifact): exported fp32 (with CLVA, SEVI and the probe when `baked`), then converted."""
    from anchorrt.exporter.export import export_model
    from anchorrt.exporter.testing import TinyLlavaSpec, build_tiny_llava
    from anchorrt.graph_passes.bake import BakeOptions, PrecisionOptions, convert_precision

    spec = TinyLlavaSpec(**SHAPES[shape])
    kind = "" if baked else "plain-"
    model_dir, fp32 = folder / f"{shape}-llava", folder / f"{shape}-{kind}fp32"
    if not (model_dir / "config.json").exists():
        build_tiny_llava(model_dir, spec)
    if not (fp32 / "manifest.json").exists():
        start = 8 if spec.layers > 8 else spec.layers // 2  # METHODS.md's literal default, or the middle
        export_model(model_dir, fp32, force=True, mitigation=["clva", "sevi", "probe"] if baked else None,
                     bake_options=BakeOptions(sevi_start_layer=start), progress=lambda m: print("  " + m, file=sys.stderr))
    tag = precision + (f"-{quantize}" if quantize else "")
    art = folder / f"{shape}-{kind}{tag}"
    if tag != "fp32" and not (art / "manifest.json").exists():
        shutil.copytree(fp32, art)
        convert_precision(art, PrecisionOptions(precision=precision, quantize=quantize).check())
    return model_dir, (fp32 if tag == "fp32" else art)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp16")
    ap.add_argument("--quantize", choices=("int4",), default=None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--allow-fallback", action="store_true")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="device memory bandwidth [default: by GPU name]")
    ap.add_argument("--torch-eager", action=argparse.BooleanOptionalAction, default=None,
                    help="PyTorch eager fp16 on the same device for comparison [default: on with --device cuda]")
    ap.add_argument("--keep", type=Path, default=None, help="folder to build the models in (kept and reused)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1 or args.new_tokens < 2 or args.reps < 1:
        ap.error("--batches must be positive integers, --new-tokens at least 2, --reps at least 1")
    torch_eager = args.device == "cuda" if args.torch_eager is None else args.torch_eager

    import numpy as np
    from anchorrt.runtime.pipeline import Pipeline, Request
    from PIL import Image

    folder = args.keep or Path(tempfile.mkdtemp(prefix="anchorrt-gpu-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"building the {args.shape} model in {folder} ...", file=sys.stderr)
    model_dir, art = build(folder, args.shape, args.precision, args.quantize)
    _, plain_art = build(folder, args.shape, args.precision, args.quantize, baked=False)
    name = gpu_name() if args.device == "cuda" else None
    bandwidth = args.bandwidth_gbs or bandwidth_for(name)
    weight_bytes = decoder_weight_bytes(art)
    providers = ["CUDAExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)) for _ in range(max(batches))]
    prompt = "Describe the content of the image in detail."
    n = args.new_tokens
    med = statistics.median

    with (GpuMemory() if args.device == "cuda" else contextlib.nullcontext()) as memory:
        pipe = Pipeline.from_dir(art, providers=providers, allow_fallback=args.allow_fallback)
        plain_pipe = Pipeline.from_dir(plain_art, providers=providers, allow_fallback=args.allow_fallback)
        provider = pipe.decoder.provider
        rows = []
        for b in batches:
            reqs = [Request(images[i], prompt) for i in range(b)]

            def run(mitigation=None, reqs=reqs, pipe=pipe):
                kw = {"mitigation": mitigation} if mitigation else {}
                r = pipe.generate_batch(reqs, max_new_tokens=n, stop_token_ids=(), **kw)[0]
                steps = r.timings["decode_steps_s"]
                return r.timings["vision_s"] + r.timings["prefill_s"] + steps[0], med(steps[1:])

            run(), run({"clva": True, "sevi": True}), run(pipe=plain_pipe)  # warm-up (CUDA kernels, arena)
            plain, mitigated, unbaked = [], [], []
            for _ in range(args.reps):  # interleaved
                plain.append(run())
                mitigated.append(run({"clva": True, "sevi": True}))
                unbaked.append(run(pipe=plain_pipe))
            ttft, step = med(p[0] for p in plain), med(p[1] for p in plain)
            row = {"batch": b, "ttft_s": ttft, "step_s": step, "tokens_per_s": b / step,
                   "mitigation_step_ratio": med(m[1] for m in mitigated) / step,
                   "mitigation_ttft_ratio": med(m[0] for m in mitigated) / ttft,
                   "flags_off_vs_plain_step_ratio": step / med(u[1] for u in unbaked),
                   "roofline_fraction": (weight_bytes / step / (bandwidth * 1e9)) if bandwidth else None}
            rows.append(row)
        peak = memory.peak_mib if memory else None

    eager = []
    if torch_eager:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        dev = "cuda" if args.device == "cuda" else "cpu"
        dtype = torch.float16 if dev == "cuda" else torch.float32
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
        model = model.to(dev).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
        template = pipe.manifest.prompt["template"].replace("{prompt}", prompt)
        for b in batches:
            inputs = processor(images=images[:b], text=[template] * b, return_tensors="pt").to(dev)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

            def hf(tokens: int, inputs=inputs) -> float:
                if dev == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                if dev == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t

            hf(1), hf(2)
            ones, steps = [], []
            for _ in range(args.reps):
                one = hf(1)
                ones.append(one)
                steps.append((hf(n) - one) / (n - 1))
            eager.append({"batch": b, "ttft_s": med(ones), "step_s": med(steps), "tokens_per_s": b / med(steps)})

    header = (f"{args.shape} ({SHAPES[args.shape]['layers']} layers, hidden {SHAPES[args.shape]['hidden']}), "
              f"{args.precision}{' + ' + args.quantize if args.quantize else ''}, provider {provider}"
              f"{', ' + name if name else ''}, decoder weights {weight_bytes / 2**20:.1f} MiB, "
              f"{n} new tokens, {args.reps} reps (median)")
    print("\n" + header)
    print("| batch | TTFT ms | decode tok/s | step ms | CLVA+SEVI step ratio | CLVA+SEVI TTFT ratio | flags off / plain "
          "step | roofline | eager TTFT ratio | eager step ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        e = eager[i] if i < len(eager) else None
        roof = f"{100 * r['roofline_fraction']:.0f}%" if r["roofline_fraction"] is not None else "n/a"
        print(f"| {r['batch']} | {1000 * r['ttft_s']:.1f} | {r['tokens_per_s']:.1f} | {1000 * r['step_s']:.2f} | "
              f"{r['mitigation_step_ratio']:.3f}x | {r['mitigation_ttft_ratio']:.3f}x | "
              f"{r['flags_off_vs_plain_step_ratio']:.3f}x | {roof} | "
              + (f"{r['ttft_s'] / e['ttft_s']:.2f}x | {r['step_s'] / e['step_s']:.2f}x |" if e else "n/a | n/a |"))
    print(f"peak device memory over the sessions: {'n/a (no nvidia-smi)' if peak is None else f'{peak:.0f} MiB'}; "
          f"bandwidth used for the roofline: {bandwidth or 'unknown (pass --bandwidth-gbs)'} GB/s")
    print("(ratios: runtime / PyTorch eager fp16 on the same device, < 1 = runtime faster; CLVA+SEVI on / off; "
          "every flag off / an export without mitigation)")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "provider": provider, "gpu": name, "bandwidth_gbs": bandwidth,
                                         "decoder_weight_bytes": weight_bytes, "peak_mib": peak, "runtime": rows,
                                         "torch_eager": eager}, indent=1) + "\n")


if __name__ == "__main__":
    main()
