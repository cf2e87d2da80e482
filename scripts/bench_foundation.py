"""Foundation benchmark: the ONNX Runtime pipeline vs transformers eager `generate`, measured in one run.

Bench model: a random-weight LLaVA with an 8-layer, hidden-512 Llama and a 336-px CLIP tower (patch 14 → 576 image
tokens), built in code. Both sides start from the same preprocessed pixels; each side is warmed up, then the two
alternate for `--reps` repetitions and we report medians:
  - time to first token (TTFT): vision encoder + embedding + prefill + the first token,
  - per decode step: (generate(1 + N tokens) - generate(1 token)) / N for transformers; the runtime's own step timer.
The figures printed are ratios (runtime / transformers); absolute CPU times are printed for context only.

    python scripts/bench_foundation.py [--reps 5] [--new-tokens 32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCH_SPEC = dict(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1376, vision_hidden=128, vision_layers=2,
                  vision_heads=4, image_size=336, patch_size=14, max_position_embeddings=2048)


def build(folder: Path):
    from anchorrt.exporter.export import export_model
    from anchorrt.exporter.testing import TinyLlavaSpec, build_tiny_llava

    model_dir = folder / "bench-llava"
    art = folder / "bench-artifact"
    if not (art / "manifest.json").exists():
        build_tiny_llava(model_dir, TinyLlavaSpec(**BENCH_SPEC))
        export_model(model_dir, art, force=True, progress=lambda m: print("  " + m, file=sys.stderr))
    return model_dir, art


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--keep", type=Path, default=None, help="Folder to build the bench model in (kept).")
    args = ap.parse_args()

    import numpy as np
    import torch
    from anchorrt.runtime.pipeline import Pipeline
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = args.keep or Path(tempfile.mkdtemp(prefix="anchorrt-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"building the bench model in {folder} ...", file=sys.stderr)
    model_dir, art = build(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 500, 3), dtype=np.uint8))
    prompt = "Describe the content of the image in detail."

    pipe = Pipeline.from_dir(art)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    inputs = processor(images=[image], text=[pipe.manifest.prompt["template"].replace("{prompt}", prompt)],
                       return_tensors="pt")
    n = args.new_tokens
    prompt_tokens = inputs["input_ids"].shape[1]

    def hf(new_tokens: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - t

    def ort() -> tuple[float, float]:
        r = pipe.generate_batch([(image, prompt)], max_new_tokens=n, stop_token_ids=())[0]
        ttft = r.timings["vision_s"] + r.timings["prefill_s"] + r.timings["decode_steps_s"][0]
        return ttft, statistics.median(r.timings["decode_steps_s"][1:])

    # warm-up both sides
    hf(1), hf(2), ort()
    hf_ttft, hf_step, ort_ttft, ort_step = [], [], [], []
    for _ in range(args.reps):  # interleaved so that machine noise hits both sides alike
        one = hf(1)
        hf_ttft.append(one)
        hf_step.append((hf(1 + n) - one) / n)
        a, b = ort()
        ort_ttft.append(a)
        ort_step.append(b)
    med = statistics.median
    print(f"\nbench model: 8 layers, hidden 512, 576 image tokens, prompt {prompt_tokens} tokens, {n} new tokens, "
          f"{args.reps} interleaved reps (median), torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"{'':28}{'runtime (ORT CPU)':>20}{'transformers eager':>22}{'ratio':>10}")
    print(f"{'time to first token':28}{1000 * med(ort_ttft):>17.1f} ms{1000 * med(hf_ttft):>19.1f} ms"
          f"{med(ort_ttft) / med(hf_ttft):>10.2f}x")
    print(f"{'per decode step':28}{1000 * med(ort_step):>17.2f} ms{1000 * med(hf_step):>19.2f} ms"
          f"{med(ort_step) / med(hf_step):>10.2f}x")
    print(f"(ratios < 1 mean the runtime is faster; spread of runtime step medians: "
          f"{1000 * min(ort_step):.2f}-{1000 * max(ort_step):.2f} ms)")


if __name__ == "__main__":
    main()
