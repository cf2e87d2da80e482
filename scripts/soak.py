"""Soak: many generations in one process; resident memory after warm-up vs at the end.

    python scripts/soak.py --generations 1000                  # the tiny test model, built and exported here
    python scripts/soak.py --generations 1000 --artifact out/llava --image cat.jpg

Requests cycle through images (sizes and modes), prompts, greedy and seeded sampling, and every baked mitigation
flag, so each code path runs many times. Resident memory (VmRSS from /proc/self/status, after a gc.collect) is read
once the warm-up generations are done (onnxruntime's arena, numpy's and Pillow's caches grow during them) and again
at the end; the growth in percent is the figure (issue 9's goal: under 5 %). Exit code 1 when it is over
--max-growth. The tiny model is built and exported in a child process, so that this one holds only what the
runtime loads (no torch: it would inflate the baseline and hide a leak). Linux only (/proc). Set OMP_NUM_THREADS=1
on shared machines.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    """Current resident set size of this process (not the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def default_images():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (64, 30, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8), "RGBA")]


def requests_for(pipe, images, k: int) -> tuple[list, dict]:
    """The k-th request of the soak (deterministic)."""
    from anchorrt.runtime.pipeline import Request

    prompts = ["What is in the image?", "Is there a dog?", "Describe the colours in detail.", "Count the objects."]
    baked = [m for m in ("clva", "sevi") if m in pipe.manifest.mitigation]
    flags = [None] + [{m: True} for m in baked]
    if "probe" in pipe.manifest.mitigation:
        flags.append({"iava": {"alpha": 1.0}})
    sampling = {"max_new_tokens": 4 + k % 5}
    if k % 2:
        sampling.update(do_sample=True, temperature=0.8, top_k=20, seed=k)
    reqs = [Request(images[k % len(images)], prompts[k % len(prompts)], flags[k % len(flags)])]
    if k % 7 == 3:  # now and then a batch of two
        reqs.append(Request(images[(k + 1) % len(images)], prompts[(k + 2) % len(prompts)], flags[(k + 1) % len(flags)]))
    return reqs, sampling


def soak(pipe, images, generations: int, warmup: int, progress=None) -> dict:
    """Run `generations` generate_batch calls; memory read after `warmup` of them and at the end."""
    if not 0 < warmup < generations:
        raise ValueError("need 0 < warmup < generations")
    t0 = time.perf_counter()
    after_warmup = None
    samples = []
    for k in range(generations):
        reqs, sampling = requests_for(pipe, images, k)
        pipe.generate_batch(reqs, **sampling)
        if k + 1 == warmup:
            gc.collect()
            after_warmup = rss_bytes()
        if progress and (k + 1) % max(1, generations // 10) == 0:
            gc.collect()
            samples.append((k + 1, rss_bytes()))
            progress(f"{k + 1:>6} generations  rss {samples[-1][1] / 2**20:8.1f} MiB")
    gc.collect()
    end = rss_bytes()
    return {"generations": generations, "warmup": warmup, "rss_after_warmup": after_warmup, "rss_end": end,
            "growth_pct": 100.0 * (end - after_warmup) / after_warmup, "seconds": time.perf_counter() - t0,
            "samples": samples}


def tiny_artifact(work: Path) -> Path:
    """The test suite's tiny model (tests/conftest.py), exported with CLVA, SEVI and the IAVA probe baked in."""
    from anchorrt.exporter.export import export_model
    from anchorrt.exporter.testing import TinyLlavaSpec, build_tiny_llava
    from anchorrt.graph_passes.bake import BakeOptions, bake

    model = build_tiny_llava(work / "tiny-llava", TinyLlavaSpec())
    art = work / "tiny"
    export_model(model, art)
    bake(art, "clva,sevi,probe", BakeOptions(sevi_start_layer=2))
    return art


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=None, help="default: 10%% of --generations (at least 20)")
    ap.add_argument("--artifact", type=Path, default=None, help="artifact folder (default: build the tiny model)")
    ap.add_argument("--image", action="append", default=None, help="image file(s) (default: 3 random images)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--max-growth", type=float, default=5.0, help="exit 1 above this growth in percent")
    ap.add_argument("--build-tiny", type=Path, default=None, help=argparse.SUPPRESS)  # the child process's job
    args = ap.parse_args(argv)
    if args.build_tiny is not None:
        tiny_artifact(args.build_tiny)
        return 0
    warmup = args.warmup if args.warmup is not None else max(20, args.generations // 10)

    from anchorrt.runtime.pipeline import Pipeline

    with tempfile.TemporaryDirectory(prefix="anchorrt-soak-") as work:
        art = args.artifact
        if art is None:
            subprocess.run([sys.executable, __file__, "--build-tiny", work], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            art = Path(work) / "tiny"
        images = args.image or default_images()
        pipe = Pipeline.from_dir(art, intra_op_threads=args.threads)
        r = soak(pipe, images, args.generations, warmup, progress=lambda m: print(m, flush=True))
    print(f"soak: {r['generations']} generations in {r['seconds']:.1f} s; resident memory after {r['warmup']} "
          f"warm-up generations {r['rss_after_warmup'] / 2**20:.1f} MiB, at the end {r['rss_end'] / 2**20:.1f} MiB: "
          f"growth {r['growth_pct']:+.2f} % ({(r['rss_end'] - r['rss_after_warmup']) / 2**20:+.1f} MiB; "
          f"limit {args.max_growth} %)")
    return 0 if r["growth_pct"] <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
