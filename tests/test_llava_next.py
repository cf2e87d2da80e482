"""LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf's form: Mistral, CLIP tiles with image_grid_pinpoints, image_newline,
a token count that depends on the image size) on a tiny random-weight model.

- tiling bit-identical to transformers' LlavaNextImageProcessor, token counts equal to LlavaNextProcessor's;
- export, `verify` (a left-padded batch whose images take different numbers of positions), greedy tokens identical
  to transformers' generate, also with two images in one prompt;
- CLVA + SEVI against the independent reference (whose image features come from transformers' own packing), flags
  on and off, off exactly the plain graph; IAVA's sets over every image position, newlines included.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from anchorrt.runtime.pipeline import Pipeline, Request

PROMPTS = ["What is in the image? Describe the content of the image.", "Count."]
ATOL = 1e-4


@pytest.fixture(scope="session")
def next_model(tmp_path_factory):
    from anchorrt.exporter.testing import TinyNextSpec, build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("models") / "tiny-next", TinyNextSpec())


@pytest.fixture(scope="session")
def next_artifact(next_model, tmp_path_factory):
    from anchorrt.exporter.export import export_model

    out = tmp_path_factory.mktemp("artifacts") / "next"
    export_model(next_model, out)
    return out


@pytest.fixture(scope="module")
def next_baked(next_artifact, tmp_path_factory):
    from anchorrt.graph_passes.bake import BakeOptions, bake

    out = tmp_path_factory.mktemp("next") / "baked"
    shutil.copytree(next_artifact, out)
    bake(out, "clva,sevi,probe", BakeOptions(sevi_start_layer=2, debug_outputs=True))
    return out


@pytest.fixture(scope="module")
def hf(next_model):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(next_model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(next_model)
    processor.tokenizer.padding_side = "left"
    return model, processor


def sized_images():
    from PIL import Image

    rng = np.random.default_rng(2)
    sizes = [(40, 50), (64, 30), (33, 33), (20, 100), (100, 23), (7, 7), (300, 200)]  # (height, width)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def hf_generate(hf, images_per_prompt, texts, max_new_tokens=6):
    model, processor = hf
    inputs = processor(images=images_per_prompt, text=texts, return_tensors="pt", padding=True)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    rows = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        rows.append(row[:cut])
    return rows


def test_tiling_is_bit_identical_and_counts_match(next_artifact, hf):
    pipe = Pipeline.from_dir(next_artifact)
    processor = hf[1]
    counts = set()
    for img in sized_images():
        visual = pipe.preprocess_images([img])
        want = processor.image_processor(images=[img], return_tensors="np")
        assert np.array_equal(visual.feeds["pixel_values"], want["pixel_values"][0]), img.size
        ids = processor(images=[img], text=["<image>"], return_tensors="np")["input_ids"][0]
        n = int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
        assert visual.tokens_per_image == [n], img.size
        counts.add(n)
    assert len(counts) >= 4  # the count really depends on the size


def test_manifest_and_verify(next_model, next_artifact):
    from anchorrt.exporter.verify import random_images, verify

    m = json.loads((next_artifact / "manifest.json").read_text())
    assert m["model_type"] == "llava_next" and m["llava_next"]["patches_per_side"] == 4
    assert m["preprocessing"]["image_grid_pinpoints"] == m["llava_next"]["image_grid_pinpoints"]
    images = [random_images(1, seed=3)[0].resize((50, 30)), random_images(1, seed=4)[0].resize((20, 70))]
    report = verify(next_model, next_artifact, images=images, prompts=PROMPTS)
    assert report.ok and report.max_abs_diff <= ATOL, report.summary()


def test_greedy_tokens_match_transformers(next_artifact, hf):
    pipe = Pipeline.from_dir(next_artifact)
    template = pipe.manifest.prompt["template"]
    imgs = sized_images()
    want = hf_generate(hf, [[imgs[0]], [imgs[3]]], [template.replace("{prompt}", p) for p in PROMPTS])
    got = pipe.generate_batch([Request(imgs[0], PROMPTS[0]), Request(imgs[3], PROMPTS[1])], max_new_tokens=6)
    assert [g.token_ids for g in got] == want
    sep = pipe.manifest.prompt["image_separator"]
    assert sep == "\n"
    two = template.replace("<image>", "<image>" + sep + "<image>")
    want = hf_generate(hf, [[imgs[1], imgs[4]]], [two.replace("{prompt}", PROMPTS[0])])
    got = pipe.generate([imgs[1], imgs[4]], PROMPTS[0], max_new_tokens=6)
    assert got.token_ids == want[0]


def test_clva_sevi_match_the_reference_with_newlines_in_v(next_baked, next_artifact, next_model, hf):
    from anchorrt.exporter.reference import ReferenceLlava

    pipe, plain = Pipeline.from_dir(next_baked), Pipeline.from_dir(next_artifact)
    ref = ReferenceLlava.from_pretrained(next_model)
    processor = hf[1]
    imgs = sized_images()
    pil = [imgs[0], imgs[4]]
    template = pipe.manifest.prompt["template"]
    inputs = processor(images=pil, text=[template.replace("{prompt}", p) for p in PROMPTS], return_tensors="pt",
                       padding=True)
    visual = pipe.preprocess_images(pil)
    enc = [pipe.prompts.encode(p, tokens_per_image=[n]) for p, n in zip(PROMPTS, visual.tokens_per_image)]
    for k, e in enumerate(enc):
        e.images = [k]
    batch = pipe._pad(enc, visual)
    assert np.array_equal(batch.ids, inputs["input_ids"].numpy())
    features = pipe.encode_images(visual)
    spec = {"clva": {"alpha": 14.0, "beta": 0.9, "tau": 0.5, "lambda": 0.0}, "sevi": {"omega": 0.5, "kappa": 0.2}}
    clva = [{"alpha": 14.0, "beta": 0.9, "tau": 0.5, "lam": 0.0}, None]
    sevi = [{"omega": 0.5, "kappa": 0.2, "start_layer": 2}, None]
    caches = [p._new_cache(2, batch.ids.shape[1] + 4) for p in (pipe, plain)]
    extra = pipe._extra_inputs(batch, [spec, None])
    logits = pipe.prefill(batch, features, caches[0], extra)
    plain_logits = plain.prefill(batch, plain.encode_images(visual), caches[1], plain._extra_inputs(batch))
    r = ref.forward(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], clva=clva, sevi=sevi,
                    image_sizes=inputs["image_sizes"])
    mask, last = batch.attention_mask, batch.attention_mask.sum(-1) - 1
    effect = 0.0
    for step in range(4):
        assert np.abs(logits - r.logits[:, -1].numpy()).max() <= ATOL, step
        assert np.array_equal(logits[1], plain_logits[1]), "flags off must be exactly the plain graph"
        effect = max(effect, float(np.abs(logits[0] - plain_logits[0]).max()))
        if step == 3:
            break
        tok = r.logits[:, -1].argmax(-1)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        last = last + 1
        logits = pipe.decode_one_token(tok.numpy().astype(np.int64), mask, last, caches[0], extra)
        plain_logits = plain.decode_one_token(tok.numpy().astype(np.int64), mask, last, caches[1],
                                              plain._extra_inputs(batch))
        r = ref.forward(tok[:, None], None, torch.tensor(mask), cache=r.cache, clva=clva, sevi=sevi)
    assert effect > 1e-3


def test_iava_runs_over_every_image_position(next_baked, next_model):
    from anchorrt.exporter.reference.iava import ReferenceIava

    pipe = Pipeline.from_dir(next_baked)
    img = sized_images()[1]
    got = pipe.generate(img, PROMPTS[1], max_new_tokens=8, mitigation={"iava": {"i": 6}})
    n = pipe.preprocess_images([img]).tokens_per_image[0]
    assert len(got.details["iava"]["att_query"]) == n  # V includes the newline positions
    want = ReferenceIava(next_model).generate(img, PROMPTS[1], pipe.manifest.prompt["template"], i=6,
                                              max_new_tokens=8)
    assert got.details["iava"]["irrelevant"] == want.irrelevant
    assert got.token_ids == want.tokens


# -- unsupported forms: one line naming what is supported, before any weights load ----------------------------------
def _never_load(monkeypatch):
    from anchorrt.exporter.archs.llava import LlavaArch

    def boom(self, checkpoint, dtype):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(LlavaArch, "_load", boom)


@pytest.mark.parametrize("config,fragment", [
    ({"architectures": ["LlavaNextVideoForConditionalGeneration"], "model_type": "llava_next_video"},
     "architecture 'LlavaNextVideoForConditionalGeneration' is not supported; supported: "),
    ({"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen",
      "auto_map": {"AutoModelForCausalLM": "modeling_llava_qwen.LlavaQwenForCausalLM"}},
     "architecture 'LlavaQwenForCausalLM' is not supported; supported: "),
])
def test_unsupported_architectures_are_refused_in_one_line(tmp_path, monkeypatch, config, fragment):
    from anchorrt.exporter.export import export_model
    from anchorrt.runtime.errors import CheckpointError

    _never_load(monkeypatch)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        export_model(tmp_path / "m", tmp_path / "out")
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg
    assert "LlavaForConditionalGeneration" in msg and "LlavaNextForConditionalGeneration" in msg
    assert not (tmp_path / "out").exists()


def test_unknown_image_processor_and_bad_next_options_refused_before_weights(next_model, tmp_path, monkeypatch):
    from anchorrt.exporter.export import export_model
    from anchorrt.runtime.errors import CheckpointError

    _never_load(monkeypatch)
    model = tmp_path / "m"
    shutil.copytree(next_model, model)
    proc = model / "processor_config.json"
    data = json.loads(proc.read_text())
    data["image_processor"]["image_processor_type"] = "Idefics3ImageProcessor"
    proc.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"image_processor_type 'Idefics3ImageProcessor' is not supported; "
                                              r"AnchorRT supports .*LlavaNextImageProcessor.*SiglipImageProcessor"):
        export_model(model, tmp_path / "out")
    shutil.copyfile(next_model / "processor_config.json", proc)
    cfg = json.loads((model / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "full"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vision_feature_select_strategy 'full' is not supported"):
        export_model(model, tmp_path / "out")


def test_forged_runtime_fields_are_refused(next_artifact, tiny_artifact, tmp_path):
    from anchorrt.runtime.errors import ArtifactError

    for source, edit, fragment in (
        (next_artifact, lambda d: d["llava_next"].update(patches_per_side=5), "manifest fields llava_next"),
        (next_artifact, lambda d: d["llava_next"].update(image_grid_pinpoints=[[33, 64]]), "manifest fields llava_next"),
        (tiny_artifact, lambda d: d.update(model_type="qwen9"),
         "model_type 'qwen9' has no runtime module (supported: instructblip, llava, llava_next, "),
    ):
        folder = tmp_path / f"a{len(list(tmp_path.iterdir()))}"
        shutil.copytree(source, folder)
        data = json.loads((folder / "manifest.json").read_text())
        edit(data)
        (folder / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(ArtifactError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as err:
            Pipeline.from_dir(folder, verify=False)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_vicuna_form_exports_and_verifies(tmp_path):
    """llava-hf/llava-v1.6-vicuna-7b-hf's form: the same tiling over a Llama language model and LLaVA-1.5's chat
    format (slow: one more export)."""
    from anchorrt.exporter.export import export_model
    from anchorrt.exporter.testing import TinyNextSpec, build_tiny_llava_next
    from anchorrt.exporter.verify import verify

    model = build_tiny_llava_next(tmp_path / "vicuna", TinyNextSpec(text_model="llama", seed=7))
    export_model(model, tmp_path / "art")
    assert json.loads((model / "config.json").read_text())["text_config"]["model_type"] == "llama"
    report = verify(model, tmp_path / "art", prompts=PROMPTS)
    assert report.ok, report.summary()
