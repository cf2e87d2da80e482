"""InstructBLIP (issue 16): export, preprocessing, the Q-Former graph, CLVA in the Q-Former vs the independent
reference (exporter/reference/instructblip_reference.py), refusals. One tiny export shared (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from anchorrt.runtime.errors import CheckpointError

PROMPTS = ["Is there a dog in the image?", "What is in the image? Describe the content of the image."]


@pytest.fixture(scope="module")
def hf(tiny_instructblip):
    from transformers import AutoProcessor, InstructBlipForConditionalGeneration

    model = InstructBlipForConditionalGeneration.from_pretrained(tiny_instructblip, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_instructblip)


@pytest.fixture(scope="module")
def pictures():
    from PIL import Image

    rs = np.random.RandomState(3)
    return [Image.fromarray((rs.rand(h, w, 3) * 255).astype("uint8")) for h, w in ((40, 57), (32, 32), (90, 23))]


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _qformer_feeds(model, inputs):
    with torch.no_grad():
        embeds = model.vision_model(inputs["pixel_values"]).last_hidden_state.numpy()
    return {"image_embeds": embeds, "qformer_input_ids": inputs["qformer_input_ids"].numpy(),
            "qformer_attention_mask": inputs["qformer_attention_mask"].numpy()}


def _clva_feeds(enable, n, **values):
    feeds = {"clva.enable": np.asarray(enable, dtype=bool)}
    for key, default in (("alpha", 14.0), ("beta", 0.9), ("tau", 2.0), ("lambda", 1.0)):
        feeds[f"clva.{key}"] = np.full(n, values.get(key, default), np.float32)
    return feeds


def test_manifest_and_files(instructblip_artifact):
    data = json.loads((instructblip_artifact / "manifest.json").read_text())
    assert data["model_type"] == "instructblip"
    assert set(data["graphs"]) == {"vision", "qformer", "embed", "decoder"}
    assert data["tokens"]["tokens_per_image"] == 32
    info = data["instructblip"]
    assert info["cross_attention_layers"] == [0, 2] and info["image_tokens"] == 17
    assert (instructblip_artifact / info["qformer_tokenizer"]).is_file()
    assert "qformer.onnx" in data["files"] and info["qformer_tokenizer"] in data["files"]
    assert data["preprocessing"]["resize_to"] == [32, 32] and data["preprocessing"]["do_center_crop"] is False
    assert "resize_exact" not in data["preprocessing"]  # the older name is read (runtime/preprocess.py), not written


def test_preprocessing_bit_identical(instructblip_artifact, hf, pictures):
    from anchorrt.runtime.manifest import Manifest
    from anchorrt.runtime.preprocess import ImagePreprocessor

    _, processor = hf
    pre = ImagePreprocessor(Manifest.load(instructblip_artifact).preprocessing)
    for picture in pictures:  # non-square sizes: BLIP squashes to 32 x 32, no crop
        expected = processor.image_processor(picture, return_tensors="np")["pixel_values"]
        assert np.array_equal(pre([picture]), expected)


def test_vision_and_qformer_graphs_match_transformers(instructblip_artifact, hf, pictures):
    model, processor = hf
    inputs = processor(images=pictures[:2], text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.get_image_features(inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"],
                                            qformer_attention_mask=inputs["qformer_attention_mask"],
                                            return_dict=True).pooler_output.numpy()
    embeds = _session(instructblip_artifact / "vision.onnx").run(None, {"pixel_values": inputs["pixel_values"].numpy()})[0]
    feeds = {"image_embeds": embeds, "qformer_input_ids": inputs["qformer_input_ids"].numpy(),
             "qformer_attention_mask": inputs["qformer_attention_mask"].numpy()}
    got = _session(instructblip_artifact / "qformer.onnx").run(None, feeds)[0]
    assert got.shape == (2, 32, 64)
    assert np.abs(got - expected).max() <= 1e-4
    assert expected[0].std(0).mean() > 1e-2  # random query tokens: the 32 outputs differ (FIELD-NOTES)


def test_reference_qformer_matches_transformers(hf, pictures):
    from anchorrt.exporter.reference.instructblip_reference import ImageInputs, ReferenceInstructBlip

    model, processor = hf
    inputs = processor(images=pictures[:2], text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.get_image_features(inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"],
                                            qformer_attention_mask=inputs["qformer_attention_mask"],
                                            return_dict=True).pooler_output
    ref = ReferenceInstructBlip(model)
    got = ref.image_features(ImageInputs(inputs["pixel_values"], inputs["qformer_input_ids"],
                                         inputs["qformer_attention_mask"]))
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("values", [{}, {"tau": 0.5, "lambda": 0.3}, {"tau": 0.2, "lambda": 0.0, "beta": 2.0},
                                    {"alpha": 3.0, "tau": 1.0, "lambda": 0.5}])
def test_clva_in_qformer_vs_reference(instructblip_artifact, instructblip_baked, hf, pictures, values):
    """Baked qformer graph vs the reference's own Q-Former forward with CLVA; image 1 off stays unbaked exactly."""
    from anchorrt.exporter.reference.instructblip_reference import ImageInputs, QFormerClva, ReferenceInstructBlip

    model, processor = hf
    inputs = processor(images=pictures[:2], text=PROMPTS, return_tensors="pt", padding=True)
    feeds = _qformer_feeds(model, inputs)
    base = _session(instructblip_artifact / "qformer.onnx").run(None, feeds)[0]
    baked = _session(instructblip_baked / "qformer.onnx")
    got = baked.run(None, {**feeds, **_clva_feeds([True, False], 2, **values)})[0]
    clva = QFormerClva(alpha=values.get("alpha", 14.0), beta=values.get("beta", 0.9), tau=values.get("tau", 2.0),
                       lam=values.get("lambda", 1.0))
    ref = ReferenceInstructBlip(model)
    expected = ref.image_features(ImageInputs(inputs["pixel_values"], inputs["qformer_input_ids"],
                                              inputs["qformer_attention_mask"], [clva, None])).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    assert np.array_equal(got[1], base[1])  # the image with the flag off: the unbaked graph exactly
    debug = ref.last_qformer_debug
    if int(debug["zpos"][0].sum()) + int(debug["zneg"][0].sum()) > 0:  # the method did something on image 0
        assert np.abs(got[0] - base[0]).max() > 1e-3


def test_clva_flags_off_bit_identical(instructblip_artifact, instructblip_baked, hf, pictures):
    model, processor = hf
    inputs = processor(images=pictures, text=PROMPTS + ["How many objects are there?"], return_tensors="pt",
                       padding=True)
    feeds = _qformer_feeds(model, inputs)
    base = _session(instructblip_artifact / "qformer.onnx").run(None, feeds)[0]
    off = _session(instructblip_baked / "qformer.onnx").run(None, {**feeds, **_clva_feeds([False] * 3, 3)})[0]
    assert np.array_equal(off, base)


def test_clva_layer_choices(instructblip_artifact, tmp_path):
    from anchorrt.graph_passes.bake import BakeOptions, bake
    from anchorrt.graph_passes.base import PassError
    from anchorrt.graph_passes.clva_qformer import resolve_qformer_layers

    real = resolve_qformer_layers(12, [0, 2, 4, 6, 8, 10])  # instructblip-vicuna-7b's Q-Former
    assert (real.l_neg, real.l_pos, real.drift_layers) == (0, 4, (6, 8, 10))
    with pytest.raises(PassError, match="not a Q-Former cross-attention layer"):
        resolve_qformer_layers(12, [0, 2, 4, 6, 8, 10], l_pos=3)
    with pytest.raises(PassError, match="after both anchor layers"):
        resolve_qformer_layers(12, [0, 2, 4, 6, 8, 10], l_pos=6, drift_layers=[4])
    out = tmp_path / "art"
    shutil.copytree(instructblip_artifact, out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(PassError, match="drift layers"):
        bake(out, "clva", BakeOptions(clva_l_pos=2))  # the last cross-attention layer leaves nothing to re-weight
    assert sorted(p.name for p in out.iterdir()) == before  # refused before anything was written


def test_baked_manifest_records_qformer_clva(instructblip_baked):
    data = json.loads((instructblip_baked / "manifest.json").read_text())
    clva = data["mitigation"]["clva"]
    assert clva["graph"] == "qformer" and clva["layers"]["drift_layers"] == [2]
    assert clva["inputs"]["clva.enable"]["shape"] == ["num_images"]
    qformer_inputs = {i["name"] for i in data["graphs"]["qformer"]["inputs"]}
    decoder_inputs = {i["name"] for i in data["graphs"]["decoder"]["inputs"]}
    assert "clva.enable" in qformer_inputs and "clva.enable" not in decoder_inputs
    assert "sevi.enable" in decoder_inputs and data["mitigation"]["sevi"].get("graph", "decoder") == "decoder"


def test_flan_t5_refused_before_weights_load(tiny_instructblip, tmp_path):
    from anchorrt.exporter.export import export_model

    bad = tmp_path / "instructblip-flan-t5"
    shutil.copytree(tiny_instructblip, bad)
    config = json.loads((bad / "config.json").read_text())
    config["text_config"] = {"model_type": "t5", "d_model": 64}
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="Flan-T5") as err:
        export_model(bad, out)
    assert "\n" not in str(err.value)
    assert not out.exists()


def _qformer_with_clva(artifact):
    import onnx_ir as ir
    from anchorrt.graph_passes.clva_qformer import QFormerClvaPass
    from anchorrt.graph_passes.naming import AssignNodeNames
    from anchorrt.graph_passes.pipeline import run_on_model

    info = json.loads((artifact / "manifest.json").read_text())["instructblip"]
    model = ir.load(artifact / "qformer.onnx")
    p = QFormerClvaPass(info["qformer_layers"], info["cross_attention_layers"], info["image_tokens"])
    run_on_model(model, [AssignNodeNames(), p])
    assert p.count > 0
    return model


def test_qformer_clva_pass_types_every_value(instructblip_artifact):
    """Issue 13 item 10's rule for the Q-Former CLVA pass (tests/test_shape_inference.py for the decoder passes):
    every value it creates has a dtype and a shape (the pass ends with shapes.annotate_missing)."""
    model = _qformer_with_clva(instructblip_artifact)
    untyped = [f"{g.name}:{v.name}" for g in model.graphs() for v in [*g.inputs, *(o for n in g for o in n.outputs)]
               if v.dtype is None or v.shape is None]
    assert untyped == []


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "found at the h16/main merge, not investigated: onnxruntime's symbolic_shape_infer (auto_merge) asserts in "
    "_add_suggested_merge on dims [17, '17'] in the Q-Former with CLVA baked (the unbaked qformer graph passes); "
    "strict: this fails once it is fixed, to turn the check on"))
def test_qformer_clva_symbolic_shape_inference(instructblip_artifact):
    import onnx_ir as ir
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = _qformer_with_clva(instructblip_artifact)
    SymbolicShapeInference.infer_shapes(ir.serde.serialize_model(model), auto_merge=True, guess_output_rank=False)


def test_pre_load_check_config(tiny_instructblip, tmp_path, monkeypatch):
    """issue 13's pre-load hook (exporter/registry.check_config) runs InstructBLIP's check: Flan-T5 and a foreign
    image processor are refused from the config files alone; CLVA is routed to the Q-Former, so a CLVA layer
    choice that names a Q-Former layer is not checked against the decoder before loading."""
    from anchorrt.exporter.archs.instructblip import InstructBlipArch
    from anchorrt.exporter.export import export_model
    from anchorrt.exporter.registry import check_config
    from anchorrt.graph_passes.bake import BakeOptions

    config = json.loads((tiny_instructblip / "config.json").read_text())
    facts = check_config("InstructBlipForConditionalGeneration", config, tiny_instructblip)
    assert facts == {"num_layers": 8, "method_graphs": {"clva": "qformer"}}
    t5 = dict(config, text_config={"model_type": "t5", "d_model": 64})
    with pytest.raises(CheckpointError, match="Flan-T5"):
        check_config("InstructBlipForConditionalGeneration", t5, tiny_instructblip)
    bad = tmp_path / "foreign-processor"
    bad.mkdir()
    (bad / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "DonutImageProcessor"}))
    with pytest.raises(CheckpointError, match="DonutImageProcessor"):
        check_config("InstructBlipForConditionalGeneration", config, bad)
    # the loader replaced by one that fails: the Flan-T5 refusal shows the check ran before any weight was read
    def loader(self, *args, **kwargs):
        raise AssertionError("the export reached the weight loader")

    monkeypatch.setattr(InstructBlipArch, "__init__", loader)
    flan = tmp_path / "flan-t5"
    shutil.copytree(tiny_instructblip, flan)
    (flan / "config.json").write_text(json.dumps(t5))
    with pytest.raises(CheckpointError, match="Flan-T5"):
        export_model(flan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(AssertionError, match="weight loader"):  # the control: a good config reaches the loader
        export_model(tiny_instructblip, tmp_path / "out", mitigation="clva,sevi",
                     bake_options=BakeOptions(clva_l_pos=2, sevi_start_layer=4))


@pytest.mark.parametrize("forge,fragment", [
    (lambda d: d["instructblip"].update(qformer_tokenizer="../tokenizer.json"), "plain file name"),
    (lambda d: d["instructblip"].pop("qformer_tokenizer"), "lacks its 'instructblip' fields"),
    (lambda d: d["mitigation"].update(clva={"graph": "nowhere", "inputs": {}, "parameters": {}, "layers": {}}),
     "mitigation.clva.graph"),
])
def test_forged_manifest_refused(instructblip_artifact, tmp_path, forge, fragment):
    from anchorrt.runtime.errors import ArtifactError
    from anchorrt.runtime.manifest import write_manifest
    from anchorrt.runtime.pipeline import Pipeline

    art = tmp_path / "art"
    shutil.copytree(instructblip_artifact, art)
    data = json.loads((art / "manifest.json").read_text())
    forge(data)
    write_manifest(art, {k: v for k, v in data.items() if k != "files"})
    with pytest.raises(ArtifactError, match=fragment.replace("(", r"\(")) as err:
        Pipeline.from_dir(art)
    assert "\n" not in str(err.value)
