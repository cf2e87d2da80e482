"""The evaluation harness: metrics on hand-computed cases, each loader on fixture files written here, the world's
determinism, and `anchorrt eval` end to end on the tiny random-weight artifact (structure, not accuracy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from anchorrt.runtime.eval.chair import Chair
from anchorrt.runtime.eval.loaders import EvalDataError, load_chair, load_mme, load_pope
from anchorrt.runtime.eval.metrics import chair_metrics, mme_scores, parse_yes_no, pope_metrics
from anchorrt.runtime.eval.world import PAIRS, SHAPES, World, caption, mme_sets, pope_sets

from tests.conftest import run_cli

# ------------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No.", "no"),
    ("no, there is none", "no"),  # commas are removed before splitting
    ("There is not a dog.", "no"),
    ("NO", "yes"),  # the rule is case-sensitive: only No, not, no
    ("Yes. No, not at all.", "yes"),  # only the first sentence counts
    ("I don't know", "yes"),
    ("", "yes"),
])
def test_pope_parsing_rule(text, expected):
    assert parse_yes_no(text) == expected


def test_pope_metrics_hand_computed():
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)
    assert m["false_positive_rate"] == pytest.approx(1 / 2)
    never_yes = pope_metrics(["no", "no"], ["yes", "no"])
    assert never_yes["precision"] == 0.0 and never_yes["f1"] == 0.0 and never_yes["yes_ratio"] == 0.0
    with pytest.raises(ValueError):
        pope_metrics(["maybe"], ["yes"])


def test_chair_hand_computed():
    chair = Chair("opera")
    assert chair.caption_words("Two dogs, a puppy and a hot dog; no cats.").nodes == ["dog", "dog", "hot dog", "cat"]
    captions = {"1": "a dog and two cats.", "2": "a puppy, a hot dog and a dog."}
    gt = {"1": {"dog", "cat"}, "2": {"dog"}}
    m = chair_metrics(captions, gt, chair)
    assert (m["mentions"], m["hallucinated_mentions"]) == (5, 1)
    assert m["chair_i"] == pytest.approx(1 / 5)
    assert m["chair_s"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(3 / 3)
    assert m["per_image"]["2"]["hallucinated"] == ["hot dog"]


def test_mme_score_hand_computed():
    recs = [
        {"subset": "color", "label": "yes", "answer": "Yes"},
        {"subset": "color", "label": "no", "answer": "No"},
        {"subset": "color", "label": "yes", "answer": "yes"},
        {"subset": "color", "label": "no", "answer": "Yes"},
        {"subset": "position", "label": "no", "answer": "yes"},
        {"subset": "position", "label": "yes", "answer": "yes"},
    ]
    m = mme_scores(recs)
    assert m["color"]["acc"] == pytest.approx(0.75) and m["color"]["acc_plus"] == pytest.approx(0.5)
    assert m["color"]["score"] == pytest.approx(125.0)
    assert m["position"]["score"] == pytest.approx(50.0)
    assert m["totals"]["perception"] == pytest.approx(175.0)


# ------------------------------------------------------------------------------------------------ loaders


def test_load_pope(tmp_path):
    rows = [{"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "No"}]
    path = tmp_path / "coco_pope_random.json"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_pope(path, tmp_path / "imgs")
    assert [(it.id, it.label, it.image) for it in items] == [("1", "yes", tmp_path / "imgs" / "a.jpg"),
                                                            ("2", "no", tmp_path / "imgs" / "a.jpg")]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows))
    assert [it.prompt for it in load_pope(array, tmp_path)] == [r["text"] for r in rows]
    for bad, msg in ((dict(rows[0], label="maybe"), "label"), ({"question_id": 3, "image": "x"}, "lacks")):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(EvalDataError, match=msg):
            load_pope(path, tmp_path)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(EvalDataError, match="twice"):
        load_pope(path, tmp_path)


def test_load_chair(tmp_path):
    instances = {"images": [{"id": 7, "file_name": "x.jpg"}, {"id": 3, "file_name": "y.jpg"}],
                 "annotations": [{"image_id": 7, "category_id": 1}, {"image_id": 3, "category_id": 2}],
                 "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "hot dog"}]}
    captions = {"annotations": [{"image_id": 7, "caption": "A puppy next to a frankfurter."}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "syn.txt").write_text("dog, puppy\nhot dog, frankfurter\n")
    data = load_chair(tmp_path / "instances.json", tmp_path / "captions.json", tmp_path / "syn.txt", tmp_path / "im",
                      "Describe.", impl="rohrbach")
    assert [it.id for it in data.items] == ["3", "7"]  # id order
    assert data.ground_truth() == {"3": {"hot dog"}, "7": {"dog", "hot dog"}}  # caption objects count as present
    assert data.items[1].image == tmp_path / "im" / "x.jpg" and data.items[1].prompt == "Describe."
    sampled = load_chair(tmp_path / "instances.json", tmp_path / "captions.json", tmp_path / "syn.txt", tmp_path,
                         "Describe.", sample=1, seed=0, impl="rohrbach")
    with pytest.raises(EvalDataError, match="does not cover synonym word.*frankfurter"):  # opera needs its lemmas
        load_chair(tmp_path / "instances.json", tmp_path / "captions.json", tmp_path / "syn.txt", tmp_path, "D")
    assert len(sampled.items) == 1
    (tmp_path / "syn.txt").write_text("dog\n")
    with pytest.raises(EvalDataError, match="not in the synonym table"):
        load_chair(tmp_path / "instances.json", tmp_path / "captions.json", tmp_path / "syn.txt", tmp_path, "D",
                   impl="rohrbach")


def test_load_mme_both_layouts(tmp_path):
    flat = tmp_path / "release" / "color"
    flat.mkdir(parents=True)
    (flat / "0001.png").write_bytes(b"")
    (flat / "0001.txt").write_text("Is there a red car? Please answer yes or no.\tYes\n"
                                   "Is there a blue car? Please answer yes or no.\tNo\n")
    items = load_mme(tmp_path / "release", ["color"])
    assert [(it.id, it.label, it.meta["subset"]) for it in items] == [("color/0001.png/1", "yes", "color"),
                                                                     ("color/0001.png/2", "no", "color")]
    assert items[0].image == flat / "0001.png"
    results = tmp_path / "tool"
    results.mkdir()
    (results / "position.txt").write_text("p.jpg\tIs the cat left of the dog?\tYes\tyes\n"
                                          "p.jpg\tIs the cat right of the dog?\tNo\tno\n")
    items = load_mme(results, ["position"], image_root=tmp_path / "imgs")
    assert [it.image for it in items] == [tmp_path / "imgs" / "position" / "p.jpg"] * 2
    assert [it.label for it in items] == ["yes", "no"]
    with pytest.raises(EvalDataError, match="no MME subset 'count'"):
        load_mme(results, ["count"])


# ------------------------------------------------------------------------------------------------ world


def test_world_is_deterministic():
    world = World()
    a = [world.sample_scene(np.random.default_rng(5)) for _ in range(2)]
    b = [world.sample_scene(np.random.default_rng(5)) for _ in range(2)]
    assert a == b
    img_a, idx_a = world.render(a[0])
    img_b, idx_b = world.render(b[0])
    assert np.array_equal(img_a, img_b) and np.array_equal(idx_a, idx_b)
    drawn = {0} | {i + 1 for i, o in enumerate(a[0].objects) if o.visible}
    assert set(np.unique(idx_a)) == drawn  # every visible object is drawn
    other = world.sample_scene(np.random.default_rng(6))
    assert other != a[0]
    s1, p1 = pope_sets(world, n_images=6, seed=4)
    s2, p2 = pope_sets(world, n_images=6, seed=4)
    assert s1 == s2 and [q.__dict__ for q in p1["adversarial"]] == [q.__dict__ for q in p2["adversarial"]]


def test_implied_objects_are_ground_truth_but_not_drawn():
    world = World()
    rng = np.random.default_rng(0)
    scene = next(s for s in (world.sample_scene(rng) for _ in range(200)) if not all(o.visible for o in s.objects))
    hidden = next(i for i, o in enumerate(scene.objects) if not o.visible)
    _, index = world.render(scene)
    assert hidden + 1 not in np.unique(index) and scene.has(scene.objects[hidden].shape)
    assert scene.objects[hidden].shape in PAIRS.values() and scene.objects[hidden].shape in caption(scene)
    assert not scene.shows(scene.objects[hidden].shape)
    evaluation = [world.sample_scene(rng, pair_rate=world.config.eval_pair_rate) for _ in range(50)]
    assert all(o.visible for s in evaluation for o in s.objects)


def test_world_eval_sets_are_what_they_claim():
    world = World()
    scenes, splits = pope_sets(world, n_images=20, seed=2)
    for split, questions in splits.items():
        labels = [q.label for q in questions]
        assert labels.count("yes") == labels.count("no"), split  # balanced
        for q in questions:
            shape = q.meta["shape"]
            assert scenes[q.image].has(shape) == (q.label == "yes")
    traps = [q for q in splits["adversarial"] if q.label == "no" and q.meta["partner_absent"]]
    assert traps and all(any(PAIRS.get(s) == q.meta["shape"] for s in scenes[q.image].shapes) for q in traps)
    scenes, subsets = mme_sets(world, n_images=10, seed=3)
    for name, question, answer in subsets["color"]:
        colour, shape = question.split(" in the image")[0].split()[-2:]
        assert scenes[name].has(shape, colour) == (answer == "yes")
        assert any(o.colour == colour for o in scenes[name].objects)  # the asked colour is always in the image
    for name, question, answer in subsets["position"]:
        words = question.split()
        a, side, b = words[2], words[5], words[9].rstrip("?")
        oa, ob = scenes[name].find(a), scenes[name].find(b)
        assert ((oa.x < ob.x) == (side == "left")) == (answer == "yes")
    assert caption(scenes[name]).count(",") + 2 >= len(scenes[name].objects) >= 3
    assert set(SHAPES) >= {o.shape for s in scenes.values() for o in s.objects}


# ------------------------------------------------------------------------------------------------ CLI / harness


def test_parse_mitigation():
    import click

    from anchorrt.cli_eval import parse_mitigation

    assert parse_mitigation(None, []) == {}
    assert parse_mitigation("none", []) == {}
    assert parse_mitigation("clva,sevi", ["clva.alpha=14", "clva.drift_layers=5,6", "sevi.omega=0.5"]) == {
        "clva": {"alpha": 14, "drift_layers": [5, 6]}, "sevi": {"omega": 0.5}}
    with pytest.raises(click.UsageError, match="does not enable"):
        parse_mitigation("clva", ["sevi.omega=1"])
    with pytest.raises(click.UsageError, match="METHOD.PARAM=VALUE"):
        parse_mitigation("clva", ["alpha=1"])


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    """The world's POPE, MME and CHAIR sets in the official formats, written by scripts/make_eval_sets.py."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("make_eval_sets", ROOT / "scripts" / "make_eval_sets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("world-eval")
    world = World()
    (out / "pope").mkdir()
    (out / "chair").mkdir()
    pope = mod.write_pope(world, out / "pope", n_images=4, seed=1)
    mod.write_mme(world, out / "mme", n_images=2, seed=2)
    mod.write_chair(world, out / "chair", n_images=3, seed=3)
    return out, pope


def _answers(path):
    lines = path.read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_eval_pope_end_to_end_and_resume(tiny_artifact, world_files, tmp_path):
    root, pope = world_files
    random_split = [p for p in pope if p.stem.endswith("random")][0]
    out = tmp_path / "res"
    args = ["eval", "pope", str(tiny_artifact), "-q", str(random_split), "--image-root", str(root / "pope" / "images"),
            "--out", str(out), "--batch-size", "7", "--max-new-tokens", "3", "--no-progress"]
    proc = run_cli(*args, "--limit", "20", block_torch=True)  # the harness needs no torch
    assert proc.returncode == 0, proc.stderr
    header, recs = _answers(out / "world_pope_random.answers.jsonl")
    assert header["settings"]["mitigation"] == {} and header["settings"]["backend"] == "onnx"
    assert [r["id"] for r in recs] == [str(i) for i in range(1, 21)]
    result = json.loads((out / "results.json").read_text())["results"]["world_pope_random"]
    assert result["n"] == 20 and result["tp"] + result["fp"] + result["tn"] + result["fn"] == 20
    preds = [parse_yes_no(r["answer"]) for r in recs]
    assert result["yes_ratio"] == pytest.approx(preds.count("yes") / 20)
    assert result["accuracy"] == pytest.approx(sum(p == r["label"] for p, r in zip(preds, recs)) / 20)
    assert "| world_pope_random | 20 |" in (out / "results.md").read_text() and "| world_pope_random | 20 |" in proc.stdout
    # resume: the 20 answers stay, only the last 4 questions are asked; a half-written line is dropped
    with open(out / "world_pope_random.answers.jsonl", "a") as f:
        f.write('{"id": "21", "answ')
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    _, recs2 = _answers(out / "world_pope_random.answers.jsonl")
    assert recs2[:20] == recs and [r["id"] for r in recs2[20:]] == ["21", "22", "23", "24"]
    assert json.loads((out / "results.json").read_text())["results"]["world_pope_random"]["n"] == 24
    # other settings on the same answers file are refused, not mixed
    proc = run_cli(*args[:-3], "--max-new-tokens", "5", "--no-progress")
    assert proc.returncode == 2 and "other inputs (max_new_tokens: 3 -> 5)" in proc.stderr
    # the official answers file that evaluate.py reads: one JSON line per question with "answer" (and "text")
    official = [json.loads(line) for line in (out / "world_pope_random.pope_answers.jsonl").read_text().splitlines()]
    assert [(o["question_id"], o["answer"], o["text"]) for o in official] == [(int(r["id"]), r["answer"], r["answer"])
                                                                                for r in recs2]


def test_eval_resume_only_when_every_input_matches(tiny_artifact, world_files, tmp_path):
    """Issue 13 item 7: an existing --out with another --image-root or an edited questions file was silently
    reused (exit 0, the old answers). Now one line names the mismatch and the fix; --overwrite starts over."""
    import shutil

    root, pope = world_files
    split = [p for p in pope if p.stem.endswith("random")][0]
    q = tmp_path / split.name
    q.write_text(split.read_text())
    other_images = tmp_path / "images-copy"
    shutil.copytree(root / "pope" / "images", other_images)
    out = tmp_path / "res"
    base = ["eval", "pope", str(tiny_artifact), "-q", str(q), "--out", str(out), "--max-new-tokens", "2",
            "--no-progress", "--limit", "3"]
    proc = run_cli(*base, "--image-root", str(root / "pope" / "images"), block_torch=True)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(*base, "--image-root", str(other_images), block_torch=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "image_root:" in line and "--overwrite" in line and "another --out" in line
    rows = [json.loads(r) for r in q.read_text().splitlines()]
    rows[0]["text"] = rows[0]["text"].replace("Is there", "Do you see")  # the same file, edited
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli(*base, "--image-root", str(root / "pope" / "images"), block_torch=True)
    assert proc.returncode == 2 and "file.sha256" in proc.stderr and "items_sha256" in proc.stderr
    proc = run_cli(*base, "--image-root", str(other_images), "--overwrite", block_torch=True)
    assert proc.returncode == 0, proc.stderr
    header, recs = _answers(out / f"{q.stem}.answers.jsonl")
    assert header["settings"]["image_root"] == str(other_images.resolve()) and len(recs) == 3
    assert recs[0]["prompt"].startswith("Do you see")


def test_eval_mme_and_chair_end_to_end(tiny_artifact, world_files, tmp_path):
    root, _ = world_files
    proc = run_cli("eval", "mme", str(tiny_artifact), "--root", str(root / "mme"), "--out", str(tmp_path / "mme"),
                   "--max-new-tokens", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "mme" / "results.json").read_text())["results"]
    assert set(res) == {"existence", "color", "position", "totals"}
    for subset in ("existence", "color", "position"):  # the eval tool's input: image, question, gt, answer
        lines = (tmp_path / "mme" / "mme_results" / f"{subset}.txt").read_text().splitlines()
        assert len(lines) == 4 and all(len(line.split("\t")) == 4 for line in lines)
    assert all(res[s]["n"] == 4 and res[s]["images"] == 2 for s in ("existence", "color", "position"))
    c = root / "chair"
    proc = run_cli("eval", "chair", str(tiny_artifact), "--instances", str(c / "instances_world.json"),
                   "--captions", str(c / "captions_world.json"), "--synonyms", str(c / "synonyms.txt"),
                   "--image-root", str(c / "images"), "--out", str(tmp_path / "chair"), "--max-new-tokens", "6",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "chair" / "results.json").read_text())["results"]
    assert res["n_captions"] == 3 and 0.0 <= res["chair_i"] <= 1.0 and 0.0 <= res["recall"] <= 1.0
    caps = json.loads((tmp_path / "chair" / "captions.chair.json").read_text())  # OPERA chair.py's --cap_file
    assert len(caps) == 3 and all(set(c) == {"image_id", "caption"} for c in caps)


def test_torch_reference_backend_matches_runtime(tiny_model, tiny_artifact, world_files):
    """`--backend torch` (the independent PyTorch reference) answers what the exported graphs answer."""
    from anchorrt.runtime.eval.harness import pipeline_answerer
    from anchorrt.runtime.manifest import Manifest
    from anchorrt.runtime.pipeline import Pipeline

    from anchorrt.cli_eval import TorchAnswerer

    root, pope = world_files
    items = load_pope(pope[0], root / "pope" / "images")[:6]
    manifest = Manifest.load(tiny_artifact)
    ref = TorchAnswerer(tiny_model, manifest, max_new_tokens=4, mitigation={})
    onnx = pipeline_answerer(Pipeline(manifest), max_new_tokens=4)
    assert ref(items) == onnx(items)


@pytest.mark.slow
def test_demo_training_is_deterministic_and_exportable(tmp_path):
    """A few steps of the demo recipe, twice: the same weights; the folder exports and answers."""
    from anchorrt.exporter.demo.train import DemoSpec, train
    from anchorrt.exporter.export import export_model
    from anchorrt.runtime.pipeline import Pipeline

    spec = DemoSpec(vision_steps=3, align_steps=2, llava_steps=3, llava_images=2, warmup=1, yes_no_steps=1,
                    check_questions=4, check_every=0)
    for name in ("a", "b"):
        train(tmp_path / name, spec, log=lambda msg: None)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    export_model(tmp_path / "a", tmp_path / "art")
    image = World().image(World().sample_scene(np.random.default_rng(0)))
    out = Pipeline.from_dir(tmp_path / "art").generate(image, "Is there a circle in the image?", max_new_tokens=3)
    assert out.prompt_tokens == 3 + 64 + 8 + 2 and 1 <= len(out.token_ids) <= 3  # <s> user : <image>x64 ... assistant :


def test_shipped_visalign_demo_is_a_trained_visalign_checkpoint():
    """samples/demo-llava-visalign: the checkpoint format reads, the fusion is trained (not the identity it started
    from), stage 2 changed the LLM, and the vision tower is the base model's."""
    from pathlib import Path

    from anchorrt.exporter.visalign.checkpoint import load_fusion_weights
    from safetensors.numpy import load_file

    root = Path(__file__).resolve().parents[1] / "samples"
    entry, fusion = load_fusion_weights(root / "demo-llava-visalign")
    assert entry.raw["training"]["stage"] == 2 and entry.init == "identity" and entry.hidden_size == 128
    d = fusion.weight.shape[0]
    assert fusion.weight.shape == (d, 2 * d) == (128, 256)
    identity = np.concatenate([np.eye(d), np.zeros((d, d))], axis=1)
    assert np.abs(fusion.weight - identity).max() > 1e-3 and np.abs(fusion.bias).max() > 1e-4
    base = load_file(str(root / "demo-llava" / "model.safetensors"))
    va = load_file(str(root / "demo-llava-visalign" / "model.safetensors"))
    assert base.keys() == va.keys()
    changed = {k for k in base if not np.array_equal(base[k], va[k])}
    assert any("language_model" in k for k in changed) and not any("vision_tower" in k for k in changed)
