"""`anchorrt explain` (issue 20): the debug-output pass, the numbers in explain.json against the independent PyTorch
reference (exporter/reference), the files it writes, and its one-line errors.

Both tiny fixtures: MHA at opset 18 (the plain export: explain bakes CLVA into its copy) and GQA at opset 23 (the
`Attention` op: the pass recomputes the rows; "full" CLIP features: a class token + 4x4 grid). The reference runs
the same prompt and pixels with CLVA at l_pos = each layer 0..L-2 (every layer it accepts as an anchor layer): its
Phi of that layer and its head sets must equal explain.json's. The random tiny model's attention is nearly uniform,
so lam = 0.5 and tau = 0.5 (non-empty head sets), as test_mitigation_parity does with its own values.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

PROMPT = "What is in the image? Describe the content of the image."
LAM, TAU = 0.5, 0.5
BAND = 1e-6  # METHODS.md step 7: a decision whose statistic lies this close to its threshold is excused


@pytest.fixture(scope="module", params=["mha18", "gqa23"])
def explained(request, tmp_path_factory, images):
    pytest.importorskip("matplotlib")
    from anchorrt.graph_passes.bake import BakeOptions
    from anchorrt.graph_passes.explain import explained_copy
    from anchorrt.runtime.explain import explain
    from anchorrt.runtime.pipeline import Pipeline

    art = request.getfixturevalue("tiny_artifact" if request.param == "mha18" else "gqa_artifact")
    model = request.getfixturevalue("tiny_model" if request.param == "mha18" else "gqa_model")
    work = tmp_path_factory.mktemp(f"explain-{request.param}")
    image = work / "image.png"
    images[0].save(image)
    copy = explained_copy(art, BakeOptions(debug_outputs=True))  # the graph's own CLVA head sets and anchors too
    try:
        pipe = Pipeline.from_dir(copy, verify=False)
        layers = pipe.manifest.mitigation["clva"]["layers"]
        report = explain(copy, image, PROMPT, work / "out", mitigation={"clva": {"lambda": LAM, "tau": TAU}},
                         layers=layers, max_new_tokens=4, pipe=pipe)
        pixels = pipe.preprocess([pipe._load(str(image), 0)])
        ids = np.array([pipe.prompts.encode(PROMPT).ids], dtype=np.int64)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return {"report": report, "out": work / "out", "model": model, "pixels": pixels, "ids": ids,
            "name": request.param, "artifact": art}


def _close_to_threshold(phi: np.ndarray, lam: float) -> np.ndarray:
    mu, sigma = phi.mean(), phi.std()
    return (np.abs(phi - (mu + lam * sigma)) < BAND) | (np.abs(phi - (mu - lam * sigma)) < BAND)


def test_explain_writes_every_file_with_its_content(explained):
    from anchorrt.runtime.explain import FILES
    from PIL import Image

    out, report = explained["out"], explained["report"]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    for name in FILES[:4]:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 400, name
            px = np.asarray(im.convert("L"), dtype=np.float64)
            assert px.std() > 10, f"{name} is (nearly) blank"
    data = json.loads((out / "explain.json").read_text())
    assert data == report
    L, H = data["layers"]["num_layers"], data["layers"]["num_heads"]
    assert (L, H) == (8, 8) and data["prompt"] == PROMPT
    assert data["thresholds"] == {"lam": LAM, "tau": TAU}
    for side in ("off", "on"):
        d = data[side]
        assert np.asarray(d["phi"]).shape == (L, H)
        assert all(len(d[k]) == L for k in ("entropy_all_heads", "pearson_neg", "pearson_pos", "map_all_heads",
                                            "sensitive_heads", "insensitive_heads"))
        assert all(len(m) == data["image_tokens"]["count"] for m in d["map_all_heads"])
        # Each layer's map is the last row's mass on the image, between 0 and 1.
        assert all(0 < sum(m) <= 1 + 1e-6 for m in d["map_all_heads"])
    grid = data["image_tokens"]
    assert grid["rows"] * grid["cols"] + grid["skip"] == grid["count"]
    assert grid["skip"] == (1 if explained["name"] == "gqa23" else 0)  # the class token of "full" features
    # The copy's CLVA (baked with debug outputs) computed the same head sets and anchors in the graph.
    assert data["graph_check"] == {"sensitive_heads_equal": True, "insensitive_heads_equal": True, "zpos_equal": True,
                                   "zneg_equal": True}
    assert set(data["answers"]) == {"off", "on"} and all(isinstance(a["text"], str) for a in data["answers"].values())
    s = data["suggestion"]
    assert "one forward pass" in s["basis"] and s["reason"]
    if s["l_pos"] is not None:
        assert 1 <= s["l_pos"] <= L - 2 and all(s["l_pos"] < x < L for x in s["drift_layers"])


def test_mitigation_on_changes_only_the_drift_layers(explained):
    """CLVA edits the drift layers' T rows; the anchor layers (and any layer before the first drift layer) read
    unedited attention, so their numbers are the same with CLVA on, and some drift layer's map moves."""
    d = explained["report"]
    drift = d["layers"]["drift_layers"]
    off, on = np.asarray(d["off"]["phi"]), np.asarray(d["on"]["phi"])
    np.testing.assert_allclose(on[:min(drift)], off[:min(drift)], rtol=0, atol=1e-6)
    moved = max(np.abs(np.asarray(d["on"]["map_all_heads"][x]) - np.asarray(d["off"]["map_all_heads"][x])).max()
                for x in drift)
    has_anchor = bool(d["off"]["zpos"] or d["off"]["zneg"])
    assert moved > 1e-4 if has_anchor else moved < 1e-6


def test_phi_and_head_sets_equal_the_pytorch_reference(explained):
    torch = pytest.importorskip("torch")
    from anchorrt.exporter.reference import ReferenceLlava

    ref = ReferenceLlava.from_pretrained(explained["model"])
    d = explained["report"]
    L = d["layers"]["num_layers"]
    ids, pixels = torch.tensor(explained["ids"]), torch.tensor(explained["pixels"])
    phi_json = np.asarray(d["off"]["phi"])
    lam, tau = float(np.float32(LAM)), float(np.float32(TAU))
    checked = nonempty = 0
    for layer in range(L - 1):  # the reference takes l_pos in 0..L-2 (a drift layer must follow)
        r = ref.forward(ids, pixels, clva={"lam": lam, "tau": tau, "l_neg": layer, "l_pos": layer,
                                           "drift_layers": [L - 1]})
        dbg = r.debug["clva"]
        phi_ref = dbg["phi_pos"][0].numpy()  # float64 [H]
        np.testing.assert_allclose(phi_json[layer], phi_ref, rtol=0, atol=2e-6, err_msg=f"Phi of layer {layer}")
        excused = _close_to_threshold(phi_ref, lam)
        for key, ref_key in (("sensitive_heads", "sensitive_heads"), ("insensitive_heads", "insensitive_heads")):
            mine = np.zeros(phi_ref.shape, bool)
            mine[d["off"][key][layer]] = True
            theirs = dbg[ref_key][0].numpy()
            assert (mine == theirs)[~excused].all(), f"{key} of layer {layer}: {mine} vs reference {theirs}"
        checked += 1
        nonempty += int(dbg["sensitive_heads"][0].any()) + int(dbg["insensitive_heads"][0].any())
    assert checked == L - 1 and nonempty >= 4  # the head sets compared are not all empty
    # The anchors of the artifact's own choice (l_neg, l_pos) against the reference's masks.
    lay = d["layers"]
    r = ref.forward(ids, pixels, clva={"lam": lam, "tau": tau, "l_neg": lay["l_neg"], "l_pos": lay["l_pos"],
                                       "drift_layers": lay["drift_layers"]})
    visual = np.flatnonzero(r.debug["visual_mask"][0].numpy())
    for key in ("zpos", "zneg"):
        assert np.flatnonzero(r.debug["clva"][key][0].numpy()[visual]).tolist() == d["off"][key], key


def test_pass_counts_layers_and_leaves_graphs_without_attention_alone(baked_artifact):
    import onnx_ir as ir
    from anchorrt.graph_passes.explain import ATTENTION, ExplainPass

    decoder = ir.load(baked_artifact / "decoder.onnx")
    p = ExplainPass()
    assert p(decoder).modified and p.count == 8
    out = next(v for v in decoder.graph.outputs if v.name == ATTENTION)
    assert list(out.shape)[1:3] == [8, 8]  # [batch, layers, heads, rows, keys]
    embed = ir.load(baked_artifact / "embed.onnx")  # a near miss: a graph of the artifact with no attention
    p = ExplainPass()
    assert not p(embed).modified and p.count == 0
    assert all(v.name != ATTENTION for v in embed.graph.outputs)


def test_pass_on_a_graph_without_visual_mask_is_refused(tiny_artifact):
    import onnx_ir as ir
    from anchorrt.graph_passes.base import PassError
    from anchorrt.graph_passes.explain import ExplainPass

    model = ir.load(tiny_artifact / "decoder.onnx")
    with pytest.raises(PassError, match="bake CLVA or SEVI before"):
        ExplainPass()(model)


def test_cli_one_line_errors(tiny_artifact, tmp_path, images):
    from tests.conftest import run_cli

    image = tmp_path / "i.png"
    images[0].save(image)
    r = run_cli("explain", str(tiny_artifact), "--image", str(image), "--prompt", "Hi?", "--out", str(tmp_path / "o"),
                "--mitigation", "iava", block_torch=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "cannot be explained" in r.stderr, r.stderr
    r = run_cli("explain", str(tiny_artifact), "--image", str(tmp_path / "missing.png"), "--prompt", "Hi?", "--out",
                str(tmp_path / "o"), block_torch=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [(("--lam", "-1"), "--lam must be a finite number >= 0"),
                                           (("--tau", "nan"), "--tau must be a finite number >= 0"),
                                           (("--max-new-tokens", "0"), "--max-new-tokens must be an integer >= 1")])
def test_cli_bad_numbers_are_one_line(tiny_artifact, tmp_path, args, message):
    from click.testing import CliRunner

    from anchorrt.cli import main

    r = CliRunner().invoke(main, ["explain", str(tiny_artifact), "--image", "x.png", "--prompt", "Hi?", "--out",
                                  str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and message in r.output, r.output


def test_cli_runs_without_torch(tiny_artifact, tmp_path, images):
    """The whole command on the plain tiny export (CLVA baked into the copy) with torch made unimportable."""
    from tests.conftest import run_cli

    image = tmp_path / "i.png"
    images[1].save(image)
    r = run_cli("explain", str(tiny_artifact), "--image", str(image), "--prompt", "Describe it.", "--out",
                str(tmp_path / "o"), "--max-new-tokens", "2", block_torch=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["anchors.png", "drift.png", "explain.json",
                                                                  "heads.png", "layers.png"]
    assert "wrote" in r.stdout and "suggest" in r.stdout


def test_missing_matplotlib_is_one_line(monkeypatch, tiny_artifact, tmp_path):
    import sys

    from click.testing import CliRunner

    from anchorrt.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = CliRunner().invoke(main, ["explain", str(tiny_artifact), "--image", "x.png", "--prompt", "Hi?", "--out",
                                  str(tmp_path / "o")])
    assert r.exit_code == 2
    assert 'pip install "anchorrt[profile]"' in r.output and r.output.strip().count("\n") == 0, r.output


def test_demo_marks_unknown_words_and_wrong_answers():
    """scripts/demo.py's helpers: the demo model's 44-word tokenizer flags unknown words; POPE's yes/no rule; caption
    mentions the scene does not hold."""
    import importlib.util
    from types import SimpleNamespace

    from anchorrt.runtime.eval.world import COLOUR_NAMES, SHAPES, Obj, Scene
    from tokenizers import Tokenizer

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    tok = Tokenizer.from_file(str(ROOT / "samples" / "demo-llava" / "tokenizer.json"))
    assert tok.get_vocab_size() == 44
    pipe = SimpleNamespace(prompts=SimpleNamespace(tokenizer=tok))
    assert demo.unknown_words(pipe, "Is there a purple elephant in the image?") == ["purple", "elephant"]
    assert demo.unknown_words(pipe, "Is there a red circle in the image?") == []
    assert [demo.yes_no(t) for t in ("yes", "no.", "Yes, there is", "there is not a star")] == ["yes", "no", "yes", "no"]
    scene = Scene((Obj("circle", "yellow", 16, 16, 7), Obj("ring", "blue", 48, 16, 7)), seed=0)
    caption = "a yellow circle, a yellow ring and a blue square."
    assert demo.not_in_scene(caption, scene, SHAPES, COLOUR_NAMES) == ["yellow ring", "blue square"]
