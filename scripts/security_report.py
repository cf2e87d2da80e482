"""Issue 9's acceptance table: bad inputs tried per category, crashes, partial outputs, soak memory growth and
thread parity, all measured by this run.

    python scripts/security_report.py                       # ~5 min on 2 cores; builds the tiny test model
    python scripts/security_report.py --fuzz-seconds 60 --soak-generations 1000 --random-examples 500

A "crash" is any outcome other than the documented one: an exception that is not the input's typed AnchorError, a
message on more than one line, a graph reaching onnxruntime that should have been refused first, a CLI run without
exactly one `error:` line and exit code 2 (or with a traceback), a hang. A "partial output" is a temporary folder or
file left behind, or a previous output changed, by an interrupted export, bake or eval. Random inputs come from
hypothesis strategies (a fixed seed: the same run gives the same table). Exit code 1 if anything crashed, was left
partial, grew past 5 % in the soak or differed between threads.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from anchorrt.exporter.testing import externalise_first_initializer, tree_paths  # noqa: E402
from anchorrt.runtime.errors import AnchorError  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402


class Row:
    def __init__(self, category: str, expected: str):
        self.category, self.expected = category, expected
        self.tried = self.crashes = self.partial = 0
        self.examples: list[str] = []

    def crash(self, what: str) -> None:
        self.crashes += 1
        if len(self.examples) < 3:
            self.examples.append(what[:300])


def attempt(row: Row, fn: Callable[[], object], error: type[AnchorError] | tuple = AnchorError, label: str = "") -> None:
    """One input: `fn()` must return or raise `error` with a one-line message."""
    row.tried += 1
    try:
        fn()
    except error as exc:
        if not str(exc) or "\n" in str(exc):
            row.crash(f"{label}: message not one line: {str(exc)!r}")
    except Exception as exc:  # noqa: BLE001 - what the report counts
        row.crash(f"{label}: {type(exc).__name__}: {exc} @ {traceback.format_exc(limit=-1).strip().splitlines()[-3]}")


def hypothesis_inputs(strategy, n: int) -> list:
    """`n` examples drawn from a hypothesis strategy (fixed seed)."""
    out = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x):
        out.append(x)

    collect()
    return out


# ------------------------------------------------------------------------------------------------ setup
def build(work: Path) -> tuple[Path, Path, Path]:
    """The tiny test model, its plain artifact, and a copy with CLVA, SEVI and the IAVA probe baked (in a child
    process: export needs torch, which this one does not import)."""
    code = ("import sys, shutil; from pathlib import Path; from anchorrt.exporter.testing import TinyLlavaSpec, build_tiny_llava;"
            "from anchorrt.exporter.export import export_model; from anchorrt.graph_passes.bake import BakeOptions, bake;"
            "w = Path(sys.argv[1]); m = build_tiny_llava(w / 'tiny-llava', TinyLlavaSpec());"
            "export_model(m, w / 'plain'); shutil.copytree(w / 'plain', w / 'tiny');"
            "bake(w / 'tiny', 'clva,sevi,probe', BakeOptions(sevi_start_layer=2))")
    subprocess.run([sys.executable, "-c", code, str(work)], check=True, cwd=ROOT, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return work / "tiny-llava", work / "plain", work / "tiny"


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


class NoOrt:
    """onnxruntime.InferenceSession while a refused artifact is loaded: reaching it is a crash."""

    reached = 0

    def __init__(self, *a, **k):
        NoOrt.reached += 1
        raise RuntimeError("onnxruntime reached")


# ------------------------------------------------------------------------------------------------ artifacts
FIELD_EDITS = [
    ("dims", "num_layers", 10**9), ("dims", "num_layers", 7), ("dims", "head_dim", 16), ("dims", "num_kv_heads", 4),
    ("dims", "hidden_size", True), ("dims", "vocab_size", -1), ("dims", "num_heads", 3), ("dims", "max_position_embeddings", 0),
    ("tokens", "image_token_id", 10**6), ("tokens", "eos_token_ids", [460]), ("tokens", "tokens_per_image", 4096),
    ("tokens", "pad_token_id", "3"), ("tokens", "image_token", ""), ("prompt", "template", "no placeholder"),
    ("prompt", "image_placeholder", ""), ("preprocessing", "crop_size", [100000, 100000]),
    ("preprocessing", "shortest_edge", 10**9), ("preprocessing", "image_std", [0, 0, 0]),
    ("preprocessing", "rescale_factor", float("nan")), (None, "context_length", 10**7), (None, "mitigation", ["clva"]),
    (None, "format_version", 99), (None, "format", "onnx"), ("graphs", "decoder", {"file": "../../etc/passwd"}),
    ("tokenizer", "file", "/etc/passwd"), (None, "files", {}), (None, "precision", "fp16"),
]


def artifact_rows(art: Path, model: Path, work: Path, random_examples: int) -> list[Row]:
    import onnxruntime
    from anchorrt.runtime.manifest import write_manifest
    from anchorrt.runtime.pipeline import Pipeline

    fields = Row("artifact: forged manifest fields (listed + random)", "ArtifactError before any session")
    files = Row("artifact: external data, links, FIFOs, garbage graphs", "ArtifactError before onnxruntime")
    hashes = Row("artifact: modified files (sha256)", "ArtifactError before any session")
    base = json.loads((art / "manifest.json").read_text())
    real_session = onnxruntime.InferenceSession

    def copy_art(name: str) -> Path:
        dst = work / "forged" / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(art, dst)
        return dst

    def load_and_run(folder: Path, verify: bool, must_refuse: bool, row: Row, label: str) -> None:
        NoOrt.reached = 0
        onnxruntime.InferenceSession = NoOrt if must_refuse else real_session
        try:
            def run():
                pipe = Pipeline.from_dir(folder, verify=verify)
                if not must_refuse:  # accepted: it must then run, or fail with a typed error
                    pipe.generate(Image.new("RGB", (40, 30)), "Is there a dog?", max_new_tokens=2)
            before = row.crashes
            attempt(row, run, label=label)
            if must_refuse and NoOrt.reached and row.crashes == before:
                row.crash(f"{label}: onnxruntime was reached")
        finally:
            onnxruntime.InferenceSession = real_session

    # listed field edits
    for section, key, value in FIELD_EDITS:
        folder = copy_art("field")
        data = copy.deepcopy(base)
        (data if section is None else data[section])[key] = value
        (folder / "manifest.json").write_text(json.dumps(data))
        load_and_run(folder, False, True, fields, f"{section}.{key}={value!r}")
    # random mutations of the real manifest (hypothesis): refused, or accepted and then typed errors only
    leaves = [p for p in tree_paths(base) if p]
    junk = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                        lambda s: st.lists(s, max_size=3) | st.dictionaries(st.text(max_size=6), s, max_size=3),
                        max_leaves=6)
    for path, value in hypothesis_inputs(st.tuples(st.sampled_from(leaves), junk), random_examples):
        folder = copy_art("random")
        data = copy.deepcopy(base)
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = value
        (folder / "manifest.json").write_text(json.dumps(data))
        load_and_run(folder, False, False, fields, f"{path}={value!r}")
    for raw in (b"", b"{", b"[" * 5000, b"\xff\xfe\x00", b'{"format": NaN}', b"null"):
        folder = copy_art("bytes")
        (folder / "manifest.json").write_bytes(raw)
        load_and_run(folder, False, True, fields, f"manifest bytes {raw[:12]!r}")

    # external data, links and special files
    for graph in ("vision.onnx", "embed.onnx", "decoder.onnx"):
        for location in ("../secret.bin", "/etc/passwd", "sub/../../secret.bin", "..", "a\\..\\b", "link.bin",
                         "unrecorded.bin", "/dev/zero", "x\x00y"):
            for verify in (True, False):
                folder = copy_art("ext")
                externalise_first_initializer(folder / graph, location, work / "secret.bin")
                if location == "link.bin":
                    os.symlink(work / "secret.bin", folder / "link.bin")
                if location == "unrecorded.bin":
                    shutil.copy(work / "secret.bin", folder / "unrecorded.bin")
                data = json.loads((folder / "manifest.json").read_text())
                data = write_manifest(folder, data)  # the forger makes the hashes match
                if location == "unrecorded.bin":
                    del data["files"]["unrecorded.bin"]
                    (folder / "manifest.json").write_text(json.dumps(data))
                load_and_run(folder, verify, True, files, f"{graph} external data {location!r} verify={verify}")
    for name in ("vision.onnx", "embed.onnx", "decoder.onnx", "tokenizer.json"):
        folder = copy_art("link")  # a file replaced by a link to a copy outside the folder (same hash)
        outside = work / f"outside-{name}"
        shutil.copy(folder / name, outside)
        (folder / name).unlink()
        os.symlink(outside, folder / name)
        load_and_run(folder, True, True, files, f"{name} symlinked out")
        folder = copy_art("fifo")
        (folder / name).unlink()
        os.mkfifo(folder / name)
        load_and_run(folder, False, True, files, f"{name} is a FIFO")
        if name.endswith(".onnx"):
            for raw in (b"", b"\x0a\xff\xff\xff\xff\x0f", os.urandom(256), b"\x3a" * 1000):
                folder = copy_art("garbage")
                (folder / name).write_bytes(raw)
                load_and_run(folder, False, True, files, f"{name} garbage {raw[:8]!r}")
    # every file modified by one byte, with the recorded hashes left as they were
    for name in base["files"]:
        for where in (0, -1):
            folder = copy_art("hash")
            data = bytearray((folder / name).read_bytes())
            data[where] ^= 0x01
            (folder / name).write_bytes(bytes(data))
            load_and_run(folder, True, True, hashes, f"{name} byte {where} flipped")
    return [fields, files, hashes]


def checkpoint_row(model: Path, work: Path) -> Row:
    from anchorrt.exporter.archs.llava import load_processor
    from anchorrt.exporter.checkpoint import inspect_checkpoint
    from anchorrt.runtime.errors import CheckpointError

    row = Row("checkpoint: pickle weights, remote code, corrupt weights", "CheckpointError; no code runs")
    for suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        m = work / f"pickle{suffix.replace('.', '-')}"
        shutil.rmtree(m, ignore_errors=True)
        shutil.copytree(model, m)
        (m / "model.safetensors").rename(m / f"pytorch_model{suffix}")

        def refused(m=m):
            inspect_checkpoint(m)
            raise RuntimeError("pickle-only weights were accepted without allow_pickle")
        attempt(row, refused, CheckpointError, f"pickle {suffix}")
    evil = work / "evil"
    shutil.rmtree(evil, ignore_errors=True)
    shutil.copytree(model, evil)
    (evil / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('PWNED').write_text('ran')\n"
                                  "from transformers import LlavaProcessor as EvilProcessor\n")
    for name in ("processor_config.json", "tokenizer_config.json", "config.json"):
        cfg = json.loads((evil / name).read_text())
        cfg["auto_map"] = {"AutoProcessor": "evil.EvilProcessor", "AutoConfig": "evil.EvilProcessor"}
        (evil / name).write_text(json.dumps(cfg))

    def remote():
        inspect_checkpoint(evil)
        try:
            load_processor(evil)
        except CheckpointError:
            pass
        if (evil / "PWNED").exists():
            raise RuntimeError("the checkpoint's own code ran")
    attempt(row, remote, CheckpointError, "auto_map remote code")
    for cut in (0.0, 0.3, 0.999):
        m = work / "corrupt"
        shutil.rmtree(m, ignore_errors=True)
        shutil.copytree(model, m)
        data = (m / "model.safetensors").read_bytes()
        (m / "model.safetensors").write_bytes(data[: int(len(data) * cut)])
        attempt(row, lambda m=m: _expect_error(lambda: inspect_checkpoint(m), CheckpointError), CheckpointError,
                f"safetensors cut at {cut}")
    return row


# ------------------------------------------------------------------------------------------------ inputs
def image_corpus() -> Iterable[tuple[str, object, bool]]:
    """(label, source, must_succeed)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    encoded = {}
    for fmt, kw in (("PNG", {}), ("JPEG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {}), ("TIFF", {})):
        buf = io.BytesIO()
        rgb.save(buf, fmt, **kw)
        encoded[fmt] = buf.getvalue()
    for fmt, data in encoded.items():
        yield f"{fmt} valid", data, True
        for frac in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
            yield f"{fmt} truncated at {frac}", data[: max(1, int(len(data) * frac))], False
        for i in (len(data) // 3, len(data) // 2):
            bad = bytearray(data)
            bad[i:i + 8] = b"\xff" * 8
            yield f"{fmt} corrupt at {i}", bytes(bad), False
    for fmt in ("GIF", "WEBP", "PNG"):  # animated: the first frame
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=40)
        yield f"animated {fmt}", buf.getvalue(), True
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", exif=exif)
        yield f"EXIF orientation {orientation}", buf.getvalue(), True
    for side in (20_000, 65_535, 200_000):  # header-only bombs
        import struct
        import zlib
        ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        yield f"PNG bomb {side}x{side}", (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
                                          + struct.pack(">I", zlib.crc32(chunk))), False
    yield "zero-size PIL image", Image.new("RGB", (0, 0)), False
    yield "1x1 image", Image.new("RGB", (1, 1)), True
    yield "1x5000 strip", Image.new("L", (1, 5000)), False
    for mode in ("1", "L", "LA", "P", "I", "F", "I;16", "CMYK", "YCbCr", "HSV", "RGBA", "RGBX", "PA"):
        try:
            yield f"mode {mode}", Image.new(mode, (10, 12)), True
        except (ValueError, OSError):
            pass
    yield "empty bytes", b"", False
    yield "text", b"hello, world", False
    yield "missing path", "/nonexistent/x.png", False
    yield "directory", str(ROOT), False
    yield "/dev/zero", "/dev/zero", False
    yield "None", None, False
    yield "int", 42, False
    yield "numpy array", np.zeros((4, 4, 3), np.uint8), False


def input_rows(art: Path, fuzz_seconds: float, random_examples: int) -> list[Row]:
    from anchorrt.runtime.errors import FlagError, ImageError, PromptError
    from anchorrt.runtime.pipeline import Pipeline, Request

    pipe = Pipeline.from_dir(art)
    img = Image.new("RGB", (40, 30), (200, 10, 10))

    images = Row("image: corrupt, truncated, bombs, zero-size, animated, EXIF, modes", "ImageError or an answer")
    for label, src, must_succeed in image_corpus():
        def run(src=src, must_succeed=must_succeed):
            try:
                pipe.generate(src, "Is there a dog?", max_new_tokens=1)
            except ImageError:
                if must_succeed:
                    raise RuntimeError("a valid image was refused") from None
                raise
        attempt(images, run, ImageError, label)
    fuzz_mod = _load_script("fuzz_images")
    r = fuzz_mod.fuzz(fuzz_seconds)
    fuzzed = Row(f"image: fuzzed files ({fuzz_seconds:g} s, scripts/fuzz_images.py)", "ImageError or RGB")
    fuzzed.tried, fuzzed.crashes = r["tried"], r["crashes"]
    if r["first_crash"]:
        fuzzed.examples.append(r["first_crash"])

    prompts = Row("prompt: empty, image token, past context, types, special tokens (listed + random)",
                  "PromptError or an answer")
    listed = ["", "   ", "\n\t", "<image>", "look at <image> here", "<ima" + "ge>", "x" * 100_000, "word " * 600,
              "</s>", "<s> USER: hi ASSISTANT:", "\x00\x01", "🐕" * 100, "{prompt}", None, 5, b"bytes", ["list"]]
    for text in listed:
        attempt(prompts, lambda text=text: pipe.generate(img, text, max_new_tokens=1), PromptError, repr(text)[:40])
    attempt(prompts, lambda: pipe.generate(img, "hi", max_new_tokens=10**6), PromptError, "max_new_tokens past context")
    for text in hypothesis_inputs(st.text(max_size=40) | st.lists(st.sampled_from(
            ["<image>", "</s>", "<s>", " ", "dog", "\n", "é"]), max_size=12).map("".join), random_examples):
        attempt(prompts, lambda text=text: pipe.prompts.encode(text, reserve=8), PromptError, repr(text)[:40])

    flags = Row("flags: NaN, +-inf, negative, wrong types for every mitigation and sampling input", "FlagError")
    bad_values = [float("nan"), float("inf"), float("-inf"), -1.0, -1e-9, 1e39, "1", None, [1.0], {"a": 1}, True,
                  np.float64("nan"), 2**200]
    inputs = {"clva": ["alpha", "beta", "tau", "lambda"], "sevi": ["omega", "kappa"],
              "iava": ["alpha", "i", "lambda", "beta_cut"]}
    for method, keys in inputs.items():
        for key in keys:
            for v in bad_values:
                def one(method=method, key=key, v=v):
                    call = lambda: pipe.generate(img, "hi", max_new_tokens=1, mitigation={method: {key: v}})  # noqa: E731
                    if _iava_accepts(method, key, v):  # documented as valid (runtime/iava.py): it must run
                        call()
                    else:
                        _expect_error(call, FlagError)
                attempt(flags, one, FlagError, f"{method}.{key}={v!r}")
    for method in ("clva", "sevi", "iava", "visalign"):
        for v in ("yes", 1, [True], {"bogus": 1}, float("nan")):
            attempt(flags, lambda method=method, v=v: _expect_error(
                lambda: pipe.generate(img, "hi", max_new_tokens=1, mitigation={method: v}), FlagError),
                FlagError, f"{method}={v!r}")
    for key, values in {"temperature": [0, -1, float("nan"), float("inf"), "1"], "top_p": [0, 1.5, float("nan")],
                        "top_k": [-1, 1.5, "3"], "repetition_penalty": [0, -2, float("inf")],
                        "max_new_tokens": [0, -1, 1.5, True], "seed": [-1, 1.5, "x"], "bogus": [1]}.items():
        for v in values:
            attempt(flags, lambda key=key, v=v: _expect_error(
                lambda: pipe.generate(img, "hi", **{key: v}), FlagError), FlagError, f"{key}={v!r}")
    for spec in (["not", "a", "dict"], {"bogus": True}, {"clva": {"l_neg": 3}}, {"sevi": {"start_layer": 1}}):
        attempt(flags, lambda spec=spec: _expect_error(
            lambda: pipe.generate_batch([Request(img, "hi", spec)], max_new_tokens=1), FlagError), FlagError, repr(spec))
    return [images, fuzzed, prompts, flags]


def _iava_accepts(method: str, key: str, v) -> bool:
    """IAVA's documented ranges (runtime/iava.py): alpha in [0, 1e4], lambda any finite number, beta_cut in [0, 1] or None,
    i a count >= 0 (capped at the image tokens) or a fraction in (0, 1], or None."""
    if method != "iava":
        return False
    if v is None:
        return key in ("i", "beta_cut")
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(float(v)):
        return False
    f = float(v)
    return {"alpha": 0 <= f <= 1e4, "lambda": True, "beta_cut": 0 <= f <= 1,
            "i": (isinstance(v, (int, np.integer)) and v >= 0) or 0 < f <= 1}[key]


def _expect_error(fn, error):
    fn()
    raise RuntimeError(f"accepted; expected {error.__name__}")


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ CLI and writes
def cli_row(art: Path, model: Path, work: Path) -> Row:
    row = Row("CLI: bad artifact / image / prompt / flag values", "exit 2, one `error:` line, no traceback, no output")
    img = work / "ok.png"
    Image.new("RGB", (30, 30)).save(img)
    bad = work / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    cases = [
        ["generate", str(art), "--image", str(bad), "--prompt", "hi"],
        ["generate", str(art), "--image", str(img), "--prompt", "  "],
        ["generate", str(art), "--image", str(img), "--prompt", "a <image> b"],
        ["generate", str(art), "--image", str(img), "--prompt", "hi", "--temperature", "nan"],
        ["generate", str(art), "--image", str(img), "--prompt", "hi", "--clva-alpha", "-1"],
        ["generate", str(art), "--image", str(img), "--prompt", "hi", "--sevi-kappa", "inf"],
        ["generate", str(work / "nope"), "--image", str(img), "--prompt", "hi"],
        ["export", str(work / "nope"), "-o", str(work / "cli-out")],
    ]
    for args in cases:
        row.tried += 1
        try:
            proc = subprocess.run([sys.executable, "-m", "anchorrt", *args], capture_output=True, text=True, env=_env(),
                                  timeout=300, cwd=ROOT)
        except subprocess.TimeoutExpired:
            row.crash(f"{args[:2]}: hung")
            continue
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        if proc.returncode != 2 or len(errors) != 1 or "Traceback" in proc.stderr:
            row.crash(f"{' '.join(args[:2])}: exit {proc.returncode}, {proc.stderr[-300:]!r}")
        if (work / "cli-out").exists():
            row.partial += 1
    return row


PAUSED = r"""
import sys, time, importlib
from pathlib import Path
marker, target = Path(sys.argv[1]), sys.argv[2]
mod_name, attr = target.rsplit(":", 1)
mod = importlib.import_module(mod_name)
orig = getattr(mod, attr)
def patched(*a, **k):
    r = orig(*a, **k) if attr == "fdopen" else None
    marker.write_text("paused"); time.sleep(300)
    return r if attr == "fdopen" else orig(*a, **k)
setattr(mod, attr, patched)
sys.argv = ["anchorrt", *sys.argv[3:]]
from anchorrt.cli import main
main()
"""


def interrupted_row(art: Path, plain_art: Path, model: Path, work: Path) -> Row:
    from anchorrt.runtime.manifest import file_sha256

    row = Row("interrupted writes: export, bake, eval results (SIGTERM, SIGINT)", "previous state kept, nothing partial")

    def snapshot(folder: Path) -> dict:
        return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}

    def run(target: str, args: list[str], sig: int, parent: Path, keep: Path) -> None:
        """`keep` (a folder or a file) must be unchanged afterwards, and `parent` must hold no new hidden entry
        (temporary folders and files are hidden) and, for a folder, no new entry at all."""
        row.tried += 1

        def names() -> list[str]:
            return sorted(p.name for p in parent.iterdir() if keep.is_dir() or p.name.startswith("."))
        before_names = names()
        before = snapshot(keep) if keep.is_dir() else keep.read_text()
        marker = work / "paused"
        marker.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", PAUSED, str(marker), target, *args], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if not marker.exists():
            proc.kill()
            row.crash(f"{target}: never reached ({proc.communicate()[1][-300:]})")
            return
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            row.crash(f"{target}: did not stop on signal {sig}")
            return
        if proc.returncode != (143 if sig == signal.SIGTERM else 130) or "Traceback" in err:
            row.crash(f"{target} {sig}: exit {proc.returncode} {err[-300:]!r}")
        after = snapshot(keep) if keep.is_dir() else keep.read_text()
        if names() != before_names or after != before:
            row.partial += 1

    for sig in (signal.SIGTERM, signal.SIGINT):
        parent = work / f"writes-{sig}"
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir()
        target_art = parent / "art"
        shutil.copytree(art, target_art)
        run("anchorrt.exporter.export:write_manifest", ["export", str(model), "-o", str(target_art), "--force"], sig, parent,
            target_art)
        plain = parent / "plain"
        shutil.copytree(plain_art, plain)
        run("anchorrt.graph_passes.bake:write_manifest", ["bake", str(plain), "--mitigation", "clva", "--no-verify"], sig,
            parent, plain)
        root = parent / "pope"
        (root / "images").mkdir(parents=True)
        Image.new("RGB", (30, 30)).save(root / "images" / "a.png")
        (root / "q.json").write_text(json.dumps({"question_id": 1, "image": "a.png", "text": "Is there a cat?",
                                                 "label": "no"}) + "\n")
        res = parent / "res"
        res.mkdir()
        (res / "results.json").write_text('{"previous": true}\n')
        run("os:fdopen", ["eval", "pope", str(art), "-q", str(root / "q.json"), "--image-root", str(root / "images"),
                          "--out", str(res), "--max-new-tokens", "2", "--no-progress"], sig, res, res / "results.json")
    return row


# ------------------------------------------------------------------------------------------------ soak, threads
def soak_figure(art: Path, generations: int) -> tuple[str, bool]:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--artifact", str(art),
                           "--generations", str(generations)], capture_output=True, text=True, env=_env(), cwd=ROOT)
    line = next((s for s in proc.stdout.splitlines() if s.startswith("soak:")), proc.stderr[-300:])
    return line, proc.returncode == 0


def thread_parity(art: Path, threads: int = 8, jobs: int = 32) -> tuple[int, int]:
    from concurrent.futures import ThreadPoolExecutor

    from anchorrt.runtime.pipeline import Pipeline, Request

    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 40, 3), dtype=np.uint8)) for i in range(4)]
    prompts = ["What is in the image?", "Is there a dog?", "Describe it.", "Count the objects."]
    flags = [None, {"clva": {"alpha": 20}}, {"sevi": True}, {"iava": {"alpha": 1.0}}, {"clva": True, "sevi": True}]

    def job(k: int):
        kw = {"max_new_tokens": 6}
        if k % 2:
            kw.update(do_sample=True, temperature=0.9, seed=k)
        return [Request(imgs[k % 4], prompts[k % 4], flags[k % 5])], kw

    def run(pipe, k):
        reqs, kw = job(k)
        return [g.token_ids for g in pipe.generate_batch(reqs, **kw)]

    serial = [run(Pipeline.from_dir(art), k) for k in range(jobs)]
    shared = Pipeline.from_dir(art)
    with ThreadPoolExecutor(threads) as pool:
        parallel = list(pool.map(lambda k: run(shared, k), range(jobs)))
    return sum(a != b for a, b in zip(serial, parallel)), jobs


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz-seconds", type=float, default=30.0)
    ap.add_argument("--random-examples", type=int, default=200, help="hypothesis examples per random category")
    ap.add_argument("--soak-generations", type=int, default=1000)
    ap.add_argument("--only", default="", help="comma list of: artifacts, checkpoints, inputs, CLI, "
                    "interrupted writes, soak, threads (default: all)")
    args = ap.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="anchorrt-security-") as tmp:
        work = Path(tmp)
        print("building the tiny test model and artifact ...", file=sys.stderr, flush=True)
        model, plain_art, art = build(work)
        rows: list[Row] = []
        for name, fn in (("artifacts", lambda: artifact_rows(art, model, work, args.random_examples)),
                         ("checkpoints", lambda: [checkpoint_row(model, work)]),
                         ("inputs", lambda: input_rows(art, args.fuzz_seconds, args.random_examples)),
                         ("CLI", lambda: [cli_row(art, model, work)]),
                         ("interrupted writes", lambda: [interrupted_row(art, plain_art, model, work)])):
            if only and name not in only:
                continue
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows += fn()
        soak_line, soak_ok, mismatched, jobs = "soak: not run", True, 0, 0
        if not only or "soak" in only:
            print("soak ...", file=sys.stderr, flush=True)
            soak_line, soak_ok = soak_figure(art, args.soak_generations)
        if not only or "threads" in only:
            print("threads ...", file=sys.stderr, flush=True)
            mismatched, jobs = thread_parity(art)
    print("| category | bad inputs tried | crashes | partial outputs | expected outcome |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.category} | {r.tried} | {r.crashes} | {r.partial} | {r.expected} |")
    total = (sum(r.tried for r in rows), sum(r.crashes for r in rows), sum(r.partial for r in rows))
    print(f"| **total** | **{total[0]}** | **{total[1]}** | **{total[2]}** | |")
    print()
    print(f"- {soak_line}")
    if jobs:
        print(f"- threads: one Pipeline from 8 threads, {jobs} requests (mixed prompts, images, seeds, CLVA/SEVI/IAVA): "
              f"{jobs - mismatched}/{jobs} identical to serial runs")
    else:
        print("- threads: not run")
    for r in rows:
        for e in r.examples:
            print(f"- crash in '{r.category}': {e}")
    print(f"- {time.perf_counter() - t0:.0f} s")
    return 0 if not total[1] and not total[2] and soak_ok and not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
