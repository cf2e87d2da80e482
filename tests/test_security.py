"""Untrusted artifacts and inputs (issue 9, SECURITY.md): every forged or hostile input is refused with a typed,
one-line error before it can read outside the artifact folder, run code or make the runtime allocate without
bound; an interrupted export, bake or eval (SIGTERM as well as SIGINT) leaves the previous state and no partial
folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from anchorrt.exporter.testing import externalise_first_initializer
from anchorrt.runtime.errors import ArtifactError, CheckpointError, ImageError
from anchorrt.runtime.manifest import Manifest, file_sha256, write_manifest

from tests.conftest import ROOT, run_cli


def assert_one_line(exc: BaseException, fragment: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and fragment in msg, msg


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rehash(art: Path) -> None:
    """What a forger does: rewrite the manifest's sha256 entries so that the hash check passes."""
    data = json.loads((art / "manifest.json").read_text())
    write_manifest(art, data)


class NoOrt:
    """Stands in for onnxruntime.InferenceSession: a test fails if anything reaches onnxruntime."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        NoOrt.calls.append(args)
        raise AssertionError("onnxruntime was asked to open a graph that should have been refused first")


@pytest.fixture
def no_ort(monkeypatch):
    import onnxruntime

    NoOrt.calls = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", NoOrt)
    return NoOrt


# ---- 1. artifacts: external data -----------------------------------------------------------------------------
def test_external_data_inside_the_folder_loads_and_runs(tiny_artifact, tmp_path):
    """The positive case: a recorded external-data file beside the graph passes every check and onnxruntime runs
    the graph (so the refusals below are not a check that refuses everything)."""
    from anchorrt.runtime.backend import OrtBackend

    art = copy_artifact(tiny_artifact, tmp_path / "art")
    externalise_first_initializer(art / "vision.onnx", "vision.onnx.data", art / "vision.onnx.data")
    rehash(art)
    Manifest.load(art)
    out = OrtBackend(art / "vision.onnx").run({"pixel_values": np.zeros((1, 3, 32, 32), np.float32)})
    assert out["image_features"].shape == (1, 16, 64)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin", "..", "a\\..\\x.bin",
                                      "unrecorded.bin", "link.bin"])
@pytest.mark.parametrize("verify", [True, False])
def test_external_data_escaping_the_folder_is_refused(tiny_artifact, tmp_path, no_ort, location, verify):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    secret = tmp_path / "secret.bin"
    externalise_first_initializer(art / "vision.onnx", location, secret)
    if location == "link.bin":
        os.symlink(secret, art / "link.bin")
    if location == "unrecorded.bin":
        shutil.copy(secret, art / "unrecorded.bin")
        rehash(art)
        data = json.loads((art / "manifest.json").read_text())
        del data["files"]["unrecorded.bin"]
        (art / "manifest.json").write_text(json.dumps(data))
    else:
        rehash(art)  # a forger can always make the hashes match
    with pytest.raises(ArtifactError) as err:
        Manifest.load(art, verify=verify)
    fragment = {"link.bin": "outside the artifact folder", "unrecorded.bin": "does not record"}.get(
        location, "outside the artifact folder")
    assert_one_line(err.value, fragment)
    assert no_ort.calls == []


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "link.bin"])
def test_backend_refuses_escaping_external_data_before_onnxruntime(tiny_artifact, tmp_path, no_ort, location):
    """A graph opened without a manifest (make_backend on a path) gets the same pre-open check."""
    from anchorrt.runtime.backend import make_backend

    art = copy_artifact(tiny_artifact, tmp_path / "art")
    secret = tmp_path / "secret.bin"
    externalise_first_initializer(art / "vision.onnx", location, secret)
    if location == "link.bin":
        os.symlink(secret, art / "link.bin")
    with pytest.raises(ArtifactError) as err:
        _ = make_backend(art / "vision.onnx").session
    assert_one_line(err.value, "outside the artifact folder")
    assert no_ort.calls == []


def test_escaping_artifact_cli_one_line(tiny_artifact, tmp_path, images):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    externalise_first_initializer(art / "decoder.onnx", "../../../../etc/passwd", None)
    rehash(art)
    img = tmp_path / "x.png"
    images[0].save(img)
    proc = run_cli("generate", str(art), "--image", str(img), "--prompt", "hi", block_torch=True)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "outside the artifact folder" in errors[0] and "Traceback" not in proc.stderr


# ---- 1. artifacts: files and manifest fields -----------------------------------------------------------------
def test_graph_file_symlinked_out_of_the_folder(tiny_artifact, tmp_path, no_ort):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    outside = tmp_path / "elsewhere.onnx"
    (art / "embed.onnx").rename(outside)
    os.symlink(outside, art / "embed.onnx")  # same bytes, same hash: only the link gives it away
    with pytest.raises(ArtifactError) as err:
        Manifest.load(art, verify=True)
    assert_one_line(err.value, "outside the artifact folder")
    # a link that stays inside the folder is fine
    (art / "embed.onnx").unlink()
    shutil.copy(outside, art / "embed.real.onnx")
    os.symlink("embed.real.onnx", art / "embed.onnx")
    rehash(art)
    Manifest.load(art)


def test_fifo_is_refused_without_blocking(tiny_artifact, tmp_path):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    (art / "tokenizer.json").unlink()
    os.mkfifo(art / "tokenizer.json")  # opening it to read would block for ever
    t = time.perf_counter()
    with pytest.raises(ArtifactError) as err:
        Manifest.load(art, verify=False)
    assert_one_line(err.value, "not a regular file")
    assert time.perf_counter() - t < 5


def test_garbage_graph_is_refused_before_onnxruntime(tiny_artifact, tmp_path, no_ort):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    (art / "vision.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + os.urandom(64))  # a length past the end
    with pytest.raises(ArtifactError) as err:
        Manifest.load(art, verify=False)
    assert_one_line(err.value, "not a valid ONNX file")


def test_modified_file_refused_before_any_session(tiny_artifact, tmp_path, no_ort):
    from anchorrt.runtime.pipeline import Pipeline

    art = copy_artifact(tiny_artifact, tmp_path / "art")
    data = bytearray((art / "decoder.onnx").read_bytes())
    data[-10] ^= 0xFF  # inside a weight: still a valid protobuf
    (art / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as err:
        Pipeline.from_dir(art)
    assert_one_line(err.value, "sha256 mismatch")
    assert no_ort.calls == []


def _edit(art: Path, fn) -> None:
    data = json.loads((art / "manifest.json").read_text())
    fn(data)
    (art / "manifest.json").write_text(json.dumps(data))


MANIFEST_EDITS = {
    "huge num_layers": (lambda d: d["dims"].update(num_layers=10**9), "dims.num_layers"),
    "num_layers disagrees with the graph": (lambda d: d["dims"].update(num_layers=7), "past key/value inputs"),
    "head_dim disagrees with the graph": (lambda d: d["dims"].update(head_dim=16), "KV heads of size 16"),
    "kv heads disagree with the graph": (lambda d: d["dims"].update(num_kv_heads=4), "4 KV heads"),
    "bool as an int": (lambda d: d["dims"].update(hidden_size=True), "dims.hidden_size"),
    "image token past the vocabulary": (lambda d: d["tokens"].update(image_token_id=10**6), "tokens.image_token_id"),
    "eos past the vocabulary": (lambda d: d["tokens"].update(eos_token_ids=[460]), "tokens.eos_token_ids"),
    "tokens_per_image past the context": (lambda d: d["tokens"].update(tokens_per_image=4096), "tokens_per_image"),
    "context past the positions": (lambda d: d.update(context_length=10**7), "context_length"),
    "external_data with a path": (lambda d: d["graphs"]["decoder"].update(external_data="../w.bin"), "plain file name"),
    "external_data unrecorded": (lambda d: d["graphs"]["decoder"].update(external_data="w.bin"), "no hash"),
    "file name with a separator": (lambda d: d["files"].update({"a/b": "0" * 64}), "plain file name"),
    "mitigation not a dict": (lambda d: d.update(mitigation=["clva"]), "mitigation"),
    "parameter default NaN-like": (lambda d: d.update(mitigation={"clva": {"parameters": {"alpha": {"default": 1e39}}}}),
                                   "mitigation.clva.parameters.alpha.default"),
    "layers not a dict": (lambda d: d.update(mitigation={"sevi": {"layers": [1, 2]}}), "mitigation.sevi.layers"),
    "empty placeholder": (lambda d: d["prompt"].update(image_placeholder=""), "prompt.image_placeholder"),
    "huge crop": (lambda d: d["preprocessing"].update(crop_size=[100000, 100000]), "crop_size"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_forged_manifest_fields(tiny_artifact, tmp_path, no_ort, case):
    from anchorrt.runtime.pipeline import Pipeline

    edit, fragment = MANIFEST_EDITS[case]
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    _edit(art, edit)
    with pytest.raises(ArtifactError) as err:
        Pipeline.from_dir(art, verify=False)
    assert_one_line(err.value, fragment)
    assert no_ort.calls == []


# ---- 1. checkpoints: pickle and remote code ---------------------------------------------------------------------
def test_pickle_weights_need_explicit_permission(tiny_model, tmp_path):
    from anchorrt.exporter.checkpoint import inspect_checkpoint

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        inspect_checkpoint(model)
    assert_one_line(err.value, "--allow-pickle")
    assert inspect_checkpoint(model, allow_pickle=True).uses_pickle
    # both kinds present: the safetensors are used, the pickle never
    shutil.copy(tiny_model / "model.safetensors", model / "model.safetensors")
    ckpt = inspect_checkpoint(model)
    assert not ckpt.uses_pickle and [p.name for p in ckpt.weight_files] == ["model.safetensors"]


def test_remote_code_in_a_checkpoint_is_never_run(tiny_model, tmp_path):
    """A checkpoint whose configs point at its own Python code (`auto_map`): loading it for export runs none of it
    (transformers' trust_remote_code stays off; AnchorRT never turns it on)."""
    from anchorrt.exporter.archs.llava import load_processor
    from anchorrt.exporter.checkpoint import inspect_checkpoint

    model = tmp_path / "evil"
    shutil.copytree(tiny_model, model)
    (model / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('PWNED').write_text('ran')\n"
                                   "from transformers import LlavaProcessor as EvilProcessor, LlavaConfig as EvilConfig\n")
    for name, auto in (("config.json", {"AutoConfig": "evil.EvilConfig"}),
                       ("processor_config.json", {"AutoProcessor": "evil.EvilProcessor"}),
                       ("tokenizer_config.json", {"AutoProcessor": "evil.EvilProcessor"})):
        cfg = json.loads((model / name).read_text())
        cfg["auto_map"] = auto
        (model / name).write_text(json.dumps(cfg))
    inspect_checkpoint(model)
    try:
        load_processor(model)
    except CheckpointError:
        pass  # refusing is fine too; running the code is not
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model)
    except ValueError:
        pass
    assert not (model / "PWNED").exists()
    sources = [p.read_text() for d in ("anchorrt", "exporter", "runtime", "graph_passes") for p in (ROOT / d).rglob("*.py")]
    assert not any("trust_remote_code=True" in s for s in sources)


# ---- 2. images: the pixel limit and its overrides --------------------------------------------------------------
def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_pixel_limit_default_env_and_pipeline_override(tiny_artifact, monkeypatch):
    from anchorrt.runtime.pipeline import Pipeline
    from anchorrt.runtime.preprocess import MAX_PIXELS, MAX_PIXELS_ENV, default_max_pixels, load_image

    assert default_max_pixels() == MAX_PIXELS == 64_000_000
    img = _png(120, 100)
    monkeypatch.setenv(MAX_PIXELS_ENV, "11999")
    with pytest.raises(ImageError) as err:
        load_image(img)
    assert_one_line(err.value, "limit 11999")
    monkeypatch.setenv(MAX_PIXELS_ENV, "12000")
    assert load_image(img).size == (120, 100)
    for bad in ("-5", "lots", "0"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(ImageError) as err:
            load_image(img)
        assert_one_line(err.value, MAX_PIXELS_ENV)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    pipe = Pipeline.from_dir(tiny_artifact, max_image_pixels=11999)
    with pytest.raises(ImageError) as err:
        pipe.generate(img, "hi", max_new_tokens=1)
    assert_one_line(err.value, "too large")
    assert Pipeline.from_dir(tiny_artifact, max_image_pixels=12000).generate(img, "hi", max_new_tokens=1).token_ids


def test_pixel_limit_cli_env(tiny_artifact, tmp_path):
    img = tmp_path / "big.png"
    img.write_bytes(_png(120, 100))
    proc = run_cli("generate", str(tiny_artifact), "--image", str(img), "--prompt", "hi", block_torch=True,
                   env={"ANCHORRT_MAX_IMAGE_PIXELS": "10000"})
    assert proc.returncode == 2 and "too large (120x100 = 12000 pixels, limit 10000)" in proc.stderr, proc.stderr


# ---- 4. atomic outputs under SIGTERM / SIGINT ---------------------------------------------------------------------
PAUSED_CLI = r"""
import os, sys, time, importlib, signal
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job's child starts with SIGINT ignored
from pathlib import Path
marker, target, where = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
module_name, attr = target.rsplit(":", 1)
module = importlib.import_module(module_name)
original = getattr(module, attr)

def pause():
    marker.write_text("paused")
    time.sleep(120)

def patched(*args, **kwargs):
    if where == "before":
        pause()
    result = original(*args, **kwargs)
    if where == "after":
        pause()
    return result

setattr(module, attr, patched)
sys.argv = ["anchorrt", *sys.argv[4:]]
from anchorrt.cli import main
main()
"""


def run_paused(tmp_path: Path, target: str, where: str, args: list[str], sig: int) -> subprocess.CompletedProcess:
    """Run the CLI with `target` (module:function) pausing before/after its call; send `sig` while it pauses."""
    marker = tmp_path / "paused.marker"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, str(marker), target, where, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the command never reached {target}: {err[-2000:]}")
        time.sleep(0.1)
    marker.unlink()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_export_sigterm_keeps_previous_artifact(tiny_model, tiny_artifact, tmp_path):
    """SIGTERM mid-export, once the first graph is in the temporary folder (SIGINT mid-export:
    tests/test_cli_errors.py; scripts/security_report.py interrupts both after the last graph)."""
    work = tmp_path / "work"
    work.mkdir()
    out = copy_artifact(tiny_artifact, work / "art")  # the previous state, replaced only by a finished export
    before = snapshot(out)
    proc = run_paused(tmp_path, "anchorrt.exporter.export:graph_io", "after",
                      ["export", str(tiny_model), "-o", str(out), "--force"], signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr and "interrupted" in proc.stderr
    assert sorted(p.name for p in work.iterdir()) == ["art"]  # no .art.partial-* folder
    assert snapshot(out) == before


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_bake_interrupted_keeps_previous_artifact(tiny_artifact, tmp_path, sig, code):
    work = tmp_path / "work"
    work.mkdir()
    art = copy_artifact(tiny_artifact, work / "art")
    before = snapshot(art)
    # paused after the passes wrote the new decoder into the temporary folder, before the manifest and the swap
    proc = run_paused(tmp_path, "anchorrt.graph_passes.bake:write_manifest", "before",
                      ["bake", str(art), "--mitigation", "clva"], sig)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in work.iterdir()) == ["art"]  # no .art.bake-* folder
    assert snapshot(art) == before
    Manifest.load(art)  # still a valid, unbaked artifact
    assert "clva" not in Manifest.load(art).mitigation


def test_eval_results_interrupted_keep_previous(tiny_artifact, tmp_path, images):
    """SIGTERM once results.json's temporary file exists, before the rename: the previous results stay, the
    temporary file goes."""
    root = tmp_path / "pope"
    (root / "images").mkdir(parents=True)
    images[0].save(root / "images" / "a.png")
    questions = root / "q.json"
    questions.write_text("\n".join(json.dumps({"question_id": i, "image": "a.png", "text": "Is there a cat?",
                                               "label": "no"}) for i in range(2)) + "\n")
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.json").write_text('{"previous": true}\n')
    proc = run_paused(tmp_path, "os:fdopen", "after",  # write_atomic: mkstemp, fdopen, write, rename
                      ["eval", "pope", str(tiny_artifact), "-q", str(questions), "--image-root", str(root / "images"),
                       "--out", str(out), "--max-new-tokens", "2", "--no-progress"], signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr
    assert (out / "results.json").read_text() == '{"previous": true}\n'
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_matches_transformers_load_image(tmp_path, orientation):
    """Decision (SECURITY.md, README): images are made upright from their EXIF orientation, as transformers'
    `image_utils.load_image` does before its processor runs (the CLIP/LLaVA image processors themselves ignore
    EXIF). Reference: transformers' load_image + CLIPImageProcessor on the same file; pixel values within 1e-5
    (the preprocessing parity tolerance of tests/test_preprocess.py)."""
    from anchorrt.runtime.preprocess import ImagePreprocessor, load_image
    from PIL import Image
    from transformers.image_utils import load_image as hf_load_image

    from tests.test_preprocess import TOL, hf_pixels, make_params

    rng = np.random.default_rng(orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rng.integers(0, 256, (30, 52, 3), dtype=np.uint8)).save(path, exif=exif, quality=95)
    params = make_params(32, 32)
    ours = ImagePreprocessor(params)([load_image(path)])
    ref = hf_pixels(params, hf_load_image(str(path)))
    assert float(np.abs(ours - ref).max()) <= TOL
    with Image.open(path) as raw:  # and the orientation really changed the input (so the check is not vacuous)
        assert float(np.abs(ours - hf_pixels(params, raw.convert("RGB"))).max()) > 0.1
