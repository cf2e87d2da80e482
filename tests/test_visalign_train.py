"""VisAlign's trainer on a tiny synthetic set: the loss goes down, stage 1 leaves the LLM alone, an interrupted
and resumed run ends where an uninterrupted one does, bad data fails before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from anchorrt.exporter.visalign.data import TrainingDataError
from anchorrt.exporter.visalign.train import TrainingError, state_dir_for, train
from anchorrt.graph_passes.visalign import WEIGHTS_FILE
from safetensors.numpy import load_file

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
STAGE1_STEPS = 30
LOSS_RATIO = 0.7  # stage 1, 30 steps at lr 1e-2: mean loss of the last 5 steps <= 0.7 x the first 5 (measured 0.51)


def make_dataset(folder: Path) -> Path:
    """8 one-colour images (two sizes per colour) and a question about the colour; one entry has two turns."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, rgb in COLOURS.items():
        for j in range(2):
            file = f"{name}_{j}.png"
            Image.new("RGB", (32 + 16 * j, 32), rgb).save(folder / file)
            entries.append({"id": f"{name}{j}", "image": file, "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the image?"},
                {"from": "gpt", "value": f"A {name} square."}]})
    entries[0]["conversations"] += [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "red"}]
    path = folder / "data.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than two, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("visalign-data"))


@pytest.fixture(scope="module")
def stage1(tiny_model, dataset, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_thread`, which a module fixture cannot use
    out = tmp_path_factory.mktemp("visalign-train") / "stage1"
    try:
        result = train(tiny_model, dataset, out, stage=1, steps=STAGE1_STEPS, lr=1e-2, batch_size=4, seed=0,
                       progress=False)
    finally:
        torch.set_num_threads(before)
    return result, out


def tensors(folder: Path, name: str = "model.safetensors") -> dict[str, np.ndarray]:
    return load_file(str(folder / name))


def test_stage1_lowers_loss_and_leaves_the_llm_bit_identical(tiny_model, stage1):
    result, out = stage1
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    print(f"stage 1 loss: first 5 steps {first:.3f}, last 5 steps {last:.3f} (ratio {last / first:.2f}), "
          f"{result.seconds:.1f} s")
    assert len(result.losses) == STAGE1_STEPS
    assert last <= LOSS_RATIO * first
    before, after = tensors(tiny_model), tensors(out)
    assert before.keys() == after.keys()
    frozen = [k for k in before if "multi_modal_projector" not in k]
    assert any("language_model" in k for k in frozen) and any("vision_tower" in k for k in frozen)
    for k in frozen:  # LLM, lm_head and vision tower: bit for bit
        assert before[k].tobytes() == after[k].tobytes(), k
    assert any(not np.array_equal(before[k], after[k]) for k in before if "multi_modal_projector" in k)
    fusion = tensors(out, WEIGHTS_FILE)
    d = fusion["visalign.bias"].shape[0]
    assert not np.array_equal(fusion["visalign.weight"], np.eye(d, 2 * d, dtype=np.float32))
    entry = json.loads((out / "config.json").read_text())["visalign"]
    assert entry["weights"] == WEIGHTS_FILE and entry["hidden_size"] == d and entry["training"]["stage"] == 1
    assert not state_dir_for(out).exists()


def test_interrupted_and_resumed_run_ends_at_the_same_weights(stage1, dataset, tmp_path):
    """Stage 2 (end to end) from the stage-1 checkpoint, 6 steps, state saved every 2; interrupted after step 5."""
    _, start = stage1
    kw = dict(stage=2, steps=6, lr=1e-3, batch_size=3, seed=1, save_every=2, progress=False)
    whole = train(start, dataset, tmp_path / "whole", **kw)

    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(start, dataset, tmp_path / "resumed", on_step=interrupt, **kw)
    assert not (tmp_path / "resumed").exists() and state_dir_for(tmp_path / "resumed").is_dir()
    with pytest.raises(TrainingError, match="pass --resume"):
        train(start, dataset, tmp_path / "resumed", **kw)
    with pytest.raises(TrainingError, match="lr, learning_rate differ|learning_rate, lr differ"):
        train(start, dataset, tmp_path / "resumed", resume=True, **{**kw, "lr": 2e-3})
    resumed = train(start, dataset, tmp_path / "resumed", resume=True, **kw)
    assert resumed.start_step == 4 and resumed.losses == whole.losses
    for name in ("model.safetensors", WEIGHTS_FILE):
        a, b = tensors(tmp_path / "whole", name), tensors(tmp_path / "resumed", name)
        assert a.keys() == b.keys()
        assert all(a[k].tobytes() == b[k].tobytes() for k in a), name
    llm = "language_model.model.layers.0.self_attn.q_proj.weight"  # stage 2 trains the LLM
    assert not np.array_equal(tensors(start)[llm], tensors(tmp_path / "whole")[llm])


BAD = {
    "missing image": (lambda e: e[2].update(image="nowhere.png"), "entry 2 (id 'green0'): image 'nowhere.png' not found"),
    "malformed conversation": (lambda e: e[2]["conversations"].reverse(), "entry 2 (id 'green0'): malformed conversation"),
    "no answer tokens": (lambda e: e[2]["conversations"][1].update(value="  "), "entry 2 (id 'green0'): no answer tokens"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_names_the_entry_and_writes_nothing(tiny_model, dataset, tmp_path, case):
    change, message = BAD[case]
    entries = json.loads(dataset.read_text())
    change(entries)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    with pytest.raises(TrainingDataError) as err:
        train(tiny_model, data, tmp_path / "out", image_root=dataset.parent, steps=2, progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]  # no output, no state, no partial folder


def test_lora_without_peft_is_a_clear_error(tiny_model, dataset, tmp_path):
    try:
        import peft  # noqa: F401
        pytest.skip("peft is installed here")
    except ImportError:
        pass
    with pytest.raises(TrainingError, match=r"needs the peft package: `pip install peft`"):
        train(tiny_model, dataset, tmp_path / "out", stage=2, lora=True, steps=2, progress=False)
    with pytest.raises(TrainingError, match="LoRA is for stage 2"):
        train(tiny_model, dataset, tmp_path / "out", stage=1, lora=True, steps=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_train_and_its_errors(tiny_model, dataset, tmp_path):
    """`anchorrt visalign train` in process (click's runner): a 2-step run, then bad data as one error line."""
    from click.testing import CliRunner

    from anchorrt.cli import main

    out = tmp_path / "va"
    res = CliRunner().invoke(main, ["visalign", "train", "--data", str(dataset), "--model", str(tiny_model), "-o",
                                    str(out), "--steps", "2", "--batch-size", "2", "--init", "xavier", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stderr and (out / WEIGHTS_FILE).is_file()
    assert json.loads((out / "config.json").read_text())["visalign"]["init"] == "xavier"
    entries = json.loads(dataset.read_text())
    entries[1]["conversations"] = "What?"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries))
    res = CliRunner().invoke(main, ["visalign", "train", "--data", str(bad), "--image-root", str(dataset.parent),
                                    "--model", str(tiny_model), "-o", str(tmp_path / "never"), "--no-progress"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: training data entry 1 (id 'red1'): malformed")
    assert not (tmp_path / "never").exists()
