"""Soak, short version: `scripts/soak.py` for 150 generations on the tiny artifact, in a process where torch cannot be
imported (so the baseline is the runtime's own memory). The full run (`make bench`, 1,000 generations) holds the
issue's bound of 5 %; here the bound is looser (10 %) because 150 generations leave onnxruntime's arena and the
allocator less time to settle, and the test must not be flaky on a shared machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import BLOCK_TORCH, ROOT


def test_soak_short(tiny_artifact):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BLOCK_TORCH), str(ROOT)]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--artifact", str(tiny_artifact),
                           "--generations", "150", "--warmup", "50", "--max-growth", "10"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"soak: 150 generations .* growth ([+-][0-9.]+) %", proc.stdout)
    assert m, proc.stdout
    assert float(m.group(1)) <= 10.0
