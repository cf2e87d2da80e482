#!/usr/bin/env bash
# Install the CPU build of PyTorch into the given interpreter's environment.
#
#   scripts/install_torch.sh PYTHON [SPEC]        (SPEC defaults to torch==2.13.0)
#
# The public package index resolves `torch` to the CUDA build (about 20 nvidia packages, several GB). PyTorch
# publishes CPU wheels on its own index: use it when it answers, and fall back to the default index at once when it
# does not (a host that is not resolvable or refuses fails in milliseconds; a silent one is cut off by the probe's
# timeout). Neither path can hang: the probe has a 5 s timeout and pip runs with --retries 0 against that index.
# Override the index with TORCH_CPU_INDEX (tests point it at a local server).
set -euo pipefail
py=${1:?usage: install_torch.sh PYTHON [SPEC]}
spec=${2:-torch==2.13.0}
index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
probe="import sys, urllib.request as u; u.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=5)"
if "$py" -c "$probe" "$index" >/dev/null 2>&1; then
  echo "installing $spec (CPU build) from $index"
  if "$py" -m pip install -q --retries 0 --timeout 30 --index-url "$index" "$spec"; then
    exit 0
  fi
  echo "PyTorch's CPU index failed mid-install: installing $spec from the default index instead"
else
  echo "PyTorch's CPU index ($index) does not answer: installing $spec from the default index"
  echo "(on a machine without a local CPU wheel this is the CUDA build: several GB)"
fi
exec "$py" -m pip install -q "$spec"
