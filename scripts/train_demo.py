"""Train the demo LLaVA of the synthetic world and write its Hugging Face folder (fp16 safetensors).

    python scripts/train_demo.py --out samples/demo-llava            # the shipped model: seed 0, 2 cores

The recipe and the world are in `exporter/demo/train.py` and `runtime/eval/world.py`. Deterministic for a seed
and a thread count (`--threads`, default 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning. On 2 cores shared with other processes a
# spinning thread burns the core its partner needs; a training step measured 17-35 s with the default policy and
# 1.1-1.3 s with PASSIVE under the same load (4-5 runnable processes). Results are the same either way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchorrt.exporter.demo.train import DemoSpec, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("samples/demo-llava"), help="checkpoint folder to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a DemoSpec field, e.g. --set seed=1 --set llava_steps=300 (repeatable)")
    args = parser.parse_args()
    spec = DemoSpec()
    types = {f.name: type(getattr(spec, f.name)) for f in fields(DemoSpec)}
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in types or types[key] is tuple:
            parser.error(f"unknown or unsupported field {key!r}; known: {', '.join(sorted(types))}")
        spec = replace(spec, **{key: types[key](value)})
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    log(f"training the demo model into {args.out} with {spec}")
    record = train(args.out, spec, log=log)
    log(f"done: {sum(record['seconds'].values()) / 60:.1f} min of training wall time, "
        f"{sum(record['cpu_seconds'].values()) / 60:.1f} min of CPU time on {spec.threads} threads; wrote {args.out}")


if __name__ == "__main__":
    main()
