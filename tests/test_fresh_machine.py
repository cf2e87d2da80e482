"""What a fresh machine needs (issue 13 items 1-3): the CPU torch install with its fallback, the project's
interpreter for everything `make` runs, and the CLI findable after `make demo`."""

from __future__ import annotations

import http.server
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

INSTALL = ROOT / "scripts" / "install_torch.sh"


@pytest.fixture
def fake_python(tmp_path) -> tuple[Path, Path]:
    """A stand-in interpreter: runs the real one for `-c` (the index probe), logs `-m pip ...` calls."""
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then shift 2; echo "$*" >> {log}; exit 0; fi
exec {sys.executable} "$@"
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake, log


def _run(fake: Path, index: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    proc = subprocess.run(["bash", str(INSTALL), str(fake), "torch==2.13.0"], capture_output=True, text=True,
                          env=dict(os.environ, TORCH_CPU_INDEX=index), timeout=60)
    return proc, time.perf_counter() - t


def test_cpu_index_used_when_it_answers(fake_python, tmp_path):
    fake, log = fake_python
    (tmp_path / "www" / "torch").mkdir(parents=True)
    (tmp_path / "www" / "torch" / "index.html").write_text("<html></html>")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"http://127.0.0.1:{server.server_address[1]}/"
        proc, _ = _run(fake, index)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and f"--index-url {index}" in calls[0] and calls[0].endswith("torch==2.13.0")


def test_falls_back_at_once_when_the_cpu_index_does_not_answer(fake_python):
    fake, log = fake_python
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, seconds = _run(fake, f"http://127.0.0.1:{port}/")
    assert proc.returncode == 0, proc.stderr
    assert "does not answer" in proc.stdout
    assert log.read_text().splitlines() == ["install -q torch==2.13.0"]  # the default index, no --index-url
    assert seconds < 15


def test_makefile_installs_torch_through_the_script_and_puts_the_venv_on_path():
    make = (ROOT / "Makefile").read_text()
    assert "scripts/install_torch.sh $(PY) $(TORCH)" in make
    assert "pip install -q $(TORCH)" not in make  # the plain install resolves to the CUDA build on PyPI
    assert "export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)" in make
    dry = subprocess.run(["make", "-n", "-C", str(ROOT), "test"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr


def test_cli_reachable_after_install_and_readme_says_how():
    cli = Path(sys.executable).parent / "anchorrt"
    assert cli.exists(), "the anchorrt console script is installed next to the interpreter"
    proc = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Usage" in proc.stdout
    quick = (ROOT / "README.md").read_text().split("## Install")[0]
    assert "source .venv/bin/activate" in quick
