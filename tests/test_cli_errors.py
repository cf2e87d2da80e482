"""Every bad input: a one-line `error:` message naming the problem and the fix, a non-zero exit, no traceback,
and nothing written."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli


def assert_clean_error(proc: subprocess.CompletedProcess, fragment: str, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1, proc.stderr
    assert fragment in err_lines[0], err_lines[0]
    assert "Traceback" not in proc.stderr


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---- export -----------------------------------------------------------------------------------------------------
def test_export_missing_folder(tmp_path):
    proc = run_cli("export", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert_clean_error(proc, "does not exist")
    assert listing(tmp_path) == set()


def test_export_wrong_architecture(tmp_path):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (model / "model.safetensors").write_bytes(b"")
    proc = run_cli("export", str(model), "-o", str(tmp_path / "out"))
    assert_clean_error(proc, "architecture 'BertModel' is not supported; supported: ")
    assert "LlavaForConditionalGeneration" in proc.stderr and "InstructBlipForConditionalGeneration" in proc.stderr
    assert listing(tmp_path) == {"bert"}


def test_export_corrupt_config(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    proc = run_cli("export", str(model), "-o", str(tmp_path / "out"))
    assert_clean_error(proc, "not valid JSON")


def test_export_refuses_pickle_weights(tiny_model, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    proc = run_cli("export", str(model), "-o", str(tmp_path / "out"))
    assert_clean_error(proc, "--allow-pickle")
    assert not (tmp_path / "out").exists()


def test_export_corrupt_weights(tiny_model, tmp_path):
    model = tmp_path / "corrupt"
    shutil.copytree(tiny_model, model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 3])
    proc = run_cli("export", str(model), "-o", str(tmp_path / "out"))
    assert_clean_error(proc, "truncated or corrupt")
    assert listing(tmp_path) == {"corrupt"}  # no partial or temporary folder left behind


def test_export_existing_output_is_kept(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = run_cli("export", str(tiny_model), "-o", str(out))
    assert_clean_error(proc, "already exists; pass --force")
    assert (out / "keep.txt").read_text() == "precious"


def test_export_interrupted_leaves_nothing(tiny_model, tmp_path):
    """SIGINT in the middle of an export: no output folder, no temporary folder."""
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # A child of a background job starts with SIGINT ignored (POSIX) and Python then raises no KeyboardInterrupt:
    # the child installs Python's own handler first, so the test's SIGINT is a Ctrl-C wherever CI runs it.
    cli = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
          "sys.argv = ['anchorrt', *sys.argv[1:]]; from anchorrt.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", cli, "export", str(tiny_model), "-o", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the export has started writing
        if any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("export never started")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert listing(tmp_path) == set()


# ---- generate / artifacts ---------------------------------------------------------------------------------------
@pytest.fixture
def image_file(tmp_path, images):
    path = tmp_path / "img.png"
    images[0].save(path)
    return path


def test_generate_corrupt_image(tiny_artifact, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    assert_clean_error(run_cli("generate", str(tiny_artifact), "--image", str(bad), "--prompt", "hi", block_torch=True),
                       "bad.jpg")


def test_generate_not_an_image(tiny_artifact, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    proc = run_cli("generate", str(tiny_artifact), "--image", str(txt), "--prompt", "hi", block_torch=True)
    assert_clean_error(proc, "notes.txt")


def test_generate_missing_image(tiny_artifact, tmp_path):
    proc = run_cli("generate", str(tiny_artifact), "--image", str(tmp_path / "none.png"), "--prompt", "hi")
    assert_clean_error(proc, "none.png")


def test_generate_prompt_past_context(tiny_artifact, image_file):
    long_prompt = "describe the image " * 400  # the tiny model's context is 512 tokens
    proc = run_cli("generate", str(tiny_artifact), "--image", str(image_file), "--prompt", long_prompt)
    assert_clean_error(proc, "shorten the prompt or lower max_new_tokens")
    proc = run_cli("generate", str(tiny_artifact), "--image", str(image_file), "--prompt", "hi",
                   "--max-new-tokens", "100000")
    assert_clean_error(proc, "context holds 512")


@pytest.mark.parametrize("prompt,fragment", [("   ", "prompt is empty"), ("look at <image> here", "image token")])
def test_generate_bad_prompt(tiny_artifact, image_file, prompt, fragment):
    assert_clean_error(run_cli("generate", str(tiny_artifact), "--image", str(image_file), "--prompt", prompt), fragment)


@pytest.mark.parametrize("flag,value,fragment", [("--temperature", "nan", "temperature"), ("--top-p", "2", "top_p"),
                                                 ("--max-new-tokens", "0", "max_new_tokens"),
                                                 ("--top-k", "-3", "top_k")])
def test_generate_bad_flags(tiny_artifact, image_file, flag, value, fragment):
    proc = run_cli("generate", str(tiny_artifact), "--image", str(image_file), "--prompt", "hi", flag, value)
    assert_clean_error(proc, fragment)


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_artifact_missing_file(tiny_artifact, image_file, tmp_path):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    (art / "embed.onnx").unlink()
    proc = run_cli("generate", str(art), "--image", str(image_file), "--prompt", "hi")
    assert_clean_error(proc, "'embed.onnx' is missing")


def test_artifact_modified_file(tiny_artifact, image_file, tmp_path):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    with open(art / "tokenizer.json", "a") as f:
        f.write(" ")
    proc = run_cli("generate", str(art), "--image", str(image_file), "--prompt", "hi")
    assert_clean_error(proc, "sha256 mismatch")
    before = {p.name: p.stat().st_mtime_ns for p in art.iterdir()}
    # --no-verify is the explicit escape hatch
    proc = run_cli("generate", str(art), "--image", str(image_file), "--prompt", "hi", "--no-verify",
                   "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    assert before == {p.name: p.stat().st_mtime_ns for p in art.iterdir()}


def test_artifact_not_a_folder(tmp_path, image_file):
    proc = run_cli("generate", str(tmp_path / "missing"), "--image", str(image_file), "--prompt", "hi")
    assert_clean_error(proc, "does not exist; run `anchorrt export")


def test_artifact_bad_manifest(tiny_artifact, image_file, tmp_path):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    m = json.loads((art / "manifest.json").read_text())
    m["graphs"]["decoder"]["file"] = "../../etc/passwd"
    (art / "manifest.json").write_text(json.dumps(m))
    proc = run_cli("generate", str(art), "--image", str(image_file), "--prompt", "hi")
    assert_clean_error(proc, "plain file name")


def test_verify_cli_passes_and_fails(tiny_model, tiny_artifact, gqa_model):
    proc = run_cli("verify", str(tiny_artifact), "--model", str(tiny_model), "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout
    proc = run_cli("verify", str(tiny_artifact), "--model", str(gqa_model), "--steps", "1")
    assert proc.returncode != 0
    assert "FAIL" in proc.stdout or "the checkpoint this artifact came from" in proc.stderr
    assert "Traceback" not in proc.stderr
