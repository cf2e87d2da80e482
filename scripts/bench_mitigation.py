"""Mitigation benchmark: what baking CLVA / SEVI costs, flags off and on, per prefill and per decode step.

Bench model: a random-weight LLaVA with an 8-layer, hidden-512, 16-head Llama and a 336-px CLIP tower (patch 14 →
576 image tokens), built in code and exported at the chosen opset. Three decoders: plain, CLVA baked (METHODS.md
layers: l_neg 0, l_pos 2, drift 3-7), SEVI baked (start_layer 2: 6 of 8 layers, the share the default 8 edits in
LLaVA-1.5's 32 layers; the literal default 8 would leave this model unchanged). Each runs through the runtime's own
decoder call (`Pipeline._decode`: IOBinding into a preallocated KV cache), batch 1, with the runtime's feeds
(`runtime.mitigation.decoder_feeds`):

    context N: prefill of N tokens = [5 text | image span of min(576, N-64) | text] (T rows: the text after the
               image), and a single-token decode step at context N+1 over that prefill's cache (a T row), repeated
               by rewinding the ping-pong cache, so every repetition measures the same step.

Variants: plain, clva off, clva on (METHODS.md defaults), sevi off, sevi on (defaults). After one warm-up of each,
the variants alternate, in an order rotated every round (whoever runs first in a round is measurably favoured or
penalised): `--prefill-reps` rounds of prefills, then `--decode-reps` rounds of decode steps. The table
gives the plain medians in ms and the other variants as ratios of medians to plain. Other processes on the machine
add noise: compare ratios from one run only.

    python scripts/bench_mitigation.py [--contexts 256,1024,4096] [--prefill-reps 3] [--decode-reps 30]
        [--opset 18] [--threads 2] [--keep DIR]
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
VARIANTS = [("plain", None, None), ("clva off", "clva", False), ("clva on", "clva", True),
            ("sevi off", "sevi", False), ("sevi on", "sevi", True)]


def build(folder: Path, opset: int) -> dict[str, Path]:
    import shutil

    from exporter.export import export_model
    from exporter.testing import TinyLlavaSpec, build_tiny_llava
    from graph_passes.bake import BakeOptions, bake

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
    """One context length: synthetic prompt embeddings and masks shared by every variant."""

    def __init__(self, n: int, hidden: int, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.n = n
        self.embeds = (0.5 * rng.standard_normal((1, n, hidden))).astype(np.float32)  # [1, N, d]
        self.attention_mask = np.ones((1, n), np.int64)
        self.image_mask = np.zeros((1, n), bool)
        self.image_mask[0, 5:5 + min(576, n - 64)] = True
        self.step_embeds = (0.5 * rng.standard_normal((1, 1, hidden))).astype(np.float32)  # [1, 1, d]


class Runner:
    """One variant (artifact + flags) on one Case: its feeds and its own KV cache."""

    def __init__(self, pipe, case: Case, method: str | None, on: bool):
        from runtime.mitigation import decoder_feeds, parse_request

        self.pipe, self.case = pipe, case
        rows = [parse_request({method: True} if (method and on) else None, pipe.manifest.mitigation)]
        names = {n for n in pipe.decoder.input_names() if not n.startswith("past_key_values.")}
        names -= {"inputs_embeds", "attention_mask", "position_ids"}
        self.extra = decoder_feeds(pipe.manifest.mitigation, names, case.image_mask, rows)
        self.cache = None

    def prefill(self) -> tuple[float, float]:
        import numpy as np

        from runtime.kv_cache import KVCache

        p, n = self.pipe, self.case.n
        self.cache = KVCache(p.num_layers, 1, p.kv_heads, p.head_dim, n + 1, np.float32)
        t, c = time.perf_counter(), time.process_time()
        p._decode(self.case.embeds, self.case.attention_mask, np.arange(n, dtype=np.int64)[None], self.cache,
                  self.extra)
        return time.perf_counter() - t, time.process_time() - c

    def decode_step(self) -> tuple[float, float]:
        """One step at context n+1 over the prefill's cache, then rewound so the next call repeats the same step
        (the step reads one side of the ping-pong cache and writes the other)."""
        import numpy as np

        n = self.case.n
        mask = np.ones((1, n + 1), np.int64)
        t, c = time.perf_counter(), time.process_time()
        self.pipe._decode(self.case.step_embeds, mask, np.array([[n]], np.int64), self.cache, self.extra)
        elapsed = time.perf_counter() - t, time.process_time() - c
        self.cache.length -= 1
        self.cache._flip = 1 - self.cache._flip
        return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--decode-reps", type=int, default=30)
    ap.add_argument("--opset", type=int, default=18, choices=(18, 23))
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--keep", type=Path, default=None, help="Folder to build the bench model in (kept, reused).")
    args = ap.parse_args()

    from runtime.pipeline import Pipeline

    folder = args.keep or Path(tempfile.mkdtemp(prefix="anchorrt-bench-mitigation-"))
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"building the bench model in {folder} ...", file=sys.stderr)
    dirs = build(folder, args.opset)
    pipes = {k: Pipeline.from_dir(v, intra_op_threads=args.threads) for k, v in dirs.items()}
    hidden = pipes["plain"].hidden
    print(f"built in {time.perf_counter() - t0:.0f} s; opset {args.opset}, {args.threads} threads, "
          f"{args.prefill_reps} prefill / {args.decode_reps} decode-step interleaved repetitions", file=sys.stderr)

    rows = []
    for n in (int(c) for c in args.contexts.split(",")):
        case = Case(n, hidden)
        runners = {name: Runner(pipes[method or "plain"], case, method, on) for name, method, on in VARIANTS}
        prefill: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        decode: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for r in runners.values():  # warm-up, and the cache each variant's decode steps read
            r.prefill()
            r.decode_step()
        names = list(runners)
        for i in range(args.prefill_reps):
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotated: no variant always goes first
                prefill[name].append(runners[name].prefill())
        for i in range(args.decode_reps):
            for name in names[i % len(names):] + names[:i % len(names)]:
                decode[name].append(runners[name].decode_step())
        med = {name: [statistics.median(x[clock] for x in series[name]) for series in (prefill, decode)
                      for clock in (0, 1)] for name in runners}  # prefill wall, prefill cpu, decode wall, decode cpu
        rows.append((n, med))
        del runners
        print(f"  context {n} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    for clock, title in ((0, "wall-clock"), (1, "process CPU time (all threads)")):
        head = f"{'phase':8} {'context':>7} {'plain ms':>9} " + " ".join(f"{name:>9}" for name, _, _ in VARIANTS[1:])
        print(f"\n{title}, ratios to plain:\n{head}\n" + "-" * len(head))
        for phase, k in (("prefill", 0), ("decode", 2)):
            for n, med in rows:
                plain = med["plain"][k + clock]
                ratios = " ".join(f"{med[name][k + clock] / plain:9.3f}" for name, _, _ in VARIANTS[1:])
                print(f"{phase:8} {n:7d} {1000 * plain:9.2f} {ratios}")
    print(f"\nmedians of {args.prefill_reps} prefills / {args.decode_reps} decode steps per variant, interleaved; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
