"""AnchorRT's decoder against the engines a user would otherwise pick, on the same random weights (issue 18).

Bench model: a random-weight LLaVA whose language model is a Llama of hidden 1024, 16 layers, 16 heads,
intermediate 2816, vocabulary 32000 (built in code, nothing downloaded). The peers run that language model alone
on token ids; AnchorRT runs its decoder graph on embeddings of the same length (the runtime's own decoder calls:
`Pipeline.prefill_embeds`, chunked as the runtime chunks a one-row prompt, and `Pipeline._decode`, with its KV
cache), so every engine does one prefill of N tokens and then decode steps at context N+1, N+2, ...
AnchorRT's step is that decoder pass alone. GenAI's `generate_next_token` also embeds the token (in its graph) and
picks it (greedy search in C++); AnchorRT's runtime does these around the pass, in its embed graph's own session
and in Python: its token loop measured 0.33-0.39 ms a token above the pass (the embed run 0.12-0.14 ms of it, 23 us
when timed alone: after the decoder's pass its state is out of the caches) on the int4 bench artifact with a
~600-token LLaVA prompt, 2026-11-28. Compare the rows with that in mind:

    anchorrt-fused     export --attention fused   (GroupQueryAttention, KV cache written in place)
    anchorrt-unfused   export --attention unfused (opset-18 MatMul/Softmax, ping-pong KV cache)
    anchorrt-baked     anchorrt-fused with CLVA, SEVI and the IAVA probe baked (issue 18's mitigation goals), run as
                       four rows: every flag off, CLVA on, SEVI on, IAVA (both streams as one batch of 2 + the
                       contrastive scores, as runtime/pipeline.py decodes them); see MITIGATION below
    genai              ONNX Runtime GenAI, its model builder (`onnxruntime_genai.models.builder`)
    llamacpp           llama-cpp-python on a GGUF from the converter its sdist ships (`convert_hf_to_gguf.py`), two
                       rows per precision: its default f16 KV cache, and "(f32 cache)", the cache precision AnchorRT's
                       and GenAI's CPU artifacts keep (at 2100 tokens the cache is most of a q4_0 step's bytes)
    transformers       LlamaForCausalLM, attn_implementation="sdpa"

each in fp32 and int4 (AnchorRT: MatMulNBits block 32, accuracy level 4; GenAI: its int4 with accuracy level 4;
llama.cpp: q4_0; transformers: fp32 only). Rounds are interleaved: in every round each engine is loaded in turn (in
an order rotated every round), measures every context, and is released, so machine load hits all engines alike;
the table gives medians over rounds (per-step: the median step of each round), in ms and as ratios to
anchorrt-fused of the same precision. Memory bandwidth bound: the bytes one decode step must read (the weights
minus the embedding table, plus K and V of every layer at that context) divided by this machine's measured read
bandwidth (numpy, 1 GiB); each engine's fraction = bound / measured step.

Mitigation rows (anchorrt-baked): the prompt is [5 text | image span of min(576, N - 64) | text] (`visual_mask`),
the decode steps are text rows after it; SEVI starts at layer L // 4 (12 of this model's 16 layers: the share the
default start 8 edits in LLaVA-1.5's 32, `--sevi-start-layer` to change), CLVA and the probe at their METHODS.md
defaults; IAVA's V* row hides all but ceil(10%) of the image span (the default i). Only IAVA's per-token figure is
compared (its prefill here is one batch-2 pass, not the runtime's probe + V* prefills). These rows are measured
after the peers, in one process holding the plain fused artifact of the same precision and one session of the
baked one (`measure_mitigation`): every row prefills once per context, then `--mitigation-rounds` blocks of
`--steps` decode steps (the cache rewound after each, a 0.25 s pause before each) alternate between the rows and
a "plain" row; ratios are to that plain row, printed beside the goals. Loading each row in its own round, as the
peers are, left ratios of 0.90-1.16x for flags off (which costs nothing measurable in one process: 0.97-1.02x):
between-session spread on this machine is larger than the goals. Even in one process two sessions of the same
plain artifact differed by up to 7% (int4, 300 tokens), so the table carries a control row, "plain, 2nd
session": its ratio to plain is the noise floor of the other rows. Each row's floor is printed beside it: "bytes",
the ratio of the bytes its step must read to plain's (`extra_layers_read`), and "ops", the kernels its step adds
(onnxruntime's profiler, one step each, `step_kernels`: an `If` and the nodes of the branch it took all count),
priced at a small op's dispatch cost measured here (`dispatch_cost_s`); floor = bytes + ops x dispatch / plain step.

A peer that is not installed is named, with its install command, and left out; nothing is installed here.

`--device cuda` (onnxruntime-gpu): AnchorRT on the CUDA execution provider in fp16 and fp16+int4 (`--precisions
fp16,int4`; the fused form's GroupQueryAttention has CUDA kernels for fp16/bf16 only) and transformers sdpa in fp16
on the same GPU; GenAI and llama.cpp are CPU builds here and are left out (named). The bound uses the GPU's
device-to-device copy bandwidth measured with torch (bytes read + written / time), and fp16 weights and cache.

    python scripts/bench_peers.py [--contexts 300,1100,2100] [--rounds 2] [--steps 8] [--threads 2]
        [--engines anchorrt-fused,anchorrt-unfused,genai,llamacpp,transformers] [--precisions fp32,int4]
        [--folder DIR (kept and reused)] [--quick (one context, one round)] [--tiny (a tiny model: smoke test)]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCH_SPEC = dict(layers=16, hidden=1024, heads=16, kv_heads=16, intermediate=2816, vision_hidden=64, vision_layers=1,
                  vision_heads=4, image_size=336, patch_size=14, max_position_embeddings=4608, vocab_size=32000)
TINY_SPEC = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, max_position_embeddings=256)
ENGINES = ("anchorrt-fused", "anchorrt-unfused", "anchorrt-baked", "genai", "llamacpp", "transformers")
# anchorrt-baked's rows: variant -> (request spec of the stream that answers, issue 18's goal per decode step as a
# ratio to anchorrt-fused); "iava" decodes a second (V*) stream beside it
MITIGATION = {"flags off": (None, 1.02), "clva on": ({"clva": True}, 1.05), "sevi on": ({"sevi": True}, 1.05),
              "iava": (None, 1.3)}
INSTALL = {"genai": "pip install onnxruntime-genai", "llamacpp": "pip install llama-cpp-python gguf",
           "transformers": "pip install torch transformers"}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ building


def build_checkpoint(folder: Path, tiny: bool, given: Path | None = None) -> Path:
    from anchorrt.exporter.testing import TinyLlavaSpec, build_tiny_llava

    if given is not None:
        return given
    model_dir = folder / "llava"
    if not (model_dir / "config.json").exists():
        say("building the bench checkpoint (random weights)")
        build_tiny_llava(model_dir, TinyLlavaSpec(**(TINY_SPEC if tiny else BENCH_SPEC)))
    return model_dir


def precision_tag(precision: str, half: bool) -> str:
    """The folder suffix of a converted artifact: int4 with fp16 activations (the GPU) is its own artifact."""
    return precision + ("-fp16" if half and precision == "int4" else "")


def convert_copy(source: Path, out: Path, precision: str, half: bool, what: str) -> Path:
    """`out` = a copy of the fp32 artifact `source` converted to `precision` (kept and reused): fp16, or int4
    (MatMulNBits, accuracy level 4) with fp16 activations when `half` (the GPU)."""
    from anchorrt.graph_passes.bake import PrecisionOptions, convert_precision

    if not (out / "manifest.json").exists():
        say(f"converting {what} to {precision}" + (" (fp16 activations)" if half else ""))
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(source, out)
        convert_precision(out, PrecisionOptions(precision="fp16") if precision == "fp16" else
                          PrecisionOptions(precision="fp16" if half else "fp32", quantize="int4", accuracy_level=4))
    return out


def build_anchorrt(folder: Path, model_dir: Path, precision: str, unfused: Path | None = None,
                   half: bool = False) -> dict[str, Path]:
    """anchorrt-unfused = one export with --attention unfused (or a copy of `unfused`, such an export of the same
    checkpoint); anchorrt-fused = the same graphs through the fusion pass (graph_passes/fuse_attention.py); int4 =
    both quantized (MatMulNBits, accuracy level 4), with fp16 activations when `half` (the GPU); fp16 = converted."""
    from anchorrt.exporter.export import export_model
    from anchorrt.graph_passes.bake import fuse_artifact

    out = {}
    base = {"unfused": folder / "anchorrt-unfused-fp32", "fused": folder / "anchorrt-fused-fp32"}
    if unfused is not None and not (base["unfused"] / "manifest.json").exists():
        shutil.copytree(unfused, base["unfused"], dirs_exist_ok=True)
    if not (base["unfused"] / "manifest.json").exists():
        say("exporting AnchorRT (unfused)")
        export_model(model_dir, base["unfused"], attention="unfused", force=True)
    if not (base["fused"] / "manifest.json").exists():
        shutil.rmtree(base["fused"], ignore_errors=True)
        shutil.copytree(base["unfused"], base["fused"])
        fuse_artifact(base["fused"])
    for form, path in base.items():
        if precision == "fp32":
            out[form] = path
            continue
        out[form] = convert_copy(path, folder / f"anchorrt-{form}-{precision_tag(precision, half)}", precision, half,
                                 f"AnchorRT ({form})")
    return out


def build_baked(folder: Path, fused_fp32: Path, precision: str, sevi_start: int, half: bool = False) -> Path:
    """anchorrt-fused with CLVA, SEVI (from `sevi_start`) and the IAVA probe baked into the fp32 graphs, then
    converted to `precision` as build_anchorrt converts (mitigation is baked before a precision change)."""
    from anchorrt.graph_passes.bake import BakeOptions, bake

    fp32 = folder / f"anchorrt-baked-fp32-sevi{sevi_start}"
    if not (fp32 / "manifest.json").exists():
        say(f"baking CLVA, SEVI (from layer {sevi_start}) and the IAVA probe into AnchorRT (fused, fp32)")
        shutil.rmtree(fp32, ignore_errors=True)
        shutil.copytree(fused_fp32, fp32)
        bake(fp32, "clva,sevi,probe", BakeOptions(sevi_start_layer=sevi_start), verify=False)
    if precision == "fp32":
        return fp32
    return convert_copy(fp32, folder / f"anchorrt-baked-{precision_tag(precision, half)}-sevi{sevi_start}", precision,
                        half, "the baked AnchorRT")


def build_language_model(folder: Path, model_dir: Path) -> Path:
    """The LLaVA checkpoint's language model as a Hugging Face Llama folder (what the peers load)."""
    lm_dir = folder / "llama"
    if (lm_dir / "config.json").exists():
        return lm_dir
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    lm = LlamaForCausalLM(llava.config.text_config)
    state = {"model." + k: v for k, v in llava.model.language_model.state_dict().items()}
    state["lm_head.weight"] = llava.lm_head.weight
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise RuntimeError(f"language model weights do not line up: missing {missing}, unexpected {unexpected}")
    lm.save_pretrained(lm_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(lm_dir)
    return lm_dir


def build_genai(folder: Path, lm_dir: Path, precision: str, threads: int) -> Path:
    out = folder / f"genai-{precision}"
    if not (out / "genai_config.json").exists():
        say(f"building ONNX Runtime GenAI ({precision}) with its model builder")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(lm_dir), "-o", str(out), "-p",
               precision, "-e", "cpu", "-c", str(folder / "genai-cache")]
        if precision == "int4":
            cmd += ["--extra_options", "int4_accuracy_level=4"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"GenAI model builder failed: {res.stderr[-2000:]}")
    config = json.loads((out / "genai_config.json").read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out


CONVERT = """
import runpy, sys
from pathlib import Path
conv = sys.argv[1]
sys.argv = [conv] + sys.argv[2:]
sys.path.insert(0, str(Path(conv).parent))
try:
    import conversion.base as base  # llama.cpp's converter package (2026 layout)
    original = base.TextModel.get_vocab_base_pre

    def pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # the bench model's tokenizer is built in code: no known pre-tokenizer hash
            return "default"
    base.TextModel.get_vocab_base_pre = pre
except ImportError:
    pass
runpy.run_path(conv, run_name="__main__")
"""


def find_converter() -> str | None:
    """llama.cpp's `convert_hf_to_gguf.py`: $LLAMA_CPP_CONVERTER, PATH, or the llama-cpp-python sdist that
    `make bench-peers` unpacks under .bench/ (the installed wheel does not ship the converter)."""
    found = os.environ.get("LLAMA_CPP_CONVERTER") or shutil.which("convert_hf_to_gguf.py")
    if found:
        return found
    unpacked = sorted(Path(__file__).resolve().parents[1].glob(".bench/llama_cpp_python-*/vendor/llama.cpp/"
                                                              "convert_hf_to_gguf.py"))
    return str(unpacked[-1]) if unpacked else None


def build_gguf(folder: Path, lm_dir: Path, precision: str) -> Path:
    """llama.cpp's converter -> f32 GGUF; q4_0 through llama_cpp.llama_model_quantize. The bench model's tokenizer
    (built in code) has no pre-tokenizer the converter knows, so it runs with that one check falling back to
    llama.cpp's "default" pre-tokenizer (CONVERT): token ids are random here, the weights are what is compared."""
    import llama_cpp

    f32 = folder / "llama-f32.gguf"
    if not f32.exists():
        converter = find_converter()
        if converter is None:
            raise RuntimeError("llama.cpp's convert_hf_to_gguf.py not found; run `make bench-peers` (it unpacks the "
                               "llama-cpp-python sdist under .bench/) or set LLAMA_CPP_CONVERTER to it")
        res = subprocess.run([sys.executable, "-c", CONVERT, converter, str(lm_dir), "--outfile", str(f32),
                              "--outtype", "f32"], capture_output=True, text=True)
        if res.returncode != 0:
            f32.unlink(missing_ok=True)
            raise RuntimeError(f"GGUF conversion failed: {res.stderr[-2000:]}")
    if precision == "fp32":
        return f32
    q4 = folder / "llama-q4_0.gguf"
    if not q4.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(q4).encode(), params) != 0:
            raise RuntimeError("llama.cpp q4_0 quantization failed")
    return q4


# ------------------------------------------------------------------------------------------------------- engines


class AnchorRT:
    def __init__(self, folder: Path, threads: int, device: str = "cpu", profile: Path | None = None):
        from anchorrt.runtime.pipeline import Pipeline

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
        self.pipe = Pipeline.from_dir(folder, intra_op_threads=threads, verify=False, providers=providers)
        if profile is not None:  # onnxruntime's profiler on from the session's start (no second build)
            self.pipe.decoder.start_profiling(profile)
        _ = self.pipe.decoder.session  # built now; a CPU fallback is refused (runtime/backend.py)

    def run(self, n: int, steps: int, seed: int) -> tuple[float, list[float]]:
        stream = Stream(self.pipe, n, steps, seed)
        return stream.prefill(), stream.block()


def image_span(n: int) -> tuple[int, int]:
    """[start, stop) of the bench prompt's image tokens at context n (scripts/bench_mitigation.py's layout)."""
    return 5, 5 + (min(576, n - 64) if n > 128 else n // 2)


class Stream:
    """One request on an AnchorRT pipeline at context n, with its own cache: `prefill()` once, then each `block()`
    times `steps` decode steps and rewinds the cache, so every block measures the same steps. `variant` names a
    MITIGATION row (the runtime's feeds for that request, runtime/mitigation.py); None: a plain artifact."""

    def __init__(self, pipe, n: int, steps: int, seed: int, variant: str | None = None):
        import math

        import numpy as np
        from anchorrt.runtime.iava import PROBE_ENABLE
        from anchorrt.runtime.mitigation import decoder_feeds, parse_request

        self.pipe, self.n, self.steps, self.iava = pipe, n, steps, variant == "iava"
        rows = 2 if self.iava else 1  # IAVA: row 0 the V* stream, row 1 the answering one
        embeds_type = next(i for i in pipe.decoder.session.get_inputs() if i.name == "inputs_embeds").type
        dtype = "float16" if embeds_type == "tensor(float16)" else "float32"
        rng = np.random.default_rng(seed)
        self.embeds = np.repeat((0.5 * rng.standard_normal((1, n, pipe.hidden))).astype(dtype), rows, axis=0)
        self.step = np.repeat((0.5 * rng.standard_normal((1, 1, pipe.hidden))).astype(dtype), rows, axis=0)
        start, stop = image_span(n)
        image = np.zeros((rows, n), bool)
        image[:, start:stop] = True
        self.mask = np.ones((rows, n), np.int64)
        if self.iava:  # V*: only the irrelevant tokens (the default i = 10%, rounded up) stay visible
            self.mask[0, start + math.ceil(0.1 * (stop - start)):stop] = 0
        self.extra = {}
        if variant is not None:
            spec = MITIGATION[variant][0]
            names = {x for x in pipe.decoder.input_names() if not x.startswith("past_key_values.")}
            names -= {"inputs_embeds", "attention_mask", "position_ids", PROBE_ENABLE}
            self.extra = decoder_feeds(pipe.manifest.mitigation, names, image,
                                       [parse_request(spec, pipe.manifest.mitigation)] * rows)
            if PROBE_ENABLE in pipe.decoder.input_names():
                self.extra[PROBE_ENABLE] = np.zeros(rows, bool)
        self.cache = pipe._new_cache(rows, n + steps + 1)
        self.lengths = np.full(rows, n, np.int64)  # cache slots per row (runtime/iava.py compacts the V* row)

    def prefill(self) -> float:
        """The prompt of every row as one pass; IAVA: then the V* row compacted, as the runtime does after its V*
        prefill (runtime/pipeline.py `_generate_iava`; timed with the prefill)."""
        import numpy as np
        from anchorrt.runtime.iava import compact_contrastive_rows, compacted_mask, compaction_allowed

        positions = np.repeat(np.arange(self.n, dtype=np.int64)[None], self.mask.shape[0], axis=0)
        t = time.perf_counter()
        self.pipe.prefill_embeds(self.embeds, self.mask, positions, self.cache, self.extra)
        if self.iava and compaction_allowed(self.pipe.manifest.row_lengths, self.cache, self.extra):
            self.lengths[:1] = compact_contrastive_rows(self.cache, self.mask[:1])
            self.mask = np.concatenate([compacted_mask(self.mask[:1], self.lengths[:1]), self.mask[1:]])
        return time.perf_counter() - t

    def block(self) -> list[float]:
        import numpy as np
        from anchorrt.runtime.iava import append_token, contrastive_scores

        times, mask, lengths = [], self.mask, self.lengths
        for s in range(self.steps):
            mask, lengths = append_token(mask, lengths)
            t = time.perf_counter()
            logits = self.pipe._decode(self.step, mask, np.full((len(mask), 1), self.n + s, np.int64), self.cache,
                                       self.extra)
            if self.iava:  # the runtime's per-token work beside the batch-2 pass (runtime/pipeline.py)
                contrastive_scores(logits[1:], logits[:1], np.ones(1))
            times.append(time.perf_counter() - t)
        self.cache.rewind(self.steps)
        return times


PAUSE_S = 0.25  # before each mitigation block: the other session's spinning threads park (measure_mitigation)
CONTROL = "plain, 2nd session"  # measure_mitigation's control row: the same plain artifact in another session


def measure_mitigation(plain: Path, baked: Path, threads: int, device: str, contexts: list[int], rounds: int,
                       steps: int) -> tuple[dict, dict]:
    """Issue 18's mitigation goals on one artifact pair, in one process: the plain fused artifact and one session
    of the baked one (whose four MITIGATION rows differ only in their feeds). Per context every row prefills once,
    then `rounds` blocks of `steps` decode steps alternate between the rows in an order rotated every block.
    -> ({row: {ctx: median over blocks of the block's median step}}, {row: {ctx: prefill s}}); row "plain" too."""
    # Two sessions in one process: a session's worker threads spin for a while after its run and took a core from
    # the other session's next block (plain, the only row whose block follows the other session's, measured 1.1-1.25x
    # slower than its own flags-off copy at int4). A pause before every block lets the spinning threads park, so no
    # row is favoured and both sessions keep onnxruntime's default (spinning) threads.
    # CONTROL: a second session of the plain artifact. Identical sessions in one process differed by up to 7% on
    # this machine (int4, 300 tokens: 8.13 vs 7.55 ms; memory placement, not the graph), so its ratio to "plain" is
    # the noise floor of every ratio in the table.
    spare = first_session(lambda: AnchorRT(plain, threads, device))  # see first_session; kept to the end
    pipes = {"plain": AnchorRT(plain, threads, device).pipe, CONTROL: AnchorRT(plain, threads, device).pipe,
             "baked": AnchorRT(baked, threads, device).pipe}
    labels = ["plain", CONTROL, *MITIGATION]
    step: dict[str, dict[int, float]] = {x: {} for x in labels}
    prefill: dict[str, dict[int, float]] = {x: {} for x in labels}
    for n in contexts:
        streams = {x: Stream(pipes.get(x, pipes["baked"]), n, steps, seed=n, variant=None if x in pipes else x)
                   for x in labels}
        blocks: dict[str, list[float]] = {x: [] for x in labels}
        for x, stream in streams.items():
            prefill[x][n] = stream.prefill()
            stream.block()  # warm-up
        for r in range(rounds):
            for x in labels[r % len(labels):] + labels[:r % len(labels)]:
                time.sleep(PAUSE_S)
                times = streams[x].block()
                blocks[x].append(step_median(times))
        for x in labels:
            step[x][n] = median(blocks[x])
        say(f"mitigation rows at context {n} done")
        del streams
    del spare
    return step, prefill


def first_session(make, context: int = 64):
    """Build and run an engine that is never measured, and return it for the caller to keep alive while it measures
    others. In one process the ONNX Runtime session created first ran slower per step than identical sessions
    created after it: three sessions of the bench's int4 artifact, created A, B, C, blocks rotated, 300 tokens, five
    processes: A 1.015-1.062x B (mean 1.041; the slowest of the three every time); with a spare session built, run
    and kept before them, A 0.984-1.032x (mean 1.004); at 1100 tokens 0.997-1.011x either way (three processes
    each). So the engine or row created first would otherwise carry that alone (at 300 tokens: the first engine of
    round 1, and measure_mitigation's plain row, the denominator of every mitigation ratio).
    `make`: a factory of an engine with `run(n, steps, seed)`."""
    engine = make()
    engine.run(context, 2, seed=97)
    return engine


def step_kernels(artifact: Path, threads: int, device: str, n: int, variants: list[str | None]) -> dict:
    """Kernels onnxruntime runs in one decode step at context n, per row: the profiler's node events inside that
    step's run, the nodes of every `If` branch it took included, so a row's count minus plain's is the ops its
    method adds to a step (what it pays in dispatch, whatever each op computes). `variants`: MITIGATION rows on a
    baked artifact, or [None] (a plain one). One profiled session: every row prefills, then each decodes one step
    in `variants`' order, so the last len(variants) runs are those steps. -> {row or "plain": count}"""
    with tempfile.TemporaryDirectory(prefix="anchorrt-bench-profile-") as tmp:
        pipe = AnchorRT(artifact, threads, device, profile=Path(tmp) / "step").pipe
        streams = [Stream(pipe, n, 1, seed=n, variant=v) for v in variants]
        for stream in streams:
            stream.prefill()
        for stream in streams:
            stream.block()
        events = json.loads(Path(pipe.decoder.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-len(variants):]
    kernels = [e["ts"] for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    return {v or "plain": sum(1 for t in kernels if r["ts"] <= t <= r["ts"] + r["dur"]) for v, r in zip(variants, runs)}


def dispatch_cost_s(threads: int, device: str, row: list[int], chain: int = 200, reps: int = 7) -> float:
    """Seconds onnxruntime spends per small op: a graph of `chain` Adds on a float32 tensor of shape `row` (a
    mitigation branch's [B, H, 1, K] attention row) against the same graph without them, best of `reps` timings of
    200 runs each, the tensor bound on `device` once. The ops a method adds to a step cost about this each."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper  # a dev dependency of this script; the runtime never imports onnx

    def timed(adds: int) -> float:
        nodes = [helper.make_node("Add", ["x" if i == 0 else f"a{i - 1}", "one"], [f"a{i}"]) for i in range(adds)]
        nodes.append(helper.make_node("Identity", [f"a{adds - 1}" if adds else "x"], ["y"]))
        graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, row)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, row)],
                                  [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        binding = sess.io_binding()
        x = ort.OrtValue.ortvalue_from_numpy(np.zeros(row, np.float32), device, 0)
        y = ort.OrtValue.ortvalue_from_shape_and_type(row, np.float32, device, 0)
        binding.bind_ortvalue_input("x", x)
        binding.bind_ortvalue_output("y", y)
        for _ in range(50):
            sess.run_with_iobinding(binding)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(200):
                sess.run_with_iobinding(binding)
            best = min(best, (time.perf_counter() - t) / 200)
        return best

    return max(timed(chain) - timed(0), 0.0) / chain


class Transformers:
    def __init__(self, lm_dir: Path, threads: int, device: str = "cpu"):
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)
        self.torch, self.device = torch, device
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.model = LlamaForCausalLM.from_pretrained(lm_dir, attn_implementation="sdpa", dtype=dtype).to(device).eval()

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(self, n: int, steps: int, seed: int) -> tuple[float, list[float]]:
        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(10, self.model.config.vocab_size, (1, n), generator=g).to(self.device)
        with torch.inference_mode():
            self._sync()
            t = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self._sync()
            prefill = time.perf_counter() - t
            times = []
            for _ in range(steps):
                nxt = out.logits[:, -1:].argmax(-1)
                self._sync()
                t = time.perf_counter()
                out = self.model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
                self._sync()
                times.append(time.perf_counter() - t)
        return prefill, times


class GenAI:
    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]

    def run(self, n: int, steps: int, seed: int) -> tuple[float, list[float]]:
        import numpy as np

        og = self.og
        ids = np.random.default_rng(seed).integers(10, self.vocab, (1, n), dtype=np.int32)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=n + steps + 1, batch_size=1, do_sample=False)
        gen = og.Generator(self.model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        prefill = time.perf_counter() - t
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            gen.generate_next_token()
            times.append(time.perf_counter() - t)
        return prefill, times


class LlamaCpp:
    """`cache`: llama.cpp's KV cache type, "f16" (its default) or "f32" (what AnchorRT's and GenAI's CPU artifacts
    keep: at long contexts the cache is most of a q4_0 step's bytes, so the two differ by its size)."""

    F32 = 0  # GGML_TYPE_F32 (ggml.h), llama_context_params.type_k / type_v

    def __init__(self, gguf: Path, threads: int, n_ctx: int, cache: str = "f16"):
        import llama_cpp

        kv = {"type_k": self.F32, "type_v": self.F32} if cache == "f32" else {}
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_batch=512,
                                   logits_all=False, verbose=False, **kv)

    def run(self, n: int, steps: int, seed: int) -> tuple[float, list[float]]:
        import numpy as np

        rng = np.random.default_rng(seed)
        ids = rng.integers(10, self.llm.n_vocab(), n).tolist()
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        prefill = time.perf_counter() - t
        times = []
        for _ in range(steps):
            # a random next id: without logits_all the binding keeps only the last batch's logit rows (weights
            # are random, so no engine's choice means anything; a step costs the same for any id)
            nxt = int(rng.integers(10, self.llm.n_vocab()))
            t = time.perf_counter()
            self.llm.eval([nxt])
            times.append(time.perf_counter() - t)
        return prefill, times


def missing_peer(engine: str) -> str | None:
    import importlib.util

    module = {"genai": "onnxruntime_genai", "llamacpp": "llama_cpp", "transformers": "transformers"}.get(engine)
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{engine}: not installed ({INSTALL[engine]})"
    return None


# ------------------------------------------------------------------------------------------------------ numbers


def read_bandwidth_gbs(size_bytes: int = 1 << 30, reps: int = 3, threads: int = 1) -> float:
    """Best of `reps` full reads of a `size_bytes` float32 array (numpy's sum: one pass, memory-bound), split
    over `threads` threads as the engines' `--threads` split a step (numpy releases the GIL while it sums): one
    thread's bandwidth made the bound of a 2-thread step too low (engines ran at "1.46 of bound")."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(size_bytes // 4, np.float32)
    parts = np.array_split(a, max(1, threads))
    best = float("inf")
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        for _ in range(reps):
            t = time.perf_counter()
            list(pool.map(lambda x: x.sum(dtype=np.float32), parts))
            best = min(best, time.perf_counter() - t)
    return size_bytes / best / 1e9


def cuda_bandwidth_gbs(size_bytes: int = 1 << 30, reps: int = 5) -> float:
    """Best of `reps` device-to-device copies of `size_bytes` (torch), counting the bytes read and written."""
    import torch

    a = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * size_bytes / best / 1e9


def step_bytes(spec: dict, vocab: int, context: int, precision: str, cache_bytes: int = 4) -> float:
    """Bytes one decode step reads: every weight but the embedding table (one row of it), plus K and V of every
    layer at `context` (`cache_bytes` an element: fp32 on the CPU, fp16 on the GPU). int4: 0.5 byte a weight plus
    a scale per block of 32 (0.625 bytes), norms fp32."""
    d, f, layers = spec["hidden"], spec["intermediate"], spec["layers"]
    kv = spec["kv_heads"] * (d // spec["heads"])
    matmul = layers * (d * d * 2 + d * kv * 2 + 3 * d * f) + d * vocab  # q, o, k, v, gate/up/down, lm_head
    per_weight = {"fp32": 4.0, "fp16": 2.0}.get(precision, 0.625)
    norms = (2 * layers + 1) * d * 4
    return matmul * per_weight + norms + 2 * layers * key_bytes(spec, context, cache_bytes)


def key_bytes(spec: dict, context: int, cache_bytes: int = 4) -> float:
    """Bytes of one layer's key cache (or value cache) at `context`."""
    return spec["kv_heads"] * (spec["hidden"] // spec["heads"]) * context * cache_bytes


def gpu_name() -> str:
    """bench_gpu.py's nvidia-smi query (its sibling file, loaded by path: scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).with_name("bench_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gpu_name() or "GPU name unknown"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def step_median(times: list[float]) -> float:
    """The median decode step of one series, without its first step when there are more than two."""
    return median(times[1:] if len(times) > 2 else times)


def table(title: str, rows: dict[str, dict[int, float]], contexts: list[int], base: str, unit: str = "ms",
          scale: float = 1e3, extra: dict[str, dict[int, float]] | None = None) -> str:
    lines = [f"\n{title}", "| engine | " + " | ".join(f"ctx {c}" for c in contexts) + " |",
             "|---|" + "---|" * len(contexts)]
    for name, by_ctx in rows.items():
        cells = []
        for c in contexts:
            v = by_ctx.get(c)
            if v is None:
                cells.append("-")
                continue
            ratio = v / rows[base][c] if base in rows and rows[base].get(c) else float("nan")
            frac = f", {extra[name][c]:.2f} of bound" if extra and name in extra and c in extra[name] else ""
            cells.append(f"{v * scale:.3g} {unit} ({ratio:.2f}x{frac})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contrastive_slots(n: int) -> int:
    """The cache slots of the bench's V* row at context n once compacted (runtime/iava.py): the prompt without the
    image tokens it hides (all but the default i = ceil(10%) of the span)."""
    import math

    start, stop = image_span(n)
    return n - (stop - start) + math.ceil(0.1 * (stop - start))


def extra_layers_read(manifest: dict, n: int) -> dict[str, float]:
    """Per MITIGATION row, how many layers' key caches (K of one layer at context n) a decode step reads beyond the
    plain step, from the baked manifest: CLVA's statistics recompute the rows of l_neg and l_pos (one read of each
    layer's K); SEVI's edit needs each edited layer's last-row logits before the fused node (one read of its K,
    graph_passes/sevi.py); IAVA decodes a second stream (K and V of every layer once more, of its compacted length
    when the artifact reads per-row lengths; the weights are read once for both rows)."""
    mit = manifest.get("mitigation") or {}
    clva = mit.get("clva", {}).get("layers", {})
    sevi = mit.get("sevi", {}).get("layers", {}).get("edited_layers", [])
    layers = int(manifest.get("dims", {}).get("num_layers", 0))
    from anchorrt.runtime.manifest import Manifest

    star = contrastive_slots(n) / n if Manifest(Path(), manifest).row_lengths else 1.0  # the runtime's own rule
    return {"flags off": 0.0, "clva on": float(len({clva.get("l_neg"), clva.get("l_pos")} - {None})),
            "sevi on": float(len(sevi)), "iava": 2.0 * layers * star}


def mitigation_table(precision: str, step: dict[str, dict[int, float]], contexts: list[int],
                     floors: dict[str, dict[int, float]] | None = None, kernels: dict[str, int] | None = None,
                     dispatch: dict[int, float] | None = None) -> str:
    """measure_mitigation's rows per decode step as ratios to its plain row, each against issue 18's goal, and, when
    given, the ratio of the bytes the row's step must read to the plain step's (`extra_layers_read`): where a step
    is bound by memory bandwidth, a goal below that ratio cannot be met by this graph form. With `kernels` (each
    row's kernels a step, `step_kernels`) and `dispatch` (seconds a small op, `dispatch_cost_s`, per context): the
    ops the row adds and its floor = bytes ratio + added ops x dispatch / plain step, what the row would cost if
    its extra work were only its extra bytes and the dispatch of its extra ops."""
    plain = step["plain"]
    lines = [f"\nmitigation per decode step, {precision} (one process: plain fused and baked artifacts, blocks "
             "interleaved; ratio to plain; issue 18's goal; bytes = the bytes the row's step must read / the plain step's, "
             "the ratio a step bound by memory bandwidth alone would show"
             + ("; ops = kernels the row adds to a step; floor = bytes + ops x dispatch / plain step)" if kernels
                else ")"),
             "| row | goal | " + " | ".join(f"ctx {c}" for c in contexts) + " |", "|---|---|" + "---|" * len(contexts),
             "| plain | - | " + " | ".join(f"{plain[c] * 1e3:.3g} ms" for c in contexts) + " |"]
    if kernels and dispatch:
        lines.insert(1, f"plain step: {kernels['plain']} kernels; a small op's dispatch "
                        + " / ".join(f"{dispatch[c] * 1e6:.2f} us" for c in contexts) + " at ctx "
                        + " / ".join(str(c) for c in contexts) + " ([1, H, 1, ctx] Add chain, `dispatch_cost_s`)")
    if CONTROL in step:  # the same graph in another session: the spread every other ratio carries
        lines.append(f"| {CONTROL} | (noise floor) | " + " | ".join(
            f"{step[CONTROL][c] * 1e3:.3g} ms ({step[CONTROL][c] / plain[c]:.2f}x)" for c in contexts) + " |")
    for variant, (_, goal) in MITIGATION.items():
        cells = []
        for c in contexts:
            ratio = step[variant][c] / plain[c]
            floor = f", bytes {floors[variant][c]:.2f}x" if floors else ""
            if floors and kernels and dispatch:
                added = kernels[variant] - kernels["plain"]
                floor += f", ops {added:+d}, floor {floors[variant][c] + added * dispatch[c] / plain[c]:.2f}x"
            cells.append(f"{step[variant][c] * 1e3:.3g} ms ({ratio:.2f}x, {'met' if ratio <= goal else 'not met'}"
                         f"{floor})")
        lines.append(f"| {variant} | <= {goal}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="300,1100,2100")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per context and round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--precisions", default="fp32,int4")
    ap.add_argument("--folder", type=Path, default=None, help="where the models are built (kept and reused)")
    ap.add_argument("--quick", action="store_true", help="one context (the first), one round: a smoke run")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (tests); contexts are capped at 200")
    ap.add_argument("--json", type=Path, default=None, help="also write the medians here")
    ap.add_argument("--model", type=Path, default=None, help="an existing LLaVA checkpoint folder instead of building one")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: AnchorRT on the CUDA EP (fp16, fp16+int4) and transformers fp16 on the GPU")
    ap.add_argument("--mitigation-rounds", type=int, default=6,
                    help="anchorrt-baked: interleaved blocks of --steps decode steps per row and context")
    ap.add_argument("--sevi-start-layer", type=int, default=None,
                    help="anchorrt-baked's SEVI start layer (default L // 4: LLaVA-1.5's share of edited layers)")
    ap.add_argument("--unfused-artifact", type=Path, default=None,
                    help="an existing `export --attention unfused` of --model (reused instead of exporting)")
    args = ap.parse_args(argv)

    contexts = [int(c) for c in args.contexts.split(",")]
    rounds = args.rounds
    if args.quick:
        contexts, rounds, args.mitigation_rounds = contexts[:1], 1, 1
    if args.tiny:
        contexts = [min(c, 200) for c in contexts]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engine(s) {sorted(unknown)}; known: {', '.join(ENGINES)}")
    precisions = [p.strip() for p in args.precisions.split(",")]
    cuda = args.device == "cuda"
    allowed = {"fp16", "int4"} if cuda else {"fp32", "int4"}
    if set(precisions) - allowed:
        ap.error(f"--precisions takes {' and/or '.join(sorted(allowed))} with --device {args.device}")
    if cuda:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            ap.error("--device cuda needs onnxruntime-gpu (pip install \"anchorrt[gpu]\") and an NVIDIA GPU; this "
                     f"onnxruntime has {', '.join(ort.get_available_providers())}")
    skipped = [m for e in engines if (m := missing_peer(e))]
    if cuda:
        skipped += [f"{e}: its CPU build here (--device cuda measures AnchorRT and transformers)" for e in engines
                    if e in ("genai", "llamacpp")]
        engines = [e for e in engines if e not in ("genai", "llamacpp")]
    for m in skipped:
        say(f"skipped {m}")
    engines = [e for e in engines if not missing_peer(e)]

    folder = args.folder or Path(tempfile.mkdtemp(prefix="anchorrt-bench-peers-"))
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = build_checkpoint(folder, args.tiny, args.model)
    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    vocab = text["vocab_size"]
    spec = dict(hidden=text["hidden_size"], intermediate=text["intermediate_size"], layers=text["num_hidden_layers"],
                heads=text["num_attention_heads"],
                kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"])  # the model measured

    # every (engine, precision) as a factory, so that each round loads and releases it
    factories = {}
    cache_bytes: dict[str, int] = {}  # a row's KV bytes an element, where it is not the device's default
    mitigation_jobs: dict[str, tuple[Path, Path]] = {}  # precision -> (plain fused, baked) artifacts
    need_lm = any(e in engines for e in ("genai", "llamacpp", "transformers"))
    lm_dir = build_language_model(folder, model_dir) if need_lm else None
    for precision in precisions:
        if any(e.startswith("anchorrt") for e in engines):
            arts = build_anchorrt(folder, model_dir, precision, args.unfused_artifact, half=cuda)
            for form in ("fused", "unfused"):
                if f"anchorrt-{form}" in engines:
                    factories[f"anchorrt-{form} {precision}"] = (
                        lambda p=arts[form]: AnchorRT(p, args.threads, args.device))
            if "anchorrt-baked" in engines:
                layers = json.loads((model_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
                start = args.sevi_start_layer if args.sevi_start_layer is not None else layers // 4
                mitigation_jobs[precision] = (arts["fused"], build_baked(folder, folder / "anchorrt-fused-fp32",
                                                                         precision, start, half=cuda))
        top = "fp16" if cuda else "fp32"
        if "transformers" in engines and precision == top:
            factories[f"transformers-sdpa {top}"] = lambda: Transformers(lm_dir, args.threads, args.device)
        for peer, build in (("genai", build_genai), ("llamacpp", build_gguf)):
            if peer not in engines:
                continue
            try:
                path = build(folder, lm_dir, precision, args.threads) if peer == "genai" else build(folder, lm_dir,
                                                                                                   precision)
            except Exception as e:  # a peer that cannot build is reported, not fatal
                skipped.append(f"{peer} {precision}: {str(e).splitlines()[0][:300]}")
                say(f"skipped {skipped[-1]}")
                continue
            if peer == "genai":
                factories[f"genai {precision}"] = lambda p=path: GenAI(p, args.threads)
                continue
            weights = "f32" if precision == "fp32" else "q4_0"
            for cache, name in (("f16", f"llama.cpp {weights}"), ("f32", f"llama.cpp (f32 cache) {weights}")):
                factories[name] = (lambda p=path, k=cache: LlamaCpp(p, args.threads, max(contexts) + args.steps + 8, k))
                cache_bytes[name] = 2 if cache == "f16" else 4

    prefill: dict[str, dict[int, list[float]]] = {n: {c: [] for c in contexts} for n in factories}
    step: dict[str, dict[int, list[float]]] = {n: {c: [] for c in contexts} for n in factories}
    names = list(factories)
    try:  # kept to the end of the rounds; an engine that cannot load is reported by the rounds below
        spare = first_session(factories[names[0]], min(contexts)) if names else None
    except Exception:
        spare = None
    for r in range(rounds if names else 0):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            say(f"round {r + 1}/{rounds}: {name}")
            try:
                engine = factories[name]()
            except Exception as e:
                skipped.append(f"{name}: {str(e).splitlines()[0][:300]}")
                say(f"skipped {skipped[-1]}")
                continue
            engine.run(min(contexts), 2, seed=99)  # warm-up
            if cuda:  # and at every length: a CUDA session's first run at a new size pays its arena's allocations
                for c in contexts:
                    engine.run(c, 1, seed=98)
            for c in contexts:
                p, times = engine.run(c, args.steps, seed=c)
                prefill[name][c].append(p)
                step[name][c].append(step_median(times))
            del engine
    del spare

    mitigation = {}
    kernels: dict[str, dict[str, int]] = {}  # precision -> row -> kernels a decode step runs
    for precision, (plain, baked) in mitigation_jobs.items():
        say(f"mitigation rows ({precision}): {args.mitigation_rounds} interleaved blocks of {args.steps} steps")
        mitigation[precision] = measure_mitigation(plain, baked, args.threads, args.device, contexts,
                                                   args.mitigation_rounds, args.steps)
        kernels[precision] = {**step_kernels(plain, args.threads, args.device, contexts[0], [None]),
                              **step_kernels(baked, args.threads, args.device, contexts[0], list(MITIGATION))}
    dispatch = ({c: dispatch_cost_s(args.threads, args.device, [1, spec["heads"], 1, c]) for c in contexts}
                if mitigation_jobs else {})

    gbs = cuda_bandwidth_gbs() if cuda else read_bandwidth_gbs(1 << (24 if args.tiny else 30), threads=args.threads)
    med_step = {n: {c: median(v) for c, v in by.items() if v} for n, by in step.items()}
    med_prefill = {n: {c: median(v) for c, v in by.items() if v} for n, by in prefill.items()}
    device_cache = 2 if cuda else 4  # KV bytes an element: fp16 on the GPU, fp32 on the CPU
    fraction = {}
    for n, by in med_step.items():
        precision = "fp32" if (n.endswith(" fp32") or n.endswith(" f32")) else "fp16" if "fp16" in n else "int4"
        fraction[n] = {c: step_bytes(spec, vocab, c, precision, cache_bytes.get(n, device_cache)) / (gbs * 1e9) / t
                       for c, t in by.items()}
    where = f"device {args.device}" + (f" ({gpu_name()})" if cuda else "")
    how = "torch device copy, read + written" if cuda else f"numpy, {args.threads} thread(s), best of 3"
    print(f"bench_peers: {'tiny' if args.tiny else 'bench'} model, {where}, threads {args.threads}, rounds {rounds} "
          f"(interleaved), {args.steps} decode steps per context; bandwidth {gbs:.1f} GB/s ({how})")
    for precision in precisions:
        base = f"anchorrt-fused {precision}"
        rows = {n: v for n, v in med_step.items() if n.endswith(f" {precision}") or (precision == "int4" and "q4_0" in n)
                or (precision == "fp32" and n.endswith(" f32"))}
        if rows:
            print(table(f"per decode step, {precision} (ratio to {base}; fraction of the bandwidth bound)", rows,
                        contexts, base, extra=fraction))
            prows = {n: v for n, v in med_prefill.items() if n in rows}
            print(table(f"prefill, {precision} (ratio to {base})", prows, contexts, base, unit="s", scale=1.0))
        if precision in mitigation:
            baked = json.loads((mitigation_jobs[precision][1] / "manifest.json").read_text())
            floors = {v: {c: 1 + extra_layers_read(baked, c)[v] * key_bytes(spec, c, device_cache)
                          / step_bytes(spec, vocab, c, precision, device_cache) for c in contexts} for v in MITIGATION}
            print(mitigation_table(precision, mitigation[precision][0], contexts, floors, kernels[precision],
                                   dispatch))
    top = "fp16" if cuda else "fp32"
    if f"transformers-sdpa {top}" in med_prefill:
        print(table(f"prefill vs transformers sdpa (ratio to transformers-sdpa {top})",
                    {n: v for n, v in med_prefill.items() if n.endswith(f" {top}")}, contexts,
                    f"transformers-sdpa {top}", unit="s", scale=1.0))
    for m in skipped:
        print(f"not measured: {m}")
    result = {"contexts": contexts, "rounds": rounds, "threads": args.threads, "device": args.device, "read_gbs": gbs, "step_s": med_step,
              "prefill_s": med_prefill, "bound_fraction": fraction,
              "mitigation_step_s": {p: m[0] for p, m in mitigation.items()},
              "mitigation_prefill_s": {p: m[1] for p, m in mitigation.items()}, "mitigation_kernels": kernels,
              "dispatch_s": dispatch, "skipped": skipped, "folder": str(folder)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
