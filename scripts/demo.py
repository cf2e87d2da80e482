"""`make demo`: export the embedded default model and answer questions about a few images.

Uses the trained demo model in samples/demo-llava when it is there; otherwise a tiny random-weight LLaVA built
in code (its answers are noise: it shows the pipeline, not a model).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "out"


def main() -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    from exporter.export import export_model
    from runtime.pipeline import Pipeline

    model = ROOT / "samples" / "demo-llava"
    if not (model / "config.json").exists():
        from exporter.testing import build_tiny_llava

        print("samples/demo-llava is not there: using a tiny random-weight LLaVA (answers will be noise)")
        model = build_tiny_llava(OUT / "tiny-llava")
    art = OUT / f"{model.name}-onnx"
    t = time.perf_counter()
    export_model(model, art, force=True, progress=lambda m: print("  " + m))
    print(f"exported {model.name} → {art} in {time.perf_counter() - t:.1f} s")

    pipe = Pipeline.from_dir(art)
    rng = np.random.default_rng(0)
    for i, (shape, colour) in enumerate([("circle", "red"), ("square", "blue"), ("triangle", "green")]):
        img = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(150, 230, 3)))
        d = ImageDraw.Draw(img)
        box = (24, 24, 72, 72)
        if shape == "circle":
            d.ellipse(box, fill=colour)
        elif shape == "square":
            d.rectangle(box, fill=colour)
        else:
            d.polygon([(48, 20), (20, 76), (76, 76)], fill=colour)
        path = OUT / f"demo-{i}.png"
        img.save(path)
        for prompt in (f"Is there a {shape} in the image?", "Describe the image."):
            r = pipe.generate(path, prompt, max_new_tokens=16)
            steps = r.timings["decode_steps_s"]
            print(f"[{path.name}] {prompt!r} → {r.text!r}  (first token {1000 * r.timings['prefill_s']:.0f} ms, "
                  f"{len(steps) / max(sum(steps), 1e-9):.0f} tok/s)")


if __name__ == "__main__":
    main()
