#!/bin/bash
# On the GPU machine (device tool, repository root), after the earlier parts were copied into .ortstage/:
# onnxruntime-gpu from the parts, then `pytest -m gpu` beside the benchmark model builds, then the timed runs one at
# a time (nothing else on the GPU): bench_peers --device cuda (the engines, then the mitigation rows),
# scripts/bench_gpu.py fp16 and fp16+int4.
# Everything goes to $OUT (log.txt, pytest_gpu.txt, *.json).
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p .ortstage && cp .ortxz/p*/part-* .ortstage/
( cd .ortstage && cat part-* > ort.tar.xz && sha256sum -c ../.ortxz/SHA256 ) || { echo "parts incomplete: $(ls .ortstage)"; exit 3; }
mkdir -p /tmp/site && tar -C /tmp/site -xJf .ortstage/ort.tar.xz || exit 4
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 5
export PYTHONPATH=$PWD:/tmp/site  # anchorrt/ extends its path to the checkout's runtime/exporter/graph_passes
python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"
el "setup done"
( timeout 330 python3 scripts/device/prebuild.py > "$OUT/prebuild.txt" 2>&1; echo "prebuild rc=$?" >> "$OUT/prebuild.txt" ) &
PB=$!
timeout 300 python3 -m pytest -m gpu tests -q -rs -s -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" | grep "passed\|failed\|Error\|per step\|CUDA vs"
el "pytest -m gpu done"
wait $PB; tail -3 "$OUT/prebuild.txt"
el "prebuild done"
timeout 200 python3 scripts/bench_peers.py --device cuda --folder /tmp/bp --engines anchorrt-fused,transformers --precisions fp16,int4 --contexts 300,1100,2100 --rounds 2 --steps 16 --threads 8 --json "$OUT/bench_peers_cuda.json" 2>&1 | grep "^|\|^bench_peers\|^prefill\|^per decode\|^not measured"
el "bench_peers done"
# issue 18's mitigation rows on CUDA (fp16), each with its floor (bytes + the kernels it adds, bench_peers.step_kernels)
timeout 240 python3 scripts/bench_peers.py --device cuda --folder /tmp/bp --engines anchorrt-baked --precisions fp16 --contexts 300,1100,2100 --steps 16 --mitigation-rounds 4 --threads 8 --json "$OUT/bench_mitigation_cuda.json" 2>&1 | grep "^|\|^bench_peers\|^mitigation\|^plain step\|^not measured"
el "bench_peers mitigation rows done"
for q in "" "--quantize int4"; do
  timeout 120 python3 scripts/bench_gpu.py --shape bench --precision fp16 $q --keep /tmp/bg --batches 1,8 --new-tokens 32 --reps 3 --json "$OUT/bench_gpu_fp16${q:+_int4}.json" 2>&1 | grep -v "^  \|Writing\|Loading\|W:onnxruntime"
  el "bench_gpu fp16 $q done"
done
