"""Every ```bash block of every samples/*/README.md runs, torch made unimportable, against the fixture artifact."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BLOCK_TORCH, ROOT

BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def blocks(readme: Path) -> list[str]:
    return BLOCK.findall(readme.read_text())


def project_env(**extra: str) -> dict:
    """The environment a README block runs in: this interpreter's folder first on PATH, so the `python` and
    `anchorrt` a block calls are the project's (a fresh machine's default `python` has none of its packages)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path, **extra)


def test_blocks_use_the_project_interpreter():
    proc = subprocess.run(["bash", "-c", "python -c 'import sys; print(sys.prefix)'"], env=project_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == sys.prefix


# READMEs with runnable blocks (```sh blocks are shown, not run: they need torch, a GPU or an hour)
READMES = [r for r in sorted((ROOT / "samples").glob("*/README.md")) if blocks(r)]


def test_samples_with_runnable_blocks():
    assert {r.parent.name for r in READMES} >= {"01_embed_runtime", "demo-llava"}


@pytest.mark.parametrize("readme", READMES, ids=[r.parent.name for r in READMES])
def test_sample_readme_blocks_run(readme, tiny_artifact, images, tmp_path):
    found = blocks(readme)
    image = tmp_path / "image.png"
    images[0].save(image)
    env = project_env(ARTIFACT=str(tiny_artifact), IMAGE=str(image),
                      PYTHONPATH=os.pathsep.join([str(BLOCK_TORCH), str(ROOT)]))
    for i, block in enumerate(found):
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"block {i} of {readme}:\n{block}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
