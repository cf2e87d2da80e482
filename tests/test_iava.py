"""IAVA: the runtime (probe pass + one-batch contrastive decoding) vs the independent PyTorch reference."""

from __future__ import annotations

import shutil

import anchorrt.runtime.pipeline as pipeline_mod
import numpy as np
import pytest
from anchorrt.exporter.reference.iava import ReferenceIava, irrelevant_tokens
from anchorrt.runtime.errors import FlagError
from anchorrt.runtime.iava import GENERAL_INSTRUCTION, contrastive_scores, parse_iava, select_irrelevant
from anchorrt.runtime.pipeline import Pipeline, Request

PROMPTS = ["Is there a dog in the image?", "What is in the image? Describe it."]
ATOL = 1e-4


@pytest.fixture(scope="module")
def probe_artifact(tiny_artifact, tmp_path_factory):
    from anchorrt.graph_passes.bake import bake

    out = tmp_path_factory.mktemp("iava") / "probe"
    shutil.copytree(tiny_artifact, out)
    bake(out, ["probe"])
    return out


@pytest.fixture(scope="module")
def reference(tiny_model):
    return ReferenceIava(tiny_model)


@pytest.fixture
def recorded_scores(monkeypatch):
    """The runtime's combined scores per step (the contrastive_scores the pipeline calls), for the parity check."""
    calls: list[np.ndarray] = []

    def spy(*args, **kwargs):
        out = contrastive_scores(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(pipeline_mod, "contrastive_scores", spy)
    return calls


@pytest.mark.parametrize("prompt,i", [(PROMPTS[0], 0.5), (PROMPTS[1], 4), (PROMPTS[0], None)])
def test_runtime_matches_reference(probe_artifact, reference, images, recorded_scores, prompt, i):
    pipe = Pipeline.from_dir(probe_artifact)
    template = pipe.manifest.prompt["template"]
    got = pipe.generate(images[0], prompt, max_new_tokens=16, mitigation={"iava": {"i": i}})
    want = reference.generate(images[0], prompt, template, i=i, max_new_tokens=16)
    assert got.details["iava"]["irrelevant"] == want.irrelevant
    np.testing.assert_allclose(got.details["iava"]["att_general"], want.att_general.numpy(), atol=1e-6)
    np.testing.assert_allclose(got.details["iava"]["att_query"], want.att_query.numpy(), atol=1e-6)
    assert got.token_ids == want.tokens
    for step in range(3):
        diff = np.abs(recorded_scores[step][0] - want.logits[step].numpy())
        finite = np.isfinite(want.logits[step].numpy())
        assert diff[finite].max() <= ATOL, (step, diff[finite].max())


def test_not_vacuous(probe_artifact, images):
    """With these settings the contrastive stream changes what is generated."""
    pipe = Pipeline.from_dir(probe_artifact)
    plain = pipe.generate(images[0], PROMPTS[0], max_new_tokens=16)
    iava = pipe.generate(images[0], PROMPTS[0], max_new_tokens=16, mitigation={"iava": {"i": 0.5, "alpha": 1.0}})
    assert iava.details["iava"]["irrelevant"] and plain.token_ids != iava.token_ids


def test_alpha_zero_is_plain_decoding(probe_artifact, images):
    pipe = Pipeline.from_dir(probe_artifact)
    for img, prompt in zip(images, PROMPTS):
        plain = pipe.generate(img, prompt, max_new_tokens=16).token_ids
        assert pipe.generate(img, prompt, max_new_tokens=16, mitigation={"iava": {"alpha": 0.0}}).token_ids == plain


def test_empty_irrelevant_set_hides_every_image_key(probe_artifact, reference, images):
    """i = 0: I is empty, so V* hides all of V (METHODS.md step 3); runtime and reference agree."""
    pipe = Pipeline.from_dir(probe_artifact)
    got = pipe.generate(images[1], PROMPTS[0], max_new_tokens=12, mitigation={"iava": {"i": 0}})
    want = reference.generate(images[1], PROMPTS[0], pipe.manifest.prompt["template"], i=0, max_new_tokens=12)
    assert got.details["iava"]["irrelevant"] == [] == want.irrelevant
    assert got.token_ids == want.tokens


def test_all_tokens_irrelevant_is_plain_decoding(probe_artifact, images, monkeypatch):
    """I = V: V* sees what V sees, the two log-probabilities cancel to the plain ones, decoding is plain."""
    monkeypatch.setattr(pipeline_mod, "select_irrelevant", lambda g, q, count, lam: np.ones(len(g), dtype=bool))
    pipe = Pipeline.from_dir(probe_artifact)
    plain = pipe.generate(images[0], PROMPTS[1], max_new_tokens=16).token_ids
    got = pipe.generate(images[0], PROMPTS[1], max_new_tokens=16, mitigation={"iava": {"alpha": 1.0}})
    assert got.details["iava"]["irrelevant"] == list(range(pipe.tokens_per_image))
    assert got.token_ids == plain


def test_batched_requests_match_one_by_one(probe_artifact, images):
    """Requests batch (two streams each), IAVA and plain rows in one call, each as if alone."""
    pipe = Pipeline.from_dir(probe_artifact)
    reqs = [Request(images[0], PROMPTS[0], {"iava": {"i": 0.5}}), Request(images[1], PROMPTS[1]),
            Request(images[2], PROMPTS[1], {"iava": {"i": 3, "alpha": 2.0}})]
    together = pipe.generate_batch(reqs, max_new_tokens=10)
    alone = [pipe.generate_batch([r], max_new_tokens=10)[0] for r in reqs]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert together[1].details == {} and together[0].details["iava"]["irrelevant"]


def test_selection_rule_by_hand():
    g = np.array([0.30, 0.10, 0.25, 0.05, 0.30])
    q = np.array([0.10, 0.20, 0.05, 0.05, 0.10])
    # delta = [.2, -.1, .2, 0, .2]; top-2 by delta with ties to the lower index = {0, 2}; mu_G = 0.2 -> g > 0.2
    assert select_irrelevant(g, q, 2, 0.0).tolist() == [True, False, True, False, False]
    assert select_irrelevant(g, q, 3, 0.0).tolist() == [True, False, True, False, True]
    assert not select_irrelevant(g, q, 5, 10.0).any()  # threshold above every att_G
    assert not select_irrelevant(g, q, 0, -10.0).any()
    # the reference's independent implementation agrees on random cases
    import torch

    rng = np.random.default_rng(0)
    for _ in range(50):
        g, q = rng.random(20), rng.random(20)
        g[rng.integers(0, 20, 5)] = 0.5  # ties
        count, lam = int(rng.integers(0, 21)), float(rng.normal())
        want = irrelevant_tokens(torch.from_numpy(g), torch.from_numpy(q), count, lam)
        assert np.flatnonzero(select_irrelevant(g, q, count, lam)).tolist() == want


@pytest.mark.parametrize("i,n,want", [
    (0.28, 25, 7), (0.07, 100, 7), (0.1, 30, 3), (None, 30, 3), (None, 576, 58), (0.3, 10, 3), (0.29, 100, 29),
    (0.57, 100, 57), (0.01, 100, 1), (0.011, 100, 2), (0.5, 25, 13), (1.0, 25, 25), (np.float32(0.28), 25, 7),
    (np.float64(0.07), 100, 7), ("0.28", 25, 7), ("0.07", 100, 7), ("7", 25, 7),
])
def test_fraction_count_is_exact(i, n, want):
    """Issue 13 item 5: `i` as a fraction selects ceil of the exact product (0.28 * 25 is 7.000000000000001 in
    floating point, which used to give 8); the runtime and the reference agree; strings are the CLI's --iava-i."""
    from anchorrt.exporter.reference.iava import count_from

    from anchorrt.cli_mitigation import _count_or_fraction

    if isinstance(i, str):
        i = _count_or_fraction(i)
    params = parse_iava({"i": i}) if i is not None else parse_iava(True)
    assert params.count(n) == want
    assert count_from(params.i, n) == want


def test_plausibility_cutoff():
    logits = np.array([[4.0, 3.0, 0.0, -2.0]])
    star = np.array([[4.0, 0.0, 0.0, 0.0]])
    scores = contrastive_scores(logits, star, np.array([1.0]), np.array([0.2]))
    p = np.exp(logits - logits.max())
    keep = (p / p.sum() >= 0.2 * (p / p.sum()).max())[0]
    assert np.isinf(scores[0][~keep]).all() and np.isfinite(scores[0][keep]).all()
    assert np.argmax(scores) == 1  # the contrast prefers the token the image-less stream does not explain


@pytest.mark.parametrize("spec,fragment", [
    ({"alpha": -1}, "alpha must be >= 0"), ({"alpha": float("nan")}, "alpha"), ({"i": 1.5}, "fraction in (0, 1]"),
    ({"i": -2}, "count >= 0"), ({"instruction": "  "}, "instruction"), ({"beta_cut": 2}, "beta_cut"),
    ({"lambda": float("inf")}, "lambda"), ({"gamma": 1}, "unknown iava parameter"), ("yes", "true/false or a dict"),
])
def test_bad_values(spec, fragment):
    with pytest.raises(FlagError, match=None) as err:
        parse_iava(spec)
    assert fragment in str(err.value)


def test_needs_the_probe(tiny_artifact, images):
    pipe = Pipeline.from_dir(tiny_artifact)
    with pytest.raises(FlagError, match="--mitigation probe"):
        pipe.generate(images[0], PROMPTS[0], mitigation={"iava": True})


def test_cli_iava_onnx_and_torch_agree(probe_artifact, tiny_model, images, tmp_path):
    import json

    from tests.conftest import run_cli

    img = tmp_path / "img.png"
    images[0].save(img)
    args = ["--image", str(img), "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--json", "--iava", "--iava-i", "0.5"]
    onnx = run_cli("generate", str(probe_artifact), *args, block_torch=True)
    assert onnx.returncode == 0, onnx.stderr
    torch_run = run_cli("generate", str(tiny_model), "--backend", "torch", *args)
    assert torch_run.returncode == 0, torch_run.stderr
    assert json.loads(onnx.stdout)["token_ids"] == json.loads(torch_run.stdout)["token_ids"]
    for bad, fragment in ((["--iava-i", "many"], "--iava-i takes a count"), (["--iava-alpha", "-1"], "alpha must be"),
                          (["--no-iava", "--iava-alpha", "2"], "cannot be combined")):
        proc = run_cli("generate", str(probe_artifact), "--image", str(img), "--prompt", "hi", *bad)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _uncompacted(monkeypatch):
    monkeypatch.setattr(pipeline_mod, "compaction_allowed", lambda *args: False)


def _record_passes(pipe, monkeypatch) -> list[tuple[int, tuple | None]]:
    """(new tokens, rows) of every decoder pass `pipe` runs from now on."""
    passes = []
    decode = pipe._decode

    def recording(embeds, *args, **kwargs):
        passes.append((embeds.shape[1], kwargs.get("rows")))
        return decode(embeds, *args, **kwargs)

    monkeypatch.setattr(pipe, "_decode", recording)
    return passes


def _assert_same_scores(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want) > 1
    for a, b in zip(got, want):
        finite = np.isfinite(b)
        assert np.array_equal(finite, np.isfinite(a)) and np.abs(a - b)[finite].max() <= 1e-5


@pytest.mark.parametrize("i", [0.5, 0, None])
def test_compacted_contrastive_rows_decode_the_same(probe_artifact, images, recorded_scores, monkeypatch, i):
    """The V* row keeps only the slots it sees (fused form, host cache): each step reads prompt - |V \\ I| slots; the
    prefix G and Q share is computed once; the tokens and the combined scores equal those of the full passes (the
    keys V* hid contributed exactly 0; the shared prefix holds the same keys in both rows)."""
    pipe = Pipeline.from_dir(probe_artifact)
    assert pipe.manifest.row_lengths
    passes = _record_passes(pipe, monkeypatch)
    got = pipe.generate(images[0], PROMPTS[1], max_new_tokens=12, mitigation={"iava": {"i": i}})
    compacted = [s.copy() for s in recorded_scores]
    hidden = pipe.tokens_per_image - len(got.details["iava"]["irrelevant"])
    assert hidden > 0 and got.details["iava"]["contrastive_slots"] == got.prompt_tokens - hidden
    # the prefill passes, one cache row each (G: row 0, then V*; Q: row 1): the prefix G and Q share (the template
    # before the image, the image) once in Q's row, G's and Q's own text over it, then V* over the image tokens it
    # sees and the text (the template prefix copied from Q's row)
    prefix = pipe.prompts.encode(PROMPTS[1]).spans[0][0]  # text before the image
    shared = prefix + pipe.tokens_per_image
    general = len(pipe.prompts.encode(GENERAL_INSTRUCTION).ids)
    assert passes[:4] == [(shared, (1, 1)), (general - shared, (0, 1)), (got.prompt_tokens - shared, (1, 1)),
                          (got.prompt_tokens - hidden - prefix, (0, 1))], passes[:5]
    assert all(rows is None and n == 1 for n, rows in passes[4:])  # then one decode step of both streams at a time
    assert got.details["iava"]["shared_prefix"] == shared
    recorded_scores.clear()
    _uncompacted(monkeypatch)
    full = pipe.generate(images[0], PROMPTS[1], max_new_tokens=12, mitigation={"iava": {"i": i}})
    assert full.details["iava"]["contrastive_slots"] == full.prompt_tokens and full.details["iava"]["shared_prefix"] == 0
    assert got.token_ids == full.token_ids
    _assert_same_scores(compacted, recorded_scores)


def test_compacted_rows_drop_left_padding_too(probe_artifact, images, monkeypatch):
    """Batched IAVA requests of different prompt lengths (left padding): each V* row keeps its own visible slots
    (no padding), decodes at its own length, and the tokens equal the uncompacted batch's."""
    pipe = Pipeline.from_dir(probe_artifact)
    reqs = [Request(images[0], PROMPTS[0], {"iava": {"i": 0.5}}), Request(images[2], PROMPTS[1], {"iava": {"i": 3}})]
    together = pipe.generate_batch(reqs, max_new_tokens=10)
    for g in together:
        hidden = pipe.tokens_per_image - len(g.details["iava"]["irrelevant"])
        assert g.details["iava"]["contrastive_slots"] == g.prompt_tokens - hidden
    assert together[0].prompt_tokens != together[1].prompt_tokens
    _uncompacted(monkeypatch)
    assert [g.token_ids for g in pipe.generate_batch(reqs, max_new_tokens=10)] == [g.token_ids for g in together]


def test_no_compaction_when_a_key_reading_method_is_on(baked_artifact, images):
    """CLVA and SEVI index every row by the batch's common length: with either on, V* stays full length."""
    pipe = Pipeline.from_dir(baked_artifact)
    got = pipe.generate(images[0], PROMPTS[0], max_new_tokens=4, mitigation={"iava": {"i": 0.5}, "sevi": True})
    assert got.details["iava"]["contrastive_slots"] == got.prompt_tokens
    got = pipe.generate(images[0], PROMPTS[0], max_new_tokens=4, mitigation={"iava": {"i": 0.5}})
    assert got.details["iava"]["contrastive_slots"] < got.prompt_tokens


def test_no_compaction_for_an_artifact_without_row_lengths(probe_artifact, images, tmp_path):
    """A fused artifact from before `attention.row_lengths` gives every row total_length - 1 slots: never compacted."""
    import json

    old = tmp_path / "old"
    shutil.copytree(probe_artifact, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["attention"]["row_lengths"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.from_dir(old, verify=False)
    assert not pipe.manifest.row_lengths
    got = pipe.generate(images[0], PROMPTS[0], max_new_tokens=4, mitigation={"iava": {"i": 0.5}})
    assert got.details["iava"]["contrastive_slots"] == got.prompt_tokens


def test_compact_row_moves_the_slots_in_place():
    from anchorrt.runtime.kv_cache import KVCache

    cache = KVCache(2, 2, 3, 4, 10, in_place=True)
    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((2, 3, 7, 4)).astype(np.float32) for _ in range(2)]
    for layer in range(2):
        cache.load(layer, keys[layer], -keys[layer])
    cache.length = 7
    keep = np.array([0, 2, 3, 6])
    assert cache.compact_row(1, keep) == 4
    for layer in range(2):
        k, v = cache.layer(layer)
        np.testing.assert_array_equal(k[0], keys[layer][0])  # the other row is untouched
        np.testing.assert_array_equal(k[1, :, :4], keys[layer][1][:, keep])
        np.testing.assert_array_equal(v[1, :, :4], -keys[layer][1][:, keep])
    for bad in ([3, 2], [0, 7], [-1]):
        with pytest.raises(ValueError, match="ascending"):
            cache.compact_row(0, np.array(bad))
    with pytest.raises(ValueError, match="outside"):
        cache.compact_row(2, keep)
    with pytest.raises(ValueError, match="in-place"):
        KVCache(1, 1, 1, 2, 4).compact_row(0, np.array([0]))


def test_append_token_puts_each_new_token_at_its_row_length():
    from anchorrt.runtime.iava import append_token, compacted_mask

    hidden = np.array([[0, 1, 0, 1, 1], [1, 1, 1, 1, 1]])
    mask = np.concatenate([compacted_mask(hidden[:1], np.array([3])), [[0, 1, 1, 1, 1]]])
    mask, lengths = append_token(mask, np.array([3, 5]))
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    assert lengths.tolist() == [4, 6]


def test_shared_prefix_runs_in_chunks_like_a_plain_prefill(probe_artifact, images, recorded_scores, monkeypatch):
    """The prefix G and Q share is prefilled in chunks of `prefill_chunk` (each over the cache the ones before it
    wrote), as a plain prefill on the CPU is; tokens and scores equal the one-pass prefix."""
    pipe = Pipeline.from_dir(probe_artifact)
    pipe.prefill_chunk = 0  # one pass
    whole = pipe.generate(images[1], PROMPTS[0], max_new_tokens=10, mitigation={"iava": {"i": 0.5}})
    one_pass = [s.copy() for s in recorded_scores]
    recorded_scores.clear()
    pipe.prefill_chunk = 7
    passes = _record_passes(pipe, monkeypatch)
    chunked = pipe.generate(images[1], PROMPTS[0], max_new_tokens=10, mitigation={"iava": {"i": 0.5}})
    shared = chunked.details["iava"]["shared_prefix"]
    assert shared > 7 and [n for n, rows in passes[:-(len(chunked.token_ids) - 1) - 3]] == \
        [7] * (shared // 7) + ([shared % 7] if shared % 7 else [])
    assert chunked.token_ids == whole.token_ids
    _assert_same_scores(recorded_scores, one_pass)


@pytest.mark.parametrize("template", ["USER: {prompt}\n<image> Answer: ASSISTANT:", "USER: {prompt} ASSISTANT: <image>"])
def test_templates_the_shortcuts_do_not_fit(probe_artifact, images, recorded_scores, monkeypatch, template):
    """The prompt before the image (G and Q differ before the image's end: no shared prefix, V* still compacted) and
    the image last (no text after it: neither); tokens and scores equal the full passes either way."""
    pipe = Pipeline.from_dir(probe_artifact)
    placeholder = pipe.prompts.placeholder
    pipe.prompts.template = template.replace("<image>", placeholder)
    got = pipe.generate(images[0], PROMPTS[1], max_new_tokens=8, mitigation={"iava": {"i": 0.5}})
    details = got.details["iava"]
    assert details["shared_prefix"] == 0
    # V* is compacted unless the prompt's last token is an image token it hides (its own logits are needed)
    last_hidden = template.endswith("<image>") and pipe.tokens_per_image - 1 not in details["irrelevant"]
    hidden = pipe.tokens_per_image - len(details["irrelevant"])
    assert details["contrastive_slots"] == (got.prompt_tokens if last_hidden else got.prompt_tokens - hidden)
    fast = [s.copy() for s in recorded_scores]
    recorded_scores.clear()
    _uncompacted(monkeypatch)
    full = pipe.generate(images[0], PROMPTS[1], max_new_tokens=8, mitigation={"iava": {"i": 0.5}})
    assert got.token_ids == full.token_ids
    _assert_same_scores(fast, recorded_scores)
