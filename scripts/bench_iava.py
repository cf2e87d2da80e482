"""IAVA benchmark: contrastive decoding (both streams as one batch) vs plain decoding, measured in one run.

Bench model: as scripts/bench_foundation.py (8 layers, hidden 512, 576 image tokens), with the attention probe
baked into a copy. Variants alternate for `--reps` rounds after a warm-up; medians of
  - per generated token: the decode-step time (IAVA: one batch-of-2 decoder pass + the contrastive scores),
  - per request: preprocessing to the last token, IAVA's probe prefill ([G, Q]) and V* prefill included.
Stop tokens are ignored so every variant generates exactly `--new-tokens` tokens. Printed as ratios to plain;
the issue's goal is <= 1.3x per token on the CPU (sequential contrastive decoding costs about 2x). A third variant,
"IAVA full passes", runs IAVA as it ran before issue 18's prefix sharing: one [G, Q] probe prefill over the whole
padded prompts, a full-length V* prefill and a full-length V* cache (runtime/pipeline.py `_generate_iava`, with
`compaction_allowed` off), so one run shows what sharing the G/Q prefix, computing V* compacted and decoding it
at its own length save.

`--artifact DIR`: an existing artifact with the probe baked (e.g. scripts/bench_peers.py's anchorrt-baked-int4-*,
the issue's bench model) instead of the built one.

`--clock cpu` times the same stages with process CPU time instead of wall-clock (the pipeline's stage clock is
swapped for `time.process_time` in this process): on a shared machine other processes' load moves wall-clock
ratios by tens of percent from run to run (1.17x to 1.76x per token in three runs of the same build), CPU time much
less. With one intra-op thread (`--threads 1`) CPU time is the work the runtime does.

    python scripts/bench_iava.py [--reps 5] [--new-tokens 32] [--threads N] [--clock wall|cpu] [--keep DIR]
                                 [--artifact DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall-clock, or process CPU time (steadier on a shared machine; use with --threads 1)")
    ap.add_argument("--keep", type=Path, default=None, help="Folder to build the bench model in (kept).")
    ap.add_argument("--artifact", type=Path, default=None, help="An artifact with the probe baked, instead of building.")
    args = ap.parse_args()
    if args.clock == "cpu":
        import time
        import types

        import anchorrt.runtime.pipeline as pipeline_module

        # the pipeline times its stages with time.perf_counter(); here that name reads the process CPU clock
        pipeline_module.time = types.SimpleNamespace(perf_counter=time.process_time)

    import anchorrt.runtime.pipeline as pipeline_module
    import numpy as np
    from anchorrt.graph_passes.bake import bake
    from anchorrt.runtime.pipeline import Pipeline
    from bench_foundation import build
    from PIL import Image

    if args.artifact is not None:
        probe = args.artifact
    else:
        folder = args.keep or Path(tempfile.mkdtemp(prefix="anchorrt-bench-"))
        folder.mkdir(parents=True, exist_ok=True)
        print(f"building the bench model in {folder} ...", file=sys.stderr)
        _, art = build(folder)
        probe = folder / "bench-probe"
        if not (probe / "manifest.json").exists():
            shutil.rmtree(probe, ignore_errors=True)
            shutil.copytree(art, probe)
            bake(probe, ["probe"])
    pipe = Pipeline.from_dir(probe, intra_op_threads=args.threads)
    pipe.stop_ids = ()  # random weights: generate exactly --new-tokens tokens in every variant
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 500, 3), dtype=np.uint8))
    prompt = "Is there a dog in the image?"
    iava = {"iava": {"i": 0.1}}
    variants = {"plain": None, "iava": iava, "iava full passes": iava}
    allowed = pipeline_module.compaction_allowed
    prompt_tokens = {}

    def run(variant):
        pipeline_module.compaction_allowed = allowed if variant != "iava full passes" else (lambda *a: False)
        r = pipe.generate(image, prompt, max_new_tokens=args.new_tokens, mitigation=variants[variant])
        prompt_tokens[variant] = r.prompt_tokens
        return statistics.median(r.timings["decode_steps_s"][1:]), r.timings["total_s"], r.timings["prefill_s"]

    for k in variants:  # warm-up
        run(k)
    samples = {k: [] for k in variants}
    for rep in range(args.reps):
        order = list(variants)[rep % 3:] + list(variants)[:rep % 3]  # rotate who goes first
        for k in order:
            samples[k].append(run(k))
    pipeline_module.compaction_allowed = allowed
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in samples.items()}
    n_img = pipe.tokens_per_image
    dims = pipe.manifest.dims
    print(f"\nbench model: {probe.name}, {dims['num_layers']} layers, hidden {pipe.hidden}, "
          f"prompt {prompt_tokens['plain']} tokens ({n_img} image tokens), {args.new_tokens} new tokens, i = 10% "
          f"({int(np.ceil(0.1 * n_img))} tokens), {args.reps} rotating reps (median), threads "
          f"{args.threads or 'default'}, {'process CPU time' if args.clock == 'cpu' else 'wall-clock'}")
    full = "IAVA full passes"
    print(f"{'':16}{'plain':>12}{'IAVA':>12}{'ratio':>9}{full:>20}{'ratio':>9}")
    for i, label in enumerate(("per token", "per request", "prefill(s)")):
        p, q, f = med["plain"][i], med["iava"][i], med["iava full passes"][i]
        print(f"{label:16}{1000 * p:>9.1f} ms{1000 * q:>9.1f} ms{q / p:>8.2f}x{1000 * f:>17.1f} ms{f / p:>8.2f}x")
    print("(IAVA's prefill = the [G, Q] probe prefill (the shared prefix once) + the V* prefill; full passes: the "
          "whole padded prompts)")


if __name__ == "__main__":
    main()
