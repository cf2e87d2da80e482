"""ONNX artifacts vs transformers: logits (prefill + 5 decode steps) and greedy tokens, on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anchorrt.exporter.verify import verify
from anchorrt.runtime.pipeline import Pipeline, Request

PROMPTS = [
    "What is in the image?",
    "Is there a dog in the picture? Describe the content of the image.",
    "Count.",
]
ATOL = 1e-4  # fp32 logits


def hf_generate(model_dir, images, prompts, template, max_new_tokens=16):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    inputs = proc(images=images, text=[template.replace("{prompt}", p) for p in prompts], return_tensors="pt",
                  padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    trimmed = []
    for row in new:  # transformers pads finished rows; keep up to and including the first stop token
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        trimmed.append(row[:cut])
    return trimmed


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one-by-one"])
def test_logits_match_transformers(tiny_model, tiny_artifact, images, batch):
    report = verify(tiny_model, tiny_artifact, images=images, prompts=PROMPTS, steps=5, atol=ATOL, batch=batch)
    assert len(report.per_step_max_abs_diff) == 6  # prefill + 5 decode steps
    assert report.max_abs_diff <= ATOL, report.summary()
    assert report.greedy_agreement == 1.0, report.summary()


def test_logits_match_transformers_gqa_opset23(gqa_model, gqa_artifact, images):
    report = verify(gqa_model, gqa_artifact, images=images, prompts=PROMPTS, steps=5, atol=ATOL)
    assert report.max_abs_diff <= ATOL, report.summary()
    assert report.greedy_agreement == 1.0


def test_verify_detects_a_wrong_model(tiny_model, gqa_artifact, images, tmp_path):
    """The parity check can fail: the GQA artifact against the MHA checkpoint's weights must not pass."""
    from anchorrt.exporter.testing import TinyLlavaSpec, build_tiny_llava

    other = build_tiny_llava(tmp_path / "other", TinyLlavaSpec(kv_heads=2, seed=7, vision_feature_select_strategy="full",
                                                                vision_feature_layer=-1))
    report = verify(other, gqa_artifact, images=images[:2], prompts=PROMPTS[:2], steps=2, atol=ATOL)
    assert not report.ok and report.max_abs_diff > 1e-2


@pytest.mark.parametrize("artifact,model", [("tiny_artifact", "tiny_model"), ("gqa_artifact", "gqa_model")])
def test_greedy_tokens_identical(request, artifact, model, images):
    art, mdir = request.getfixturevalue(artifact), request.getfixturevalue(model)
    pipe = Pipeline.from_dir(art)
    template = pipe.manifest.prompt["template"]
    # three single prompts, then a batch of 2 with different prompt lengths (left padding)
    for img, prompt in zip(images, PROMPTS):
        got = pipe.generate(img, prompt, max_new_tokens=16).token_ids
        assert got == hf_generate(mdir, [img], [prompt], template)[0]
    got = [g.token_ids for g in pipe.generate_batch([Request(images[0], PROMPTS[0]), Request(images[1], PROMPTS[1])],
                                                     max_new_tokens=16)]
    assert got == hf_generate(mdir, images[:2], PROMPTS[:2], template)
    assert len(got[0]) > 1 and got[0] != got[1]  # not a degenerate constant output


def test_kv_cache_holds_what_the_graph_returns(tiny_artifact, images):
    """The cache (in place for the fused form, ping-pong for the unfused one) must hold exactly the present tensors
    of a plain (non-IOBinding) decoder run."""
    pipe = Pipeline.from_dir(tiny_artifact)
    enc = pipe.prompts.encode(PROMPTS[0])
    batch = pipe._pad([enc])
    feats = pipe.encode_images(pipe.preprocess([images[0]]))
    cache = pipe._new_cache(1, 64)
    pipe.prefill(batch, feats, cache, {})
    embeds = pipe._embed(batch.ids, feats, batch.image_mask)
    n = pipe.num_layers
    feed = {"inputs_embeds": embeds, "attention_mask": batch.attention_mask,
            "position_ids": np.arange(batch.ids.shape[1])[None]}
    for i in range(n):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, pipe.kv_heads, 0, pipe.head_dim), np.float32)
    plain = pipe.decoder.run(feed)
    for layer in (0, n - 1):
        k, v = cache.layer(layer)
        np.testing.assert_array_equal(k, plain[f"present.{layer}.key"])
        np.testing.assert_array_equal(v, plain[f"present.{layer}.value"])


def test_generated_image_token_stays_text(tiny_artifact, images):
    """A generated token whose id is the image token's is embedded as text, never as image features."""
    pipe = Pipeline.from_dir(tiny_artifact)
    img_id = pipe.manifest.tokens["image_token_id"]
    ids = np.array([[img_id]], dtype=np.int64)
    no_images = np.zeros((0, pipe.tokens_per_image, pipe.hidden), np.float32)
    text_embed = pipe._embed(ids, no_images, np.zeros((1, 1), bool))
    feats = pipe.encode_images(pipe.preprocess([images[0]]))  # [T, d]: flat, in image-position order
    as_image = pipe._embed(np.full((1, pipe.tokens_per_image), img_id), feats, np.ones((1, pipe.tokens_per_image), bool))
    np.testing.assert_allclose(as_image[0], feats, atol=0)
    assert not np.allclose(text_embed[0, 0], feats[0])
