"""Baked CLVA/SEVI through the runtime against the independent PyTorch reference (exporter/reference).

The tiny fixtures (MHA at opset 18, GQA at opset 23, LLaVA-Interleave's Qwen2 + SigLIP at opset 18), CLVA / SEVI / both on row 0 of a left-padded batch of two
and off on row 1: logits within 1e-4 for the prefill and 3 decode steps, identical CLVA masks and head sets and
SEVI head classes (debug outputs), the off row exactly the plain model, the on row measurably changed, and 16
greedy tokens identical. The random tiny model's attention is nearly uniform, so CLVA runs with lam=0, tau=0.5
(non-empty head sets; the defaults select almost nothing) and SEVI from layer 2 (the default 8 leaves an 8-layer
model unchanged).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from anchorrt.exporter.reference import ReferenceLlava
from anchorrt.graph_passes.bake import BakeOptions, bake
from anchorrt.runtime.pipeline import Pipeline, Request

PROMPTS = ["What is in the image? Describe the content of the image.", "Count."]
CLVA = {"alpha": 14.0, "beta": 0.9, "tau": 0.5, "lambda": 0.0}
SEVI = {"omega": 0.5, "kappa": 0.2}
CASES = {
    "clva": {"clva": CLVA},
    "sevi": {"sevi": SEVI},
    "both": {"clva": CLVA, "sevi": SEVI},
}
ATOL = 1e-4
STEPS = 3


def _f32(x: float) -> float:
    """The value the graph sees (its inputs are float32), so that thresholds compare the same numbers."""
    return float(np.float32(x))


def reference_flags(spec: dict):
    clva = sevi = None
    if "clva" in spec:
        c = spec["clva"]
        clva = {"alpha": _f32(c["alpha"]), "beta": c["beta"], "tau": _f32(c["tau"]), "lam": _f32(c["lambda"])}
    if "sevi" in spec:
        sevi = {"omega": _f32(spec["sevi"]["omega"]), "kappa": _f32(spec["sevi"]["kappa"]), "start_layer": 2}
    return ([clva, None] if clva else None), ([sevi, None] if sevi else None)


FIXTURES = {"mha18": ("tiny_artifact", "tiny_model"), "gqa23": ("gqa_artifact", "gqa_model"),
            "interleave": ("interleave_artifact", "interleave_model")}  # Qwen2 (q/k/v bias) + SigLIP


@pytest.fixture(scope="module", params=list(FIXTURES))
def setup(request, tmp_path_factory, images):
    plain_dir = request.getfixturevalue(FIXTURES[request.param][0])
    model_dir = request.getfixturevalue(FIXTURES[request.param][1])
    baked_dir = tmp_path_factory.mktemp("parity") / request.param
    shutil.copytree(plain_dir, baked_dir)
    bake(baked_dir, "clva,sevi", BakeOptions(sevi_start_layer=2, debug_outputs=True))
    pipe, plain = Pipeline.from_dir(baked_dir), Pipeline.from_dir(plain_dir)
    batch = pipe._pad([pipe.prompts.encode(p) for p in PROMPTS])
    pixels = pipe.preprocess([pipe._load(img, i) for i, img in enumerate(images[:2])])  # [2, 3, H, W]
    return {"pipe": pipe, "plain": plain, "batch": batch, "pixels": pixels, "images": images[:2],
            "ref": ReferenceLlava.from_pretrained(model_dir), "name": request.param}


def onnx_passes(pipe: Pipeline, plain: Pipeline, batch, pixels, specs, tokens):
    """Prefill + teacher-forced decode steps (the reference's greedy tokens) through the runtime's own stages and
    feeds; every decoder output is fetched (debug outputs included). -> [(baked outputs, plain logits)]."""
    features = pipe.encode_images(pixels)
    extra = pipe._extra_inputs(batch, specs)
    sess, sess_plain = pipe.decoder.session, plain.decoder.session
    names = [o.name for o in sess.get_outputs()]
    b = batch.ids.shape[0]
    past = {f"past_key_values.{i}.{kv}": np.zeros((b, pipe.kv_heads, 0, pipe.head_dim), np.float32)
            for i in range(pipe.num_layers) for kv in ("key", "value")}
    past_plain = dict(past)
    mask = batch.attention_mask
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    embeds = pipe._embed(batch.ids, features, batch.image_mask)
    no_images = np.zeros((0,) + features.shape[1:], np.float32)
    out = []
    for step in range(STEPS + 1):
        feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        extra_now = {k: (v(mask) if callable(v) else v) for k, v in extra.items()}
        res = dict(zip(names, sess.run(None, {**feed, **extra_now, **past})))
        res_plain = dict(zip([o.name for o in sess_plain.get_outputs()], sess_plain.run(None, {**feed, **past_plain})))
        out.append((res, res_plain["logits"][:, -1]))
        if step == STEPS:
            break
        past = {f"past_key_values.{k[8:]}": v for k, v in res.items() if k.startswith("present.")}
        past_plain = {f"past_key_values.{k[8:]}": v for k, v in res_plain.items() if k.startswith("present.")}
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
        positions = positions[:, -1:] + 1
        embeds = pipe._embed(tokens[step][:, None], no_images, np.zeros((b, 1), bool))
    return out


def reference_passes(ref: ReferenceLlava, batch, pixels, clva, sevi):
    ids, mask = torch.tensor(batch.ids), torch.tensor(batch.attention_mask)
    r = ref.forward(ids, torch.tensor(pixels), mask, clva=clva, sevi=sevi)
    out, tokens = [r], []
    for _ in range(STEPS):
        tok = r.logits[:, -1].argmax(-1)  # [B]
        tokens.append(tok.numpy().astype(np.int64))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        r = ref.forward(tok[:, None], None, mask, cache=r.cache, clva=clva, sevi=sevi)
        out.append(r)
    return out, tokens


@pytest.mark.parametrize("case", list(CASES))
def test_flags_on_match_the_reference(setup, case):
    spec = CASES[case]
    clva, sevi = reference_flags(spec)
    refs, tokens = reference_passes(setup["ref"], setup["batch"], setup["pixels"], clva, sevi)
    passes = onnx_passes(setup["pipe"], setup["plain"], setup["batch"], setup["pixels"], [spec, None], tokens)
    effect = 0.0
    for step, ((res, plain_logits), r) in enumerate(zip(passes, refs)):
        logits, ref_logits = res["logits"][:, -1], r.logits[:, -1].numpy()
        diff = float(np.abs(logits - ref_logits).max())
        assert diff <= ATOL, f"{setup['name']} {case} step {step}: max |logit diff| {diff:.3g}"
        assert np.array_equal(logits[1], plain_logits[1]), "the off row must be exactly the plain model"
        effect = max(effect, float(np.abs(logits[0] - plain_logits[0]).max()))
        if clva:
            d = r.debug["clva"]
            for name, key in (("clva.zpos", "zpos"), ("clva.zneg", "zneg"), ("clva.sensitive_heads", "sensitive_heads"),
                              ("clva.insensitive_heads", "insensitive_heads")):
                assert np.array_equal(res[name], d[key].numpy()), f"{name} differs at step {step}"
            assert res["clva.sensitive_heads"][0].any() and res["clva.insensitive_heads"][0].any()  # not vacuous
            assert res["clva.zpos"][0].any() and res["clva.zneg"][0].any()
            assert not res["clva.zpos"][1].any()
        if sevi:
            for layer in range(2, setup["pipe"].num_layers):
                expected = r.debug["sevi"][layer]["head_class"].numpy()
                assert np.array_equal(res[f"sevi.head_class.{layer}"], expected), f"SEVI layer {layer}, step {step}"
    assert effect > 1e-3, f"{case} on row 0 changed the logits by only {effect:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_sixteen_greedy_tokens_match_the_reference(setup, case):
    spec = CASES[case]
    clva, sevi = reference_flags(spec)
    pipe, batch = setup["pipe"], setup["batch"]
    got = pipe.generate_batch([Request(img, p, spec if i == 0 else None)
                               for i, (img, p) in enumerate(zip(setup["images"], PROMPTS))], max_new_tokens=16)
    assert_reference_tokens(setup["ref"], batch, setup["pixels"], got, 16, clva, sevi)


def assert_reference_tokens(ref, batch, pixels, got, steps: int, clva, sevi) -> None:
    """The reference's greedy tokens for `batch` (cut after its first EOS) equal each generated row's."""
    eos = ref.hf.generation_config.eos_token_id
    new = ref.generate(torch.tensor(batch.ids), torch.tensor(pixels), torch.tensor(batch.attention_mask), steps,
                       clva=clva, sevi=sevi, eos_token_id=eos)
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for row, g in zip(new.tolist(), got):
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        assert g.token_ids == row[:cut]


def test_cli_torch_backend_agrees_with_the_artifact(setup, tmp_path):
    """`anchorrt generate --backend torch MODEL_DIR --clva ...` (the reference) and the baked artifact through the
    CLI give the same tokens (CLVA with the default layers, which both sides use), for both architectures."""
    import json

    from tests.conftest import run_cli

    image = tmp_path / "image.png"
    setup["images"][0].convert("RGB").save(image)
    flags = ["--clva", "--clva-tau", "0.5", "--clva-lambda", "0", "--max-new-tokens", "6", "--json",
             "--image", str(image), "--prompt", PROMPTS[0]]
    model_dir = setup["ref"].hf.name_or_path
    torch_run = run_cli("generate", "--backend", "torch", str(model_dir), *flags)
    onnx_run = run_cli("generate", str(setup["pipe"].manifest.folder), *flags, block_torch=True)
    assert torch_run.returncode == 0, torch_run.stderr
    assert onnx_run.returncode == 0, onnx_run.stderr
    assert json.loads(torch_run.stdout)["token_ids"] == json.loads(onnx_run.stdout)["token_ids"]
    bad = run_cli("generate", str(setup["pipe"].manifest.folder), "--image", str(image), "--prompt", "hi",
                  "--clva-tau", "-1", block_torch=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: clva tau must be >= 0, got -1"
