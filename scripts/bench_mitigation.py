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

Variants: plain, plain #2 (a second session of the same graph: the noise floor between sessions), clva off,
clva on (METHODS.md defaults), sevi off, sevi on (defaults). After one warm-up of each, the variants alternate in an
order rotated every round (whoever runs first in a round is measurably favoured or penalised): `--prefill-reps`
rounds of prefills (at 4k `--long-prefill-reps` samples, the warm-up counting as the first), then `--decode-reps` rounds of decode steps. Prefills run on
sessions without the CPU memory arena (a 4k opset-18 prefill allocates gigabytes, which an arena per session keeps),
decode steps on sessions with the runtime's defaults. The table gives plain medians in ms, the other variants as
ratios of medians to plain, and on/off within one session (the cost of the flags, free of the session noise).
Wall-clock and process CPU time are both printed; the default is one intra-op thread, where CPU time is the figure
other processes disturb least (on a shared 2-core machine, two ORT threads mostly wait for each other).

    python scripts/bench_mitigation.py [--contexts 256,1024,4096] [--prefill-reps 3] [--long-prefill-reps 1]
        [--decode-reps 30] [--opset 18] [--threads 1] [--keep DIR]
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
# (label, artifact, method, flags on); "plain #2" is a second session of the plain decoder: the noise floor
# between two sessions of one graph, to read the other ratios against.
VARIANTS = [("plain", "plain", None, False), ("plain #2", "plain", None, False), ("clva off", "clva", "clva", False),
            ("clva on", "clva", "clva", True), ("sevi off", "sevi", "sevi", False), ("sevi on", "sevi", "sevi", True)]


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


def decoder_pipeline(folder: Path, threads: int, arena: bool):
    """A Pipeline whose decoder session has the given threads and CPU memory arena setting."""
    import onnxruntime as ort

    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_dir(folder, intra_op_threads=threads)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = arena
    pipe.decoder._session = ort.InferenceSession(str(pipe.decoder.path), opts, providers=["CPUExecutionProvider"])
    return pipe


class Runner:
    """One variant (artifact + flags) on one Case: its feeds and its own KV cache. Prefills run on a session
    without the CPU memory arena (at 4k tokens the opset-18 decoder's attention matrices take gigabytes, which an
    arena per session would keep); decode steps run on a session with the runtime's default settings."""

    def __init__(self, prefill_pipe, decode_pipe, case: Case, method: str | None, on: bool):
        from runtime.mitigation import decoder_feeds, parse_request

        self.prefill_pipe, self.decode_pipe, self.case = prefill_pipe, decode_pipe, case
        rows = [parse_request({method: True} if (method and on) else None, decode_pipe.manifest.mitigation)]
        names = {n for n in decode_pipe.decoder.input_names() if not n.startswith("past_key_values.")}
        names -= {"inputs_embeds", "attention_mask", "position_ids"}
        self.extra = decoder_feeds(decode_pipe.manifest.mitigation, names, case.image_mask, rows)
        self.cache = None

    def prefill(self) -> tuple[float, float]:
        import numpy as np

        from runtime.kv_cache import KVCache

        p, n = self.prefill_pipe, self.case.n
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
        self.decode_pipe._decode(self.case.step_embeds, mask, np.array([[n]], np.int64), self.cache, self.extra)
        elapsed = time.perf_counter() - t, time.process_time() - c
        self.cache.length -= 1
        self.cache._flip = 1 - self.cache._flip
        return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--long-prefill-reps", type=int, default=1,
                    help="prefill samples at contexts >= 4096 (the warm-up run is the first)")
    ap.add_argument("--decode-reps", type=int, default=30)
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
    sessions = {(label, arena): decoder_pipeline(dirs[art], args.threads, arena)
                for label, art, _, _ in VARIANTS for arena in (False, True)}
    hidden = sessions[("plain", True)].hidden
    print(f"built in {time.perf_counter() - t0:.0f} s; opset {args.opset}, {args.threads} threads", file=sys.stderr)

    rows = []
    for n in (int(c) for c in args.contexts.split(",")):
        case = Case(n, hidden)
        long = n >= 4096  # a prefill takes tens of seconds: its warm-up run counts as the first sample
        reps = args.prefill_reps if not long else args.long_prefill_reps
        runners = {label: Runner(sessions[(label, False)], sessions[(label, True)], case, method, on)
                   for label, _, method, on in VARIANTS}
        prefill: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        decode: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for name, r in runners.items():  # warm-up, and the cache each variant's decode steps read
            first = r.prefill()
            if long:
                prefill[name].append(first)
            r.decode_step()
        names = list(runners)
        for i in range(reps - 1 if long else reps):
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotated: no variant always goes first
                prefill[name].append(runners[name].prefill())
        for i in range(args.decode_reps):
            for name in names[i % len(names):] + names[:i % len(names)]:
                decode[name].append(runners[name].decode_step())
        med = {name: [statistics.median(x[clock] for x in series[name]) for series in (prefill, decode)
                      for clock in (0, 1)] for name in runners}  # prefill wall, prefill cpu, decode wall, decode cpu
        rows.append((n, reps, med))
        del runners
        print(f"  context {n} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    labels = [label for label, _, _, _ in VARIANTS[1:]]
    for clock, title in ((0, "wall-clock"), (1, "process CPU time (all threads)")):
        head = (f"{'phase':8} {'context':>7} {'reps':>4} {'plain ms':>9} " + " ".join(f"{x:>9}" for x in labels)
                + f" {'clva on/off':>11} {'sevi on/off':>11}")
        print(f"\n{title}; ratios to plain, and on/off within one session:\n{head}\n" + "-" * len(head))
        for phase, k in (("prefill", 0), ("decode", 2)):
            for n, reps, med in rows:
                plain = med["plain"][k + clock]
                ratios = " ".join(f"{med[x][k + clock] / plain:9.3f}" for x in labels)
                on_off = [med[f"{m} on"][k + clock] / med[f"{m} off"][k + clock] for m in ("clva", "sevi")]
                print(f"{phase:8} {n:7d} {reps if k == 0 else args.decode_reps:4d} {1000 * plain:9.2f} {ratios} "
                      f"{on_off[0]:11.3f} {on_off[1]:11.3f}")
    print(f"\nmedians per variant, interleaved in rotated order; opset {args.opset}, {args.threads} threads; load "
          f"average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
