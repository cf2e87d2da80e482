"""Builds every model scripts/device/checks.sh times (run beside pytest -m gpu), so the timed runs only load them."""
import importlib.util
import sys
import time
from pathlib import Path

root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(root))


def load(name):
    spec = importlib.util.spec_from_file_location(name, root / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


t = time.time()
bp = load("bench_peers")
folder = Path("/tmp/bp")
folder.mkdir(parents=True, exist_ok=True)
model_dir = bp.build_checkpoint(folder, False)
bp.build_language_model(folder, model_dir)
for precision in ("fp16", "int4"):
    bp.build_anchorrt(folder, model_dir, precision, half=True)
layers = bp.BENCH_SPEC["layers"]  # checks.sh's mitigation rows: SEVI from L // 4, as bench_peers defaults
bp.build_baked(folder, folder / "anchorrt-fused-fp32", "fp16", layers // 4, half=True)
print(f"prebuild: bench_peers models in {time.time() - t:.0f} s", flush=True)
t = time.time()
bg = load("bench_gpu")
for precision, quantize in (("fp16", None), ("fp16", "int4")):
    for baked in (True, False):  # bench_gpu's flags-off / plain column
        bg.build(Path("/tmp/bg"), "bench", precision, quantize, baked=baked)
print(f"prebuild: bench_gpu models in {time.time() - t:.0f} s", flush=True)
