"""Builds every model scripts/device/checks.sh times (run beside pytest -m gpu), so the timed runs only load them.

    python3 scripts/device/prebuild.py      # on the GPU machine: /tmp/bp (bench_peers), /tmp/bg (bench_gpu)

`main(model=<a tiny checkpoint>, tiny=True)` builds the same set at tiny sizes (tests/test_device_scripts.py), so a
change to bench_peers' or bench_gpu's builders that would break this script on the device (where a failure costs the
session's device time) fails on the CPU first."""
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: scripts/device/prebuild.py)
BENCH_PEERS_FOLDER, BENCH_GPU_FOLDER = Path("/tmp/bp"), Path("/tmp/bg")  # checks.sh's --folder and --keep


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(bp_folder: Path = BENCH_PEERS_FOLDER, bg_folder: Path = BENCH_GPU_FOLDER, model: Path | None = None,
         tiny: bool = False) -> None:
    """bench_peers' models in `bp_folder` (its checkpoint, or `model` as its --model), bench_gpu's in `bg_folder`
    (shape "tiny" when `tiny`, else "bench")."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    t = time.time()
    bp = load("bench_peers")
    bp_folder.mkdir(parents=True, exist_ok=True)
    model_dir = bp.build_checkpoint(bp_folder, tiny, model)
    bp.build_language_model(bp_folder, model_dir)
    for precision in ("fp16", "int4"):
        bp.build_anchorrt(bp_folder, model_dir, precision, half=True)
    layers = json.loads((model_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    # checks.sh's mitigation rows: SEVI from L // 4, as bench_peers defaults
    bp.build_baked(bp_folder, bp_folder / "anchorrt-fused-fp32", "fp16", layers // 4, half=True)
    print(f"prebuild: bench_peers models in {time.time() - t:.0f} s", flush=True)
    t = time.time()
    bg = load("bench_gpu")
    for precision, quantize in (("fp16", None), ("fp16", "int4")):
        for baked in (True, False):  # bench_gpu's flags-off / plain column
            bg.build(bg_folder, "tiny" if tiny else "bench", precision, quantize, baked=baked)
    print(f"prebuild: bench_gpu models in {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
