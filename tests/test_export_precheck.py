"""Issue 13 item 8: refusals that config.json and the image-processor config can decide come before any weight is
loaded (they used to come after a whole export: `--mitigation clva,sevi` on an 8-layer model ran 1m44s before
"sevi matched nothing"; an unsupported image processor was refused after the weights loaded).

The loader is replaced by one that fails the test, so "fast" here means "the weights were never touched"; a
control case with valid options reaches the loader, so the replacement is known to be in the path."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from anchorrt.exporter.archs.llava import LlavaArch
from anchorrt.graph_passes.bake import BakeOptions
from anchorrt.runtime.errors import AnchorError, CheckpointError
from click.testing import CliRunner


class WeightsLoaded(Exception):
    """Raised by the stand-in loader: the export got as far as reading weights."""


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise WeightsLoaded("the export reached the weight loader")

    monkeypatch.setattr(LlavaArch, "__init__", refuse)


@pytest.fixture(scope="module")
def other_processor(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with an image processor the runtime does not reproduce."""
    path = tmp_path_factory.mktemp("models") / "tiny-idefics3"
    shutil.copytree(tiny_model, path)
    cfg_path = path / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_processor"]["image_processor_type"] = "Idefics3ImageProcessor"
    cfg_path.write_text(json.dumps(cfg))
    return path


CASES = [  # (mitigation, bake options, message fragment); the tiny model has 8 decoder layers
    ("clva,sevi", BakeOptions(), "start_layer 8 leaves this 8-layer model unchanged"),
    ("sevi", BakeOptions(sevi_start_layer=12), "choose --sevi-start-layer below 8"),
    ("sevi", BakeOptions(sevi_start_layer=-1), "start_layer must be >= 0"),
    ("clva", BakeOptions(clva_l_pos=8), "CLVA l_pos=8 is outside the model's layers 0..7"),
    ("clva", BakeOptions(clva_drift_layers=(1,)), "CLVA drift layers"),
    ("probe", BakeOptions(probe_layers=(0, 9)), "probe layers [0, 9] are not within 0..7"),
    ("clva,bogus", BakeOptions(), "unknown mitigation method 'bogus'"),
]


@pytest.mark.parametrize("mitigation,options,fragment", CASES)
def test_bad_mitigation_choices_refused_before_weights(tiny_model, tmp_path, no_weights, mitigation, options,
                                                       fragment):
    from anchorrt.exporter.export import export_model

    t = time.perf_counter()
    with pytest.raises(AnchorError) as err:
        export_model(tiny_model, tmp_path / "out", mitigation=mitigation, bake_options=options)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert time.perf_counter() - t < 10  # no export ran (one took ~25 s on this model)
    assert not list(tmp_path.iterdir())  # not even a temporary folder


def test_unsupported_image_processor_refused_before_weights(other_processor, tmp_path, no_weights):
    from anchorrt.exporter.export import export_model

    with pytest.raises(CheckpointError) as err:
        export_model(other_processor, tmp_path / "out")
    assert "image_processor_type 'Idefics3ImageProcessor' is not supported" in str(err.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("mitigation,options", [
    (None, None), ("clva,sevi,probe", BakeOptions(sevi_start_layer=7, clva_l_pos=2, probe_layers=(0, 7))),
])
def test_valid_choices_reach_the_loader(tiny_model, tmp_path, no_weights, mitigation, options):
    """The control: nothing above is refused for a reason the pre-check does not own."""
    from anchorrt.exporter.export import export_model

    with pytest.raises(WeightsLoaded):
        export_model(tiny_model, tmp_path / "out", mitigation=mitigation, bake_options=options)
    assert not list(tmp_path.iterdir())  # the temporary folder is removed


def test_cli_export_refuses_before_weights(tiny_model, other_processor, tmp_path, no_weights):
    from anchorrt.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["export", str(tiny_model), "-o", str(tmp_path / "a"), "--mitigation", "clva,sevi"])
    assert res.exit_code != 0 and not isinstance(res.exception, WeightsLoaded), res.output
    assert "start_layer 8 leaves this 8-layer model unchanged" in res.output
    assert "[1/5]" not in res.output  # refused before the loading step
    res = runner.invoke(main, ["export", str(other_processor), "-o", str(tmp_path / "b")])
    assert res.exit_code != 0 and "Idefics3ImageProcessor" in res.output, res.output
    help_text = " ".join(runner.invoke(main, ["export", "--help"]).output.split())
    assert "SEVI on a model with that many layers or fewer would change nothing and is refused" in help_text
    assert "clva, sevi, probe (IAVA's attention probe)" in help_text  # issue 13 item 11: probe was not listed


def test_bad_config_layer_count(tiny_model, tmp_path, no_weights):
    from anchorrt.exporter.export import export_model

    path = tmp_path / "m"
    shutil.copytree(tiny_model, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = "eight"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_hidden_layers must be a positive integer"):
        export_model(path, tmp_path / "out")


def test_bake_refuses_before_reading_the_decoder(tiny_artifact, tmp_path, monkeypatch):
    import anchorrt.graph_passes.bake as bake_mod
    from anchorrt.graph_passes.base import PassError

    def refuse(*args, **kwargs):
        raise WeightsLoaded("bake reached the decoder")

    monkeypatch.setattr(bake_mod, "transform_into", refuse)
    art = tmp_path / "a"
    shutil.copytree(tiny_artifact, art)
    with pytest.raises(PassError, match="start_layer 8 leaves this 8-layer model unchanged"):
        bake_mod.bake(art, "clva,sevi")
    with pytest.raises(PassError, match="probe layers"):
        bake_mod.bake(art, "probe", BakeOptions(probe_layers=(8,)))
    with pytest.raises(WeightsLoaded):
        bake_mod.bake(art, "clva,sevi", BakeOptions(sevi_start_layer=2))
