"""VisAlign in the graphs: identity = base (PyTorch and ONNX, exactly), a random fusion vs the PyTorch reference,
the run-time flag (off = base bit for bit, per row in a batch), the pass without torch, the checkpoint loader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from anchorrt.exporter.visalign.checkpoint import write_entry
from anchorrt.exporter.visalign.fusion import VisAlignFusion
from anchorrt.exporter.visalign.reference import VisAlignLlava
from anchorrt.graph_passes.visalign import WEIGHTS_FILE, FusionWeights, VisAlignPass
from anchorrt.runtime.errors import CheckpointError, FlagError
from anchorrt.runtime.pipeline import Pipeline, Request
from anchorrt.runtime.visalign import visalign_state, visual_mean

from tests.conftest import BLOCK_TORCH, ROOT

PROMPTS = ["What is in the image?", "Is there a dog in the picture? Describe the content of the image."]
ATOL = 1e-4  # fp32 logits
DECODE_STEPS = 3


def random_fusion(d: int, seed: int = 3) -> VisAlignFusion:
    """A clearly non-identity fusion: W = [I + noise | noise], b = noise."""
    g = torch.Generator().manual_seed(seed)
    fusion = VisAlignFusion(d)
    with torch.no_grad():
        fusion.proj.weight.add_(torch.randn(d, 2 * d, generator=g) * 0.15)
        fusion.proj.bias.copy_(torch.randn(d, generator=g) * 0.1)
    return fusion


@pytest.fixture(scope="module")
def va_model(tiny_model, tmp_path_factory):
    """The tiny checkpoint + a random fusion: a VisAlign checkpoint folder."""
    folder = tmp_path_factory.mktemp("visalign") / "tiny-visalign"
    shutil.copytree(tiny_model, folder)
    random_fusion(64).save(folder / WEIGHTS_FILE)
    write_entry(folder, 64, "identity")
    return folder


@pytest.fixture(scope="module")
def va_artifact(va_model, tmp_path_factory):
    """`export_model` of the VisAlign checkpoint: the export hook bakes the fusion into the embed graph."""
    from anchorrt.exporter.export import export_model

    out = tmp_path_factory.mktemp("visalign-artifacts") / "tiny-visalign"
    export_model(va_model, out)
    return out


def bake_torch_free(artifact, weights) -> subprocess.CompletedProcess:
    """`bake_visalign` + manifest rewrite in a subprocess where importing torch/transformers raises."""
    code = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from anchorrt.graph_passes.visalign import bake_visalign
        from anchorrt.runtime.manifest import MANIFEST_NAME, write_manifest
        folder = Path({str(artifact)!r})
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        count = bake_visalign(folder, manifest, {str(weights)!r})
        write_manifest(folder, manifest)
        print("count", count, "torch" in sys.modules)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BLOCK_TORCH), str(ROOT)]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def identity_artifact(tiny_artifact, tmp_path_factory):
    """The plain tiny artifact with an identity fusion baked in by the torch-free pass."""
    folder = tmp_path_factory.mktemp("visalign-identity") / "tiny-identity"
    shutil.copytree(tiny_artifact, folder)
    weights = folder.parent / WEIGHTS_FILE
    VisAlignFusion(64).save(weights)
    proc = bake_torch_free(folder, weights)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["count", "1", "False"]
    return folder


# -- helpers: run the ONNX stages and the reference on the same ids and pixels --------------------------------------
def onnx_steps(pipe: Pipeline, images, prompts, enabled, forced: list[np.ndarray] | None = None):
    """Prefill + DECODE_STEPS decode steps (teacher-forced with `forced` tokens, else greedy). -> [steps+1] x [B, V]."""
    batch = pipe._pad([pipe.prompts.encode(p) for p in prompts])
    feats = pipe.encode_images(pipe.preprocess(images))
    b = len(prompts)
    cache = pipe._new_cache(b, batch.ids.shape[1] + DECODE_STEPS + 1)
    state = visalign_state(pipe.visalign, [{"visalign": bool(e)} for e in enabled], feats, batch.image_mask)
    logits = [pipe.prefill(batch, feats, cache, {}, state)]
    mask, pos = batch.attention_mask, batch.attention_mask.sum(-1) - 1
    for s in range(DECODE_STEPS):
        token = forced[s] if forced is not None else logits[-1].argmax(-1)
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        pos = pos + 1
        logits.append(pipe.decode_one_token(token.astype(np.int64), mask, pos, cache, {}, state))
    return logits


def reference_inputs(pipe: Pipeline, images, prompts):
    batch = pipe._pad([pipe.prompts.encode(p) for p in prompts])
    pixels = torch.from_numpy(pipe.preprocess(images))
    return torch.from_numpy(batch.ids), torch.from_numpy(batch.attention_mask), pixels


def reference_steps(model: VisAlignLlava, ids, mask, pixels, enable):
    """Prefill + DECODE_STEPS greedy steps of the reference. -> (logits [steps+1] x [B, V], greedy tokens)."""
    from transformers import DynamicCache

    with torch.no_grad():
        out = model(ids, mask, pixel_values=pixels, enable=enable, past_key_values=DynamicCache(), use_cache=True,
                    logits_to_keep=1)
        logits, tokens = [out.logits[:, -1].numpy()], []
        for _ in range(DECODE_STEPS):
            token = out.logits[:, -1].argmax(-1)
            tokens.append(token.numpy())
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(token[:, None], mask, v_bar=out.v_bar, enable=enable, past_key_values=out.past_key_values,
                        use_cache=True, logits_to_keep=1)
            logits.append(out.logits[:, -1].numpy())
    return logits, tokens


def max_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


# -- identity: exactly the base model --------------------------------------------------------------------------------
def test_identity_fusion_is_base_model_in_pytorch(tiny_model, tiny_artifact, images):
    """W = [I | 0], b = 0: the reference's logits equal transformers' LLaVA bit for bit (prefill + decode)."""
    from transformers import DynamicCache

    model = VisAlignLlava.from_pretrained(tiny_model)  # no VisAlign entry: a new identity fusion
    pipe = Pipeline.from_dir(tiny_artifact)
    ids, mask, pixels = reference_inputs(pipe, images[:2], PROMPTS)
    fused, tokens = reference_steps(model, ids, mask, pixels, enable=True)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions,
                       past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        base = [out.logits[:, -1].numpy()]
        for token in tokens:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model.hf(input_ids=torch.from_numpy(token)[:, None], attention_mask=mask, position_ids=positions,
                           past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
            base.append(out.logits[:, -1].numpy())
    for a, b in zip(fused, base):
        np.testing.assert_array_equal(a, b)


def test_identity_fusion_is_base_artifact_in_onnx(identity_artifact, tiny_artifact, images):
    """The same in ONNX: the baked identity fusion, flag on, gives the base artifact's embeddings and logits exactly."""
    va, base = Pipeline.from_dir(identity_artifact), Pipeline.from_dir(tiny_artifact)
    on = onnx_steps(va, images[:2], PROMPTS, [True, True])
    plain = onnx_steps(base, images[:2], PROMPTS, [False, False])
    for a, b in zip(on, plain):
        np.testing.assert_array_equal(a, b)
    got = va.generate_batch([Request(images[0], PROMPTS[0]), Request(images[1], PROMPTS[1])], max_new_tokens=16)
    want = base.generate_batch([Request(images[0], PROMPTS[0]), Request(images[1], PROMPTS[1])], max_new_tokens=16)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


# -- a random fusion: ONNX vs the PyTorch reference -------------------------------------------------------------------
def test_random_fusion_matches_reference(va_model, va_artifact, images):
    pipe = Pipeline.from_dir(va_artifact)
    model = VisAlignLlava.from_pretrained(va_model)
    ids, mask, pixels = reference_inputs(pipe, images[:2], PROMPTS)
    ref, tokens = reference_steps(model, ids, mask, pixels, enable=True)
    got = onnx_steps(pipe, images[:2], PROMPTS, [True, True], forced=tokens)
    diff = max_diff(ref, got)
    assert diff <= ATOL, diff
    # the fusion is not a no-op: the base model's logits are far from these
    base, _ = reference_steps(model, ids, mask, pixels, enable=False)
    assert max_diff(ref[:1], base[:1]) > 0.05


def test_random_fusion_greedy_tokens_identical(va_model, va_artifact, images):
    """16 greedy tokens: the runtime's generate (VisAlign on by the manifest's default) = the reference's."""
    pipe = Pipeline.from_dir(va_artifact)
    model = VisAlignLlava.from_pretrained(va_model)
    eos = pipe.manifest.tokens["eos_token_ids"]
    for img, prompt in zip(images, PROMPTS):
        ids, mask, pixels = reference_inputs(pipe, [img], [prompt])
        want, _ = model.generate(ids, mask, pixels, max_new_tokens=16, enable=True, eos_token_id=eos)
        got = pipe.generate(img, prompt, max_new_tokens=16).token_ids
        assert got == want[0]
        assert len(got) > 1
    got = [g.token_ids for g in pipe.generate_batch([Request(images[0], PROMPTS[0]), Request(images[1], PROMPTS[1])],
                                                     max_new_tokens=16)]
    ids, mask, pixels = reference_inputs(pipe, images[:2], PROMPTS)
    want, _ = model.generate(ids, mask, pixels, max_new_tokens=16, enable=True, eos_token_id=eos,
                             pad_token_id=pipe.pad_id)
    assert got == want


def test_flag_off_is_base(va_artifact, tiny_artifact, images):
    """visalign.enable = false: the base artifact's embeddings and logits, bit for bit."""
    va, base = Pipeline.from_dir(va_artifact), Pipeline.from_dir(tiny_artifact)
    off = onnx_steps(va, images[:2], PROMPTS, [False, False])
    plain = onnx_steps(base, images[:2], PROMPTS, [False, False])
    for a, b in zip(off, plain):
        np.testing.assert_array_equal(a, b)


def test_batch_with_one_row_on_and_one_off(va_model, va_artifact, images):
    pipe = Pipeline.from_dir(va_artifact)
    mixed = onnx_steps(pipe, images[:2], PROMPTS, [True, False])
    on = onnx_steps(pipe, images[:2], PROMPTS, [True, True])
    off = onnx_steps(pipe, images[:2], PROMPTS, [False, False])
    # greedy tokens of the mixed batch may differ from the all-on/all-off batches' per row; compare per row on
    # the prefill (same inputs), where the rows are independent
    np.testing.assert_array_equal(mixed[0][0], on[0][0])
    np.testing.assert_array_equal(mixed[0][1], off[0][1])
    assert not np.allclose(mixed[0][0], off[0][0], atol=1e-3)
    model = VisAlignLlava.from_pretrained(va_model)
    ids, mask, pixels = reference_inputs(pipe, images[:2], PROMPTS)
    ref, tokens = reference_steps(model, ids, mask, pixels, enable=torch.tensor([True, False]))
    got = onnx_steps(pipe, images[:2], PROMPTS, [True, False], forced=tokens)
    assert max_diff(ref, got) <= ATOL
    # the same through generate_batch's per-request flags: 16 greedy tokens as the reference's
    reqs = [Request(images[0], PROMPTS[0], {"visalign": True}), Request(images[1], PROMPTS[1], {"visalign": False})]
    got = [g.token_ids for g in pipe.generate_batch(reqs, max_new_tokens=16)]
    want, _ = model.generate(ids, mask, pixels, max_new_tokens=16, enable=torch.tensor([True, False]),
                             eos_token_id=pipe.manifest.tokens["eos_token_ids"], pad_token_id=pipe.pad_id)
    assert got == want


# -- the artifact, the pass, the loader -------------------------------------------------------------------------------
def test_export_records_visalign(va_model, va_artifact, tiny_artifact):
    import hashlib

    manifest = json.loads((va_artifact / "manifest.json").read_text())
    section = manifest["mitigation"]["visalign"]
    assert section["inputs"]["visalign.enable"]["default"] is True
    assert section["weights"]["sha256"] == hashlib.sha256((va_model / WEIGHTS_FILE).read_bytes()).hexdigest()
    names = [i["name"] for i in manifest["graphs"]["embed"]["inputs"]]
    assert names[-2:] == ["visalign.enable", "visalign.v_bar"]
    assert {"graph": "embed", "pass": "visalign", "count": 1} in manifest["passes"]
    base = json.loads((tiny_artifact / "manifest.json").read_text())
    assert manifest["graphs"]["decoder"] == base["graphs"]["decoder"]  # the decoder is left as it was
    assert manifest["files"]["decoder.onnx"] == base["files"]["decoder.onnx"]


def test_pass_near_misses_count_zero(va_artifact, tiny_artifact):
    import onnx_ir as ir

    weights = FusionWeights(np.eye(64, 128, dtype=np.float32), np.zeros(64, np.float32))
    for graph, why in [(tiny_artifact / "decoder.onnx", "not an embed graph"),
                       (va_artifact / "embed.onnx", "already has visalign.enable")]:
        model = ir.load(str(graph))
        p = VisAlignPass(weights)
        result = p(model)
        assert p.count == 0 and not result.modified and why in p.reason
    small = FusionWeights(np.eye(32, 64, dtype=np.float32), np.zeros(32, np.float32))
    p = VisAlignPass(small)
    p(ir.load(str(tiny_artifact / "embed.onnx")))
    assert p.count == 0 and "hidden size 64" in p.reason
    p = VisAlignPass(weights)
    model = ir.load(str(tiny_artifact / "embed.onnx"))
    p(model)
    ops = [n.op_type for n in model.graph if n.name.startswith("/visalign/")]
    assert p.count == 1 and sorted(ops) == sorted(["Not", "Unsqueeze", "And", "Unsqueeze", "MatMul", "MatMul", "Add",
                                                   "Unsqueeze", "Add", "Where"])


def test_loader_refuses_mismatched_hidden_size(va_model, tmp_path):
    from anchorrt.exporter.export import export_model

    bad = tmp_path / "bad"
    shutil.copytree(va_model, bad)
    write_entry(bad, 32, "identity")
    with pytest.raises(CheckpointError, match="hidden size 32 but the model's is 64") as err:
        export_model(bad, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    write_entry(bad, 64, "identity")
    VisAlignFusion(32).save(bad / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="hidden size 32 but the model's is 64"):
        VisAlignLlava.from_pretrained(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_runtime_flags(tiny_artifact, va_artifact, images):
    base = Pipeline.from_dir(tiny_artifact)
    feats = np.zeros((1, base.tokens_per_image, base.hidden), np.float32)
    mask = np.zeros((1, 20), bool)
    mask[0, 2:2 + base.tokens_per_image] = True
    assert base.visalign is None and visalign_state(None, None, feats, mask) is None
    with pytest.raises(FlagError, match="no VisAlign"):
        visalign_state(None, {"visalign": True}, feats, mask)
    va = Pipeline.from_dir(va_artifact)
    with pytest.raises(FlagError, match="true or false"):
        visalign_state(va.visalign, {"visalign": "yes"}, feats, mask)
    with pytest.raises(FlagError, match="one per request"):
        visalign_state(va.visalign, [{"visalign": True}] * 2, feats, mask)
    with pytest.raises(FlagError, match="has no image"):
        visalign_state(va.visalign, None, feats[:0], np.zeros((1, 20), bool))
    # v_bar: the mean over the row's own image positions (row-major), whatever the padding
    feats = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(visual_mean(feats, mask), feats.mean(axis=1))


def test_bake_cli_visalign_matches_export(va_model, va_artifact, tiny_artifact, images, tmp_path):
    """`anchorrt bake OUT --visalign FILE` (torch unimportable) on a plain export gives what exporting the
    VisAlign checkpoint gives; a second bake, or a missing file, is a one-line error with nothing changed."""
    from tests.conftest import run_cli

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    proc = run_cli("bake", str(art), "--visalign", str(va_model / WEIGHTS_FILE), block_torch=True)
    assert proc.returncode == 0, proc.stderr
    got = Pipeline.from_dir(art).generate(images[0], PROMPTS[0], max_new_tokens=12).token_ids
    want = Pipeline.from_dir(va_artifact).generate(images[0], PROMPTS[0], max_new_tokens=12).token_ids
    assert got == want
    before = {p.name: p.stat().st_mtime_ns for p in art.iterdir()}
    for args, fragment in ((["--visalign", str(va_model / WEIGHTS_FILE)], "already has VisAlign"),
                           (["--visalign", str(tmp_path / "none.safetensors")], "does not exist"), ([], "say what to bake")):
        proc = run_cli("bake", str(art), *args, block_torch=True)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert before == {p.name: p.stat().st_mtime_ns for p in art.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
