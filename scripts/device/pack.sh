#!/usr/bin/env bash
# Here (a CPU machine with the package registries): onnxruntime-gpu for a GPU machine that has no network, in as few
# transfers as the device tool's 64 MiB working-tree limit allows. The wheel (CUDA 13, CPython 3.12; 256 MB) is
# unpacked and recompressed with xz (203 MB: 4 parts of 52 MiB instead of 7 of 40), with a sha256 of the archive;
# transformers and onnx-ir wheels at the versions CI tests go to .whl/ (the GPU image has older ones).
#   usage (project root): bash scripts/device/pack.sh        -> .ortxz/p0..p3, .ortxz/SHA256, .whl/
set -euo pipefail
bash ../shared/tools/ort-gpu-parts.sh .ortgpu >/dev/null
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD"/.ortgpu/wheel/onnxruntime_gpu-*.whl)
rm -rf .ortxz && mkdir -p .ortxz
tar -C "$tmp" -cf - . | xz -9 -T0 > .ortxz/ort.tar.xz
rm -rf "$tmp"
(cd .ortxz && sha256sum ort.tar.xz > SHA256 && split -b 52M -d ort.tar.xz part- && rm ort.tar.xz &&
 for p in part-*; do d=p$((10#${p#part-})); mkdir "$d"; mv "$p" "$d/"; done)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl transformers==5.24.0 onnx-ir==1.1.0
ls -d .ortxz/p* && echo "then: one device run per part but the last (carry .ortxz/pK; copy it into .ortstage/), and"\
  "the last with carry .ortxz/pN .ortxz/SHA256 .whl: bash scripts/device/checks.sh"
