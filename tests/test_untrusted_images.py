"""Issue 13 item 4: hostile image inputs on a model that pads to a square (LLaVA's expand2square, `do_pad`).

A 1 x 70000 PNG used to grow the process to ~10 GB (the padded 70000 x 70000 square was allocated before any size
check), a 100000 x 1 PNG gave numpy's "Unable to allocate 27.9 GiB" traceback, and a FIFO passed as the image hung
for ever (it was opened before the regular-file check). Each is now a one-line ImageError before any allocation.

The hostile PNGs are tiny to make (70000 pixels). Every check that could regress into a huge allocation or a hang
runs in a subprocess under an address-space limit and a timeout, so a regression fails instead of taking the
machine down."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import BLOCK_TORCH, ROOT

HOSTILE = {"tall": (1, 70_000), "wide": (100_000, 1)}  # (width, height)
TIMEOUT = 60  # a run takes ~1 s; the FIFO regression hung for ever


def _png(path: Path, width: int, height: int) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return path


def _limit_memory(gib: int):
    def apply() -> None:
        limit = gib << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def _run(args: list[str], gib: int, block_torch: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    path = ([str(BLOCK_TORCH)] if block_torch else []) + [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(path + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=TIMEOUT,
                          preexec_fn=_limit_memory(gib))


@pytest.fixture(scope="module")
def pad_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """tiny_artifact with LLaVA's pad-to-square switched on (the manifest is not among the hashed files)."""
    art = tmp_path_factory.mktemp("artifacts") / "tiny-pad"
    shutil.copytree(tiny_artifact, art)
    data = json.loads((art / "manifest.json").read_text())
    data["preprocessing"]["do_pad"] = True
    (art / "manifest.json").write_text(json.dumps(data, indent=2))
    return art


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    files = {k: _png(folder / f"{k}.png", w, h) for k, (w, h) in HOSTILE.items()}
    fifo = folder / "fifo.png"
    os.mkfifo(fifo)  # opening it to read blocks until a writer comes: for ever
    files["fifo"] = fifo
    return files


PREPROCESS = textwrap.dedent("""
    import sys
    from anchorrt.runtime.errors import ImageError
    from anchorrt.runtime.preprocess import ImagePreprocessor, load_image
    params = {"do_convert_rgb": True, "do_pad": True, "do_resize": True, "shortest_edge": 336, "resample": 3,
              "do_center_crop": True, "crop_size": [336, 336], "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}
    try:
        ImagePreprocessor(params)(load_image(sys.argv[1]))
    except ImageError as err:
        print(err)
        sys.exit(2)
    print("no error")
""")


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_preprocessor_refuses_padded_square_over_limit(hostile, kind):
    proc = _run(["-c", PREPROCESS, str(hostile[kind])], gib=2)
    w, h = HOSTILE[kind]
    side = max(w, h)
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    line = proc.stdout.strip()
    assert "\n" not in line and f"padding it to a square would make it {side}x{side}" in line, line
    assert "limit of 64000000" in line, line


def test_preprocessor_bounds_resize_target_and_takes_the_limit():
    from anchorrt.runtime.errors import ImageError
    from anchorrt.runtime.preprocess import ImagePreprocessor

    from tests.test_preprocess import make_params

    image = Image.new("RGB", (8, 2000))
    with pytest.raises(ImageError) as err:  # no pad: the resize 336 x 84000 is over a limit of 1 Mpx
        ImagePreprocessor(make_params(336, 336), max_pixels=1_000_000)(image)
    assert "\n" not in str(err.value) and "would make it 336x84000" in str(err.value)
    with pytest.raises(ImageError) as err:  # pad: 2000 x 2000 square over 1 Mpx, refused before the resize
        ImagePreprocessor(make_params(336, 336, do_pad=True), max_pixels=1_000_000)(image)
    assert "padding it to a square would make it 2000x2000" in str(err.value)
    out = ImagePreprocessor(make_params(16, 16, do_pad=True), max_pixels=4_000_000)(image)
    assert out.shape == (1, 3, 16, 16)
    with pytest.raises(ImageError):
        ImagePreprocessor(make_params(), max_pixels=0)


def test_preprocessor_limit_follows_the_environment(monkeypatch):
    from anchorrt.runtime.errors import ImageError
    from anchorrt.runtime.preprocess import MAX_PIXELS_ENV, ImagePreprocessor

    from tests.test_preprocess import make_params

    pre = ImagePreprocessor(make_params(16, 16, do_pad=True))
    image = Image.new("RGB", (10, 100))
    assert pre(image).shape == (1, 3, 16, 16)
    monkeypatch.setenv(MAX_PIXELS_ENV, "9999")
    with pytest.raises(ImageError) as err:
        pre(image)
    assert "100x100 = 10000 pixels, over the limit of 9999" in str(err.value)


PIPELINE = textwrap.dedent("""
    import sys
    from anchorrt.runtime.errors import ImageError
    from anchorrt.runtime.pipeline import Pipeline
    pipe = Pipeline.from_dir(sys.argv[1])
    try:
        pipe.generate(sys.argv[2], "hi", max_new_tokens=1)
    except ImageError as err:
        print(err)
        sys.exit(2)
    print("no error")
""")


@pytest.mark.parametrize("kind", ["tall", "wide", "fifo"])
def test_pipeline_refuses_hostile_images(pad_artifact, hostile, kind):
    proc = _run(["-c", PIPELINE, str(pad_artifact), str(hostile[kind])], gib=6, block_torch=True)
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    line = proc.stdout.strip()
    assert "\n" not in line, line
    if kind == "fifo":
        assert "it is a FIFO (named pipe), not a regular file" in line, line
    else:
        assert "padding it to a square" in line, line


@pytest.mark.parametrize("kind", ["tall", "wide", "fifo"])
def test_cli_refuses_hostile_images(pad_artifact, hostile, kind):
    proc = _run(["-m", "anchorrt", "generate", str(pad_artifact), "--image", str(hostile[kind]), "--prompt", "hi"],
                gib=6, block_torch=True)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    assert ("FIFO" if kind == "fifo" else "padding it to a square") in err, err


def test_other_special_files_are_refused(tmp_path):
    import socket

    from anchorrt.runtime.errors import ImageError
    from anchorrt.runtime.preprocess import load_image

    with pytest.raises(ImageError) as err:
        load_image("/dev/null")
    assert "it is a device, not a regular file" in str(err.value)
    with pytest.raises(ImageError) as err:
        load_image(tmp_path)
    assert "directory" in str(err.value)
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(ImageError) as err:
            load_image(sock_path)
    assert "it is a socket, not a regular file" in str(err.value)
