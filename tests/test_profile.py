"""`anchorrt profile`: the report follows its schema, plots are real pictures, sweeps stay inside their bounds,
the mitigation A/B lists every baked method, bad values are one-line errors. No timing thresholds: only structure."""

from __future__ import annotations

import copy
import json
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import run_cli

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def base_context(tiny_artifact) -> int:
    from anchorrt.runtime.pipeline import Pipeline
    from anchorrt.runtime.profile.sweep import DEFAULT_PROMPT, PromptSizer

    return PromptSizer(Pipeline.from_dir(tiny_artifact, verify=False).prompts, DEFAULT_PROMPT).base_length


@pytest.fixture(scope="module")
def cli_run(tiny_artifact, base_context, tmp_path_factory):
    """One torch-free CLI run with every output: JSON, plots, onnxruntime traces."""
    out = tmp_path_factory.mktemp("profile") / "out"
    contexts = f"{base_context},{base_context + 40}"
    proc = run_cli("profile", str(tiny_artifact), "--out", str(out), "--batch-sizes", "1,2", "--contexts", contexts,
                   "--images", "1,3", "--warmup", "1", "--repeats", "2", "--new-tokens", str(NEW_TOKENS),
                   "--ort-trace", block_torch=True)
    assert proc.returncode == 0, proc.stderr
    return proc, out


def test_cli_report_follows_schema(cli_run, base_context):
    from anchorrt.runtime.profile import validate_report

    proc, out = cli_run
    report = json.loads((out / "profile.json").read_text())
    validate_report(report)
    assert "time to first token" in proc.stdout and "decode tokens/s" in proc.stdout
    assert "batch sweep" in proc.stdout and "context sweep" in proc.stdout and "image sweep" in proc.stdout
    assert "[" in proc.stderr and "measured" in proc.stderr  # the progress display
    base = next(r for r in report["runs"] if "base" in r["sweeps"])
    assert base["context"] == base_context and base["batch"] == 1
    assert len(base["samples"]["ttft_s"]) == 2 and all(len(s) == NEW_TOKENS - 1 for s in base["samples"]["steps"]["token"])
    assert all(g == [NEW_TOKENS] for g in base["samples"]["generated"])  # stop tokens ignored: fixed-length runs
    assert base["samples"]["copies"] is None  # CPU: no host<->device copies
    assert report["environment"]["device"] == "cpu"
    assert all(x > 0 for x in base["samples"]["host_peak_rss_bytes"])
    assert report["mitigation"] is None and report["artifact"]["mitigation"] == []


def test_cli_sweeps_honour_their_bounds(cli_run, base_context):
    _, out = cli_run
    report = json.loads((out / "profile.json").read_text())
    gen = [r for r in report["runs"] if r["kind"] == "generate"]
    assert {r["batch"] for r in gen if "batch" in r["sweeps"]} == {1, 2}
    assert {r["context"] for r in gen if "context" in r["sweeps"]} == {base_context, base_context + 40}
    assert {r["batch"] for r in gen} <= {1, 2}
    assert {r["context"] for r in gen} <= {base_context, base_context + 40}
    assert sorted(r["images"] for r in report["runs"] if r["kind"] == "vision") == [1, 3]
    assert report["settings"]["contexts"] == [base_context, base_context + 40]
    for r in gen:  # per-position latencies start at the run's own context
        assert r["summary"]["per_position"]["positions"][0] == r["context"]


def test_cli_plots_are_pictures(cli_run):
    from PIL import Image

    _, out = cli_run
    report = json.loads((out / "profile.json").read_text())
    expected = {"stages.png", "per_token.png", "scaling_batch.png", "scaling_context.png", "scaling_images.png"}
    assert set(report["plots"]) == expected
    for name in expected:
        path = out / name
        assert path.stat().st_size > 10_000, name
        with Image.open(path) as im:
            assert im.height > 300 and im.width > 500, name
            colours = im.convert("RGB").getcolors(maxcolors=1 << 16)  # None: more colours than that
        assert colours is None or len(colours) > 20, f"{name} is (nearly) a flat colour"


def test_memory_panels_hold_their_line(cli_run):
    """Issue 20 item 3: a near-constant peak-memory series sat on the panel's top edge (autoscaling around a constant,
    then a bottom at 0); the panels now run from 0 to above the highest point."""
    from anchorrt.runtime.profile import plots

    _, out = cli_run
    report = json.loads((out / "profile.json").read_text())
    for draw, sweep in ((plots._batch, "batch"), (plots._context, "context")):
        fig = draw(report)
        memory = next(ax for ax in fig.axes if ax.get_title() == "memory")
        peak = max(r["summary"]["host_peak_rss_bytes"]["p90"] for r in report["runs"] if sweep in r["sweeps"]) / 2**20
        bottom, top = memory.get_ylim()
        assert bottom == 0 and top >= 1.1 * peak, (sweep, top, peak)


def test_cli_writes_onnxruntime_traces(cli_run):
    _, out = cli_run
    report = json.loads((out / "profile.json").read_text())
    assert sorted(report["ort_trace"]) == sorted(str(out / f"ort-trace-{r}.json") for r in ("vision", "embed", "decoder"))
    events = json.loads((out / "ort-trace-decoder.json").read_text())
    assert isinstance(events, list) and any(e.get("cat") == "Node" for e in events)  # chrome-trace events


def test_schema_check_names_the_broken_field(cli_run):
    from anchorrt.runtime.profile import SchemaError, validate_report

    _, out = cli_run
    good = json.loads((out / "profile.json").read_text())
    bad = copy.deepcopy(good)
    bad["runs"][0]["samples"]["stages"]["prefill"].pop()
    with pytest.raises(SchemaError, match=r"runs\[0\]\.samples\.stages\.prefill"):
        validate_report(bad)
    bad = copy.deepcopy(good)
    bad["runs"][0]["samples"]["steps"]["token"][0].append(0.1)
    with pytest.raises(SchemaError, match="steps.token"):
        validate_report(bad)
    bad = copy.deepcopy(good)
    bad["schema_version"] = 99
    with pytest.raises(SchemaError, match="schema"):
        validate_report(bad)


# -- mitigation A/B -------------------------------------------------------------------------------------------
def _baked_copy(tiny_artifact, tmp_path):
    """A copy of the fixture with CLVA and SEVI baked in by the colleague's bake (graph_passes.bake, what
    `anchorrt bake` runs); SEVI from layer 4, since its default start layer leaves an 8-layer model unchanged."""
    from anchorrt.graph_passes.bake import BakeOptions, bake

    art = tmp_path / "baked"
    shutil.copytree(tiny_artifact, art)
    bake(art, "clva,sevi", BakeOptions(sevi_start_layer=4))
    return art


def test_mitigation_ab_lists_each_baked_method(tiny_artifact, base_context, tmp_path):
    from anchorrt.runtime.profile import ProfileSettings, run_profile, validate_report, write_outputs

    art = _baked_copy(tiny_artifact, tmp_path)
    ctx = (base_context, base_context + 30)
    report = run_profile(art, ProfileSettings(batch_sizes=(1,), contexts=ctx, images=(1,), warmup=0, repeats=2,
                                              new_tokens=NEW_TOKENS))
    validate_report(report)
    m = report["mitigation"]
    assert m["methods"] == ["clva", "sevi"]
    assert [(r["variant"], r["context"]) for r in m["ratios"]] == [(v, c) for v in ("clva", "sevi", "all") for c in ctx]
    for r in m["ratios"]:
        assert all(r[k]["median"] > 0 for k in ("ttft", "prefill", "decode", "token"))
    ab = [r for r in report["runs"] if "mitigation" in r["sweeps"]]
    assert sorted((r["variant"], r["context"]) for r in ab) == sorted(
        (v, c) for v in ("plain", "clva", "sevi", "all") for c in ctx)
    assert all(r["batch"] == 1 for r in ab)
    assert m["flags_applied"] and report["notes"] == []
    write_outputs(report, tmp_path / "out")
    assert "mitigation.png" in report["plots"] and (tmp_path / "out" / "mitigation.png").stat().st_size > 10_000


def test_reference_runs_interleaved(tiny_artifact):
    """The reference protocol with a stand-in for transformers (the real one needs torch: `--model`)."""
    from anchorrt.runtime.profile import ProfileSettings, run_profile, validate_report

    class Fake:
        name = "fake"
        calls: list[int] = []

        def generate(self, new_tokens: int) -> float:
            self.calls.append(new_tokens)
            return 0.01 * new_tokens

        def info(self) -> dict:
            return {"what": "stand-in"}

    ref = Fake()
    report = run_profile(tiny_artifact, ProfileSettings(batch_sizes=(1,), contexts=None, images=(1,), warmup=1,
                                                        repeats=2, new_tokens=NEW_TOKENS, mitigation=False),
                         reference=ref)
    validate_report(report)
    assert ref.calls == [1, 2, 1, 1 + NEW_TOKENS, 1, 1 + NEW_TOKENS]
    s = report["reference"]["summary"]
    assert s["reference_step_s"]["median"] == pytest.approx(0.01) and s["step_ratio"] > 0


# -- units ----------------------------------------------------------------------------------------------------
def test_prompt_sizer_hits_exact_lengths(tiny_artifact, base_context):
    from anchorrt.runtime.pipeline import Pipeline
    from anchorrt.runtime.profile.sweep import DEFAULT_PROMPT, PromptSizer, auto_contexts

    pipe = Pipeline.from_dir(tiny_artifact, verify=False)
    sizer = PromptSizer(pipe.prompts, DEFAULT_PROMPT)
    for c in (base_context, base_context + 1, base_context + 97):
        assert len(pipe.prompts.encode(sizer.grow(c)).ids) == c
    limit = pipe.prompts.context_length
    auto = auto_contexts(base_context, limit, 8)
    assert auto[0] == base_context and auto[-1] == limit - 8 and auto == sorted(set(auto)) and len(auto) >= 2


def test_summarize_and_host_memory():
    from anchorrt.runtime.profile.measure import HostMemory, summarize

    s = summarize([3.0, 1.0, 2.0, None])
    assert s["n"] == 3 and s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["p10"] <= s["p90"]
    assert summarize([]) is None
    host = HostMemory()
    before = host.peak_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MB touched
    assert host.peak_bytes() >= before and host.peak_bytes() > block.nbytes
    if sys.platform.startswith("linux"):
        assert host.source == "VmHWM"


# -- errors ---------------------------------------------------------------------------------------------------
def _cli(*args):
    from anchorrt.cli import main

    return CliRunner().invoke(main, ["profile", *args])


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes must be a comma-separated list"),
    (["--batch-sizes", "0"], "--batch-sizes must hold positive integers"),
    (["--contexts", "64,64"], "--contexts lists a value twice"),
    (["--images", ""], "--images must be a comma-separated list"),
    (["--repeats", "0"], "--repeats must be an integer >= 1"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0"),
    (["--new-tokens", "1"], "--new-tokens must be an integer >= 2"),
    (["--device", "tpu"], "--device must be one of cpu, cuda"),
    (["--threads", "two"], "--threads must be an integer"),
])
def test_cli_bad_values_are_one_line_errors(tiny_artifact, tmp_path, args, message):
    res = _cli(str(tiny_artifact), "--out", str(tmp_path / "o"), "--no-plots", *args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output


def test_cli_context_outside_the_model_is_refused(tiny_artifact, tmp_path, base_context):
    res = _cli(str(tiny_artifact), "--out", str(tmp_path / "o"), "--no-plots", "--contexts", f"{base_context},100000")
    assert res.exit_code == 2 and "error: context 100000 + 32 new tokens is past the model's context of 512" in res.output
    res = _cli(str(tiny_artifact), "--out", str(tmp_path / "o"), "--no-plots", "--contexts", str(base_context - 1))
    assert res.exit_code == 2 and f"shorter than the prompt with its image ({base_context} tokens" in res.output
    assert not (tmp_path / "o" / "profile.json").exists()


def test_cli_missing_matplotlib_names_the_extra(tiny_artifact, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = _cli(str(tiny_artifact), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert res.output.strip() == ("error: matplotlib is not installed; plots need `pip install anchorrt[profile]` "
                                  "(or pass --no-plots)")


def test_cli_model_without_torch_is_one_line(tiny_artifact, tiny_model, tmp_path):
    proc = run_cli("profile", str(tiny_artifact), "--model", str(tiny_model), "--out", str(tmp_path / "o"),
                   "--no-plots", block_torch=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --model needs torch and transformers (torch, transformers missing): `pip install anchorrt[export]`"]


def test_cli_missing_artifact(tmp_path):
    res = _cli(str(tmp_path / "nope"), "--no-plots")
    assert res.exit_code == 2 and res.output.startswith("error: artifact folder") and len(res.output.splitlines()) == 1


def test_probe_baked_artifact_profiles_iava(baked_artifact, base_context, tmp_path):
    """Issue 13 item 6: an artifact with the probe baked (what `make demo` writes) failed with "unknown mitigation
    method 'probe'". The probe is what IAVA runs on, so the A/B measures IAVA on and off, through the CLI too."""
    from anchorrt.runtime.profile import ProfileSettings, run_profile, validate_report

    ctx = (base_context,)
    report = run_profile(baked_artifact, ProfileSettings(batch_sizes=(1,), contexts=ctx, images=(1,), warmup=0,
                                                         repeats=1, new_tokens=NEW_TOKENS))
    validate_report(report)
    m = report["mitigation"]
    assert m["methods"] == ["clva", "sevi", "iava"] and m["flags_applied"]
    assert [r["variant"] for r in m["ratios"]] == ["clva", "sevi", "iava", "all"]
    iava = next(r for r in report["runs"] if r["variant"] == "iava")
    plain = next(r for r in report["runs"] if r["variant"] == "plain" and "mitigation" in r["sweeps"])
    assert all(g == [NEW_TOKENS] for g in iava["samples"]["generated"])
    assert np.median(iava["samples"]["ttft_s"]) > 0 and plain["context"] == iava["context"]
    proc = run_cli("profile", str(baked_artifact), "--out", str(tmp_path / "out"), "--batch-sizes", "1",
                   "--contexts", str(base_context), "--images", "1", "--warmup", "0", "--repeats", "1",
                   "--new-tokens", str(NEW_TOKENS), "--no-plots", block_torch=True)
    assert proc.returncode == 0, proc.stderr
    assert "iava" in proc.stdout
