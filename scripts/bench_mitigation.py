"""Mitigation benchmark: what baking CLVA / SEVI costs, flags off and on, per prefill and per decode step.

Bench model: a random-weight LLaVA with an 8-layer, hidden-512, 16-head Llama and a 336-px CLIP tower (patch 14 →
576 image tokens), built in code and exported at the chosen opset. Three decoders: plain, CLVA baked (METHODS.md
layers: l_neg 0, l_pos 2, drift 3-7), SEVI baked (start_layer 2: 6 of 8 layers, the share the default 8 edits in
LLaVA-1.5's 32 layers; the literal default 8 would leave this model unchanged). Each runs through the runtime's own
decoder call (`Pipeline._decode`: IOBinding into a preallocated KV cache), batch 1, with the runtime's feeds
(`anchorrt.runtime.mitigation.decoder_feeds`). Context N:

    prefill: N tokens = [5 text | image span of min(576, N-64) | text]; T rows are the text after the image
    decode:  one token (a T row) over a synthetic past of N positions with the same image span, repeated by
             rewinding the ping-pong KV cache, so every repetition measures the same step

Variants: plain, plain #2 (a second session of the same graph: the noise floor between two sessions), clva off,
clva on (METHODS.md defaults), sevi off, sevi on (defaults). Decode steps and prefills below 4k alternate between
the variants in an order rotated every round (whoever runs first in a round is measurably favoured or penalised),
after a warm-up of each. A 4k opset-18 prefill holds gigabytes of attention matrices, which every session's memory
arena would keep, so at 4k each variant (without plain #2) gets a fresh session in turn, one warm-up and
`--long-prefill-reps` prefills. The table gives plain medians in ms, the other variants as ratios of medians to
plain, and on/off within one session (the cost of the flags, free of the session noise). Wall-clock and process CPU
time are both printed; the default is one intra-op thread, where CPU time is the figure other processes disturb
least (on a shared 2-core machine, two ORT threads mostly wait for each other).

    python scripts/bench_mitigation.py [--contexts 256,1024,4096] [--prefill-reps 3] [--long-prefill-reps 1]
        [--decode-reps 40] [--opset 18] [--threads 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCH_SPEC = dict(layers=8, hidden=512, heads=16, kv_heads=16, intermediate=1376, vision_hidden=64, vision_layers=1,
                  vision_heads=4, image_size=336, patch_size=14, max_position_embeddings=4608)
# (label, artifact, method, flags on); "plain #2" is a second session of the plain decoder.
VARIANTS = [("plain", "plain", None, False), ("plain #2", "plain", None, False), ("clva off", "clva", "clva", False),
            ("clva on", "clva", "clva", True), ("sevi off", "sevi", "sevi", False), ("sevi on", "sevi", "sevi", True)]
LONG = 4096


def build(folder: Path, opset: int) -> dict[str, Path]:
    import shutil

    from anchorrt.exporter.export import export_model
    from anchorrt.exporter.testing import TinyLlavaSpec, build_tiny_llava
    from anchorrt.graph_passes.bake import BakeOptions, bake

    model_dir = folder / "bench-llava"
    plain = folder / f"plain-opset{opset}"
    out = {"plain": plain, "clva": folder / f"clva-opset{opset}", "sevi": folder / f"sevi-opset{opset}"}
    if not (model_dir / "config.json").exists():
        build_tiny_llava(model_dir, TinyLlavaSpec(**BENCH_SPEC))
    if not (plain / "manifest.json").exists():
        export_model(model_dir, plain, opset=opset, force=True, progress=lambda m: print("  " + m, file=sys.stderr))
    for method in ("clva", "sevi"):
        if not (out[method] / "manifest.json").exists():
            shutil.rmtree(out[method], ignore_errors=True)
            shutil.copytree(plain, out[method])
            bake(out[method], method, BakeOptions(sevi_start_layer=2))
    return out


class Case:
    """One context length: synthetic prompt embeddings, masks and past keys/values shared by every variant."""

    def __init__(self, n: int, dims: dict, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.n = n
        self.embeds = (0.5 * rng.standard_normal((1, n, dims["hidden_size"]))).astype(np.float32)  # [1, N, d]
        self.attention_mask = np.ones((1, n), np.int64)
        self.image_mask = np.zeros((1, n), bool)
        self.image_mask[0, 5:5 + min(576, n - 64)] = True
        self.step_embeds = (0.5 * rng.standard_normal((1, 1, dims["hidden_size"]))).astype(np.float32)  # [1, 1, d]
        shape = (1, dims["num_kv_heads"], n, dims["head_dim"])  # [B, KVH, N, D]
        self.past = [[rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
                     for _ in range(dims["num_layers"])]


def decoder_pipeline(folder: Path, threads: int):
    from anchorrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_dir(folder, intra_op_threads=threads)
    _ = pipe.decoder.session  # build it now, outside the timings
    return pipe


class Runner:
    """One variant (a pipeline and its flags) on one Case: its feeds and its own KV cache."""

    def __init__(self, pipe, case: Case, method: str | None, on: bool):
        from anchorrt.runtime.mitigation import decoder_feeds, parse_request

        self.pipe, self.case = pipe, case
        rows = [parse_request({method: True} if (method and on) else None, pipe.manifest.mitigation)]
        names = {n for n in pipe.decoder.input_names() if not n.startswith("past_key_values.")}
        names -= {"inputs_embeds", "attention_mask", "position_ids"}
        self.extra = decoder_feeds(pipe.manifest.mitigation, names, case.image_mask, rows)
        self.cache = None

    def _new_cache(self):
        return self.pipe._new_cache(1, self.case.n + 1)

    def prefill(self) -> tuple[float, float]:
        import numpy as np

        n = self.case.n
        cache = self._new_cache()
        t, c = time.perf_counter(), time.process_time()
        self.pipe._decode(self.case.embeds, self.case.attention_mask, np.arange(n, dtype=np.int64)[None], cache,
                          self.extra)
        return time.perf_counter() - t, time.process_time() - c

    def load_past(self) -> None:
        """The synthetic past: N positions of keys/values written into the cache's current side."""

        self.cache = self._new_cache()
        for layer, (key, value) in enumerate(self.case.past):
            self.cache.load(layer, key, value)
        self.cache.length = self.case.n

    def decode_step(self) -> tuple[float, float]:
        """One step at context n+1, then rewound so the next call repeats the same step (the step reads one side
        of the ping-pong cache and writes the other)."""
        import numpy as np

        n = self.case.n
        mask = np.ones((1, n + 1), np.int64)
        t, c = time.perf_counter(), time.process_time()
        self.pipe._decode(self.case.step_embeds, mask, np.array([[n]], np.int64), self.cache, self.extra)
        elapsed = time.perf_counter() - t, time.process_time() - c
        self.cache.rewind(1)
        return elapsed


def rotated(names: list[str], i: int) -> list[str]:
    return names[i % len(names):] + names[:i % len(names)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--long-prefill-reps", type=int, default=1, help=f"prefills per variant at contexts >= {LONG}")
    ap.add_argument("--decode-reps", type=int, default=40)
    ap.add_argument("--opset", type=int, default=18, choices=(18, 23))
    ap.add_argument("--threads", type=int, default=1,
                    help="onnxruntime intra-op threads (1: on a shared 2-core machine two threads wait on each other)")
    ap.add_argument("--keep", type=Path, default=None, help="Folder to build the bench model in (kept, reused).")
    args = ap.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="anchorrt-bench-mitigation-"))
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"building the bench model in {folder} ...", file=sys.stderr)
    dirs = build(folder, args.opset)
    pipes = {label: decoder_pipeline(dirs[art], args.threads) for label, art, _, _ in VARIANTS}
    dims = pipes["plain"].manifest.dims
    print(f"built in {time.perf_counter() - t0:.0f} s; opset {args.opset}, {args.threads} threads", file=sys.stderr)

    contexts = [int(c) for c in args.contexts.split(",")]
    results: dict[tuple[str, int], dict[str, list]] = {}
    for n in contexts:
        case = Case(n, dims)
        runners = {label: Runner(pipes[label], case, method, on) for label, _, method, on in VARIANTS}
        names = list(runners)
        decode: dict[str, list] = {name: [] for name in names}
        for r in runners.values():
            r.load_past()
            r.decode_step()  # warm-up
        for i in range(args.decode_reps):
            for name in rotated(names, i):
                decode[name].append(runners[name].decode_step())
        results[("decode", n)] = decode
        if n < LONG:
            prefill: dict[str, list] = {name: [] for name in names}
            for r in runners.values():
                r.prefill()  # warm-up
            for i in range(args.prefill_reps):
                for name in rotated(names, i):
                    prefill[name].append(runners[name].prefill())
            results[("prefill", n)] = prefill
        del runners
        print(f"  context {n}: decode{'' if n >= LONG else ' and prefill'} done ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)

    long_contexts = [n for n in contexts if n >= LONG]
    if long_contexts:
        pipes.clear()  # the decode sessions' arenas go; one prefill session at a time from here
        for n in long_contexts:
            case = Case(n, dims)
            prefill = {}
            for label, art, method, on in VARIANTS:
                if label == "plain #2":
                    continue
                pipe = decoder_pipeline(dirs[art], args.threads)
                r = Runner(pipe, case, method, on)
                r.prefill()  # warm-up: the arena grows to its size here
                prefill[label] = [r.prefill() for _ in range(args.long_prefill_reps)]
                del r, pipe
                print(f"  context {n}: prefill {label} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            results[("prefill", n)] = prefill

    labels = [label for label, _, _, _ in VARIANTS[1:]]
    for clock, title in ((0, "wall-clock"), (1, "process CPU time (all threads)")):
        head = (f"{'phase':8} {'context':>7} {'reps':>4} {'plain ms':>9} " + " ".join(f"{x:>9}" for x in labels)
                + f" {'clva on/off':>11} {'sevi on/off':>11}")
        print(f"\n{title}; ratios to plain, and on/off within one session:\n{head}\n" + "-" * len(head))
        for phase in ("prefill", "decode"):
            for n in contexts:
                series = results[(phase, n)]
                med = {name: statistics.median(x[clock] for x in s) for name, s in series.items()}
                cells = " ".join(f"{med[x] / med['plain']:9.3f}" if x in med else f"{'-':>9}" for x in labels)
                on_off = [med[f"{m} on"] / med[f"{m} off"] for m in ("clva", "sevi")]
                print(f"{phase:8} {n:7d} {len(series['plain']):4d} {1000 * med['plain']:9.2f} {cells} "
                      f"{on_off[0]:11.3f} {on_off[1]:11.3f}")
    print(f"\nmedians per variant; opset {args.opset}, {args.threads} intra-op thread(s); load average at the end "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
