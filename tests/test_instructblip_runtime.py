"""InstructBLIP (issue 16) through the torch-free runtime: greedy tokens vs transformers' generate, `verify`,
CLVA (in the Q-Former) and SEVI (in the language model) on/off vs the independent reference
(exporter/reference/instructblip_reference.py), flags off = unbaked exactly, IAVA with lam = -0.1, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anchorrt.exporter.verify import random_images, verify
from anchorrt.runtime.kv_cache import KVCache
from anchorrt.runtime.pipeline import Pipeline, Request

from tests.conftest import run_cli

PROMPTS = ["What is in the image?", "Is there a dog in the picture? Describe the content of the image.", "Count."]
ATOL = 1e-4
STEPS = 5


@pytest.fixture(scope="module")
def pictures():
    return random_images(3, seed=5)


@pytest.fixture(scope="module")
def hf(tiny_instructblip):
    from transformers import AutoProcessor, InstructBlipForConditionalGeneration

    model = InstructBlipForConditionalGeneration.from_pretrained(tiny_instructblip, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_instructblip)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def pipes(instructblip_artifact, instructblip_baked):
    return Pipeline.from_dir(instructblip_artifact), Pipeline.from_dir(instructblip_baked)


def _hf_generate(hf, images, prompts, n=12):
    model, processor = hf
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    eos = model.generation_config.eos_token_id
    rows = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        rows.append(row[:cut])
    return rows


def test_greedy_tokens_identical_to_transformers(pipes, hf, pictures):
    plain, _ = pipes
    for image, prompt in zip(pictures, PROMPTS):
        assert plain.generate(image, prompt, max_new_tokens=12).token_ids == _hf_generate(hf, [image], [prompt])[0]
    got = [g.token_ids for g in plain.generate_batch([Request(pictures[0], PROMPTS[0]), Request(pictures[1], PROMPTS[1])],
                                                      max_new_tokens=12)]
    assert got == _hf_generate(hf, pictures[:2], PROMPTS[:2])  # left padding vs the processor's padding
    assert len(got[0]) > 1 and got[0] != got[1]


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one-by-one"])
def test_verify_passes(tiny_instructblip, instructblip_artifact, pictures, batch):
    report = verify(tiny_instructblip, instructblip_artifact, images=pictures, prompts=PROMPTS, steps=STEPS,
                    atol=ATOL, batch=batch)
    assert len(report.per_step_max_abs_diff) == STEPS + 1
    assert report.max_abs_diff <= ATOL and report.greedy_agreement == 1.0, report.summary()


def _runtime_passes(pipe, image, prompt, spec, tokens):
    """Prefill + teacher-forced decode steps through the runtime's own stages. -> logits per step [V]."""
    visual = pipe.preprocess_images([pipe._load(image, 0)])
    features = pipe.encode_images(visual, [prompt], [spec])
    batch = pipe._pad([pipe.prompts.encode(prompt)], visual)
    cache = KVCache(pipe.num_layers, 1, pipe.kv_heads, pipe.head_dim, batch.ids.shape[1] + STEPS + 1, pipe.kv_dtype)
    extra = pipe._extra_inputs(batch, [spec])
    logits = [pipe.prefill(batch, features, cache, extra)[0]]
    mask, pos = batch.attention_mask, batch.attention_mask.sum(-1) - 1
    for s in range(STEPS):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        pos = pos + 1
        logits.append(pipe.decode_one_token(np.array([tokens[s]]), mask, pos, cache, extra)[0])
    return logits


def _reference_passes(ref, hf, image, prompt, clva, sevi):
    from anchorrt.exporter.reference.instructblip_reference import ImageInputs

    _, processor = hf
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    images = ImageInputs(inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"],
                         [clva])
    mask = inputs["attention_mask"]
    r = ref.forward(inputs["input_ids"], images, mask, sevi=sevi)
    logits, tokens = [r.logits[0, -1].numpy()], []
    for _ in range(STEPS):
        tok = r.logits[:, -1].argmax(-1)
        tokens.append(int(tok))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        r = ref.forward(tok[:, None], None, mask, cache=r.cache, sevi=sevi)
        logits.append(r.logits[0, -1].numpy())
    return logits, tokens


# A prompt long enough that the last row's attention mass after the 32 image tokens makes text heads (SEVI needs
# them; with a short prompt every head of this random model is a vision head and SEVI rightly changes nothing).
LONG = ("the a an of in on is are there this that what which where left right above below one two three four five "
        "red green blue yellow purple orange. What is in the image?")
CASES = {  # request flags, reference CLVA, reference SEVI, whether the output must change
    "off": (None, None, None, False),
    "clva": ({"clva": {"tau": 0.5, "lam": 0.3}}, dict(tau=0.5, lam=0.3), None, True),
    "clva-defaults": ({"clva": True}, {}, None, False),
    "sevi": ({"sevi": {"omega": 0.8}}, None, {"omega": 0.8, "start_layer": 2}, True),
    "clva+sevi": ({"clva": {"tau": 0.2, "lam": 0.0, "beta": 2.0}, "sevi": True}, dict(tau=0.2, lam=0.0, beta=2.0),
                  {"start_layer": 2}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_methods_match_the_reference(pipes, hf, pictures, case):
    from anchorrt.exporter.reference.instructblip_reference import QFormerClva, ReferenceInstructBlip

    plain, baked = pipes
    spec, clva, sevi, must_change = CASES[case]
    ref = ReferenceInstructBlip(hf[0])
    want, tokens = _reference_passes(ref, hf, pictures[0], LONG, None if clva is None else QFormerClva(**clva), sevi)
    got = _runtime_passes(baked, pictures[0], LONG, spec, tokens)
    unbaked = _runtime_passes(plain, pictures[0], LONG, None, tokens)
    for step, (g, w) in enumerate(zip(got, want)):
        assert np.abs(g - w).max() <= ATOL, (case, step, float(np.abs(g - w).max()))
    assert [int(np.argmax(g)) for g in got[:-1]] == tokens
    if spec is None:  # flags off: the unbaked artifact exactly
        assert all(np.array_equal(g, u) for g, u in zip(got, unbaked))
    elif must_change:  # the method changed something on this input (the parity check is not vacuous)
        assert max(float(np.abs(g - u).max()) for g, u in zip(got, unbaked)) > 1e-3
    greedy = baked.generate(pictures[0], LONG, max_new_tokens=STEPS + 1, mitigation=spec).token_ids
    assert greedy == tokens + [int(np.argmax(got[-1]))][:len(greedy) - len(tokens)]


def test_iava_lam_minus_point_one(pipes, pictures):
    """IAVA on the 32 query tokens with the paper's InstructBLIP lam = -0.1; G's features come from the Q-Former
    reading G (they depend on the prompt), so att_G is not the query's attention on the same features."""
    _, baked = pipes
    out = baked.generate(pictures[0], PROMPTS[1], max_new_tokens=6, mitigation={"iava": {"lam": -0.1, "i": 0.5}})
    att_g, att_q = out.details["iava"]["att_general"], out.details["iava"]["att_query"]
    assert att_g.shape == att_q.shape == (32,)
    irrelevant = out.details["iava"]["irrelevant"]
    g = att_g.astype(np.float64)
    delta = g - att_q
    assert all(delta[j] > 0 and g[j] > g.mean() - 0.1 * g.std() for j in irrelevant)
    plain = baked.generate(pictures[0], PROMPTS[1], max_new_tokens=6)
    assert len(out.token_ids) >= 1 and len(plain.token_ids) >= 1
    g_feats = baked.encode_images(baked.preprocess_images([baked._load(pictures[0], 0)]),
                                  ["Describe the content of the image."])
    q_feats = baked.encode_images(baked.preprocess_images([baked._load(pictures[0], 0)]), [PROMPTS[1]])
    assert np.abs(g_feats - q_feats).max() > 1e-3


def test_cli_generate_eval_pope_and_profile(instructblip_artifact, instructblip_baked, pictures, tmp_path):
    """The CLI on an InstructBLIP artifact, torch blocked: generate with CLVA, eval pope, profile."""
    import json

    (tmp_path / "imgs").mkdir()
    for k, picture in enumerate(pictures[:2]):
        picture.save(tmp_path / "imgs" / f"{k}.png")
    res = run_cli("generate", str(instructblip_baked), "--image", str(tmp_path / "imgs" / "0.png"), "--prompt",
                  PROMPTS[0], "--max-new-tokens", "4", "--clva", block_torch=True)
    assert res.returncode == 0, res.stderr
    rows = [{"question_id": k, "image": f"{k % 2}.png", "text": f"Is there a {w} in the image?", "label": lab}
            for k, (w, lab) in enumerate((("dog", "yes"), ("cat", "no"), ("star", "yes")))]
    pope = tmp_path / "coco_pope_random.json"
    pope.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = run_cli("eval", "pope", str(instructblip_baked), "-q", str(pope), "--image-root", str(tmp_path / "imgs"),
                  "--out", str(tmp_path / "pope"), "--mitigation", "clva,sevi", "--max-new-tokens", "3",
                  "--no-progress", block_torch=True)
    assert res.returncode == 0, res.stderr
    assert any((tmp_path / "pope").iterdir())
    import shutil

    from anchorrt.graph_passes.bake import bake

    clva_only = tmp_path / "clva"  # profile's A/B names every baked method; "probe" is no request method
    shutil.copytree(instructblip_artifact, clva_only)
    bake(clva_only, "clva")
    res = run_cli("profile", str(clva_only), "--out", str(tmp_path / "prof"), "--batch-sizes", "1",
                  "--contexts", "auto", "--images", "1", "--warmup", "0", "--repeats", "1", "--new-tokens", "2",
                  "--no-plots", block_torch=True)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert "clva" in json.dumps(report)


def test_visalign_on_the_query_tokens(instructblip_artifact, hf, pictures, tmp_path):
    """VisAlign on InstructBLIP: v_bar = the mean of the 32 projected query outputs (METHODS.md "Visual positions");
    a random fusion baked by the torch-free pass vs the reference with the fusion written out here; off = base."""
    import shutil

    from anchorrt.exporter.reference.instructblip_reference import ImageInputs, ReferenceInstructBlip
    from anchorrt.exporter.visalign.fusion import VisAlignFusion
    from anchorrt.graph_passes.bake import bake_visalign_weights

    d = 64
    fusion = VisAlignFusion(d)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # clearly not the identity
        fusion.proj.weight.add_(torch.randn(d, 2 * d, generator=g) * 0.15)
        fusion.proj.bias.copy_(torch.randn(d, generator=g) * 0.1)
    weights = tmp_path / "visalign.safetensors"
    fusion.save(weights)
    art = tmp_path / "va"
    shutil.copytree(instructblip_artifact, art)
    bake_visalign_weights(art, weights)

    class FusedReference(ReferenceInstructBlip):
        v_bar = None

        def _embed(self, input_ids, pixel_values, image_sizes=None):
            text = self.embed[input_ids]  # e_t
            if pixel_values is not None:
                h = super()._embed(input_ids, pixel_values)
                slots = input_ids == self.image_token_id
                self.v_bar = h[slots].mean(0)  # [d]: the request's 32 query outputs
            else:
                h, slots = text, torch.zeros_like(input_ids, dtype=torch.bool)
            fused = fusion.proj(torch.cat([text, self.v_bar.expand_as(text)], dim=-1))
            return torch.where(slots[..., None], h, fused)

    model, processor = hf
    inputs = processor(images=[pictures[1]], text=[PROMPTS[1]], return_tensors="pt")
    images = ImageInputs(inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"])
    eos = model.generation_config.eos_token_id
    want = FusedReference(model).generate(inputs["input_ids"], images, inputs["attention_mask"], 8,
                                          eos_token_id=eos)[0].tolist()
    pipe, base = Pipeline.from_dir(art), Pipeline.from_dir(instructblip_artifact)
    got = pipe.generate(pictures[1], PROMPTS[1], max_new_tokens=8, mitigation={"visalign": True}).token_ids
    plain = base.generate(pictures[1], PROMPTS[1], max_new_tokens=8).token_ids
    assert got == want
    assert got != plain  # the fusion changes the answer here
    assert pipe.generate(pictures[1], PROMPTS[1], max_new_tokens=8, mitigation={"visalign": False}).token_ids == plain


@pytest.mark.parametrize("spec", [{"lam": -0.1, "i": 0.5}, {"lam": -0.1}, {"lam": 0.0, "i": 8, "alpha": 0.5}])
def test_iava_matches_the_reference(pipes, tiny_instructblip, pictures, spec, monkeypatch):
    """The runtime's IAVA (probe prefill, G's own Q-Former features, one-batch contrastive decoding) vs the
    reference on InstructBLIP: irrelevant set, att_G / att_Q, the combined scores of the first steps, tokens."""
    import anchorrt.runtime.pipeline as pipeline_mod
    from anchorrt.exporter.reference.instructblip_reference import ReferenceIavaInstructBlip
    from anchorrt.runtime.iava import contrastive_scores

    calls = []

    def spy(*args, **kwargs):
        calls.append(contrastive_scores(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(pipeline_mod, "contrastive_scores", spy)
    _, baked = pipes
    got = baked.generate(pictures[0], PROMPTS[1], max_new_tokens=8, mitigation={"iava": spec})
    want = ReferenceIavaInstructBlip(tiny_instructblip).generate(
        pictures[0], PROMPTS[1], "{prompt}", alpha=spec.get("alpha", 1.0), i=spec.get("i"), lam=spec["lam"],
        max_new_tokens=8)
    assert got.details["iava"]["irrelevant"] == want.irrelevant and want.irrelevant  # a non-empty I here
    np.testing.assert_allclose(got.details["iava"]["att_general"], want.att_general.numpy(), atol=1e-6)
    np.testing.assert_allclose(got.details["iava"]["att_query"], want.att_query.numpy(), atol=1e-6)
    assert got.token_ids == want.tokens
    for step in range(3):
        finite = np.isfinite(want.logits[step].numpy())
        assert np.abs(calls[step][0] - want.logits[step].numpy())[finite].max() <= ATOL
