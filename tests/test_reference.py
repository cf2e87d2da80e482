"""Tests of the independent PyTorch reference (exporter/reference): parity with Hugging Face with the flags off,
hand-checkable unit tests of CLVA and SEVI on synthetic tensors, end-to-end effects on a tiny random LLaVA."""

from __future__ import annotations

import pytest
import torch
from anchorrt.exporter.reference import (
    GLOBAL_TEXT_HEAD,
    LOCAL_TEXT_HEAD,
    NOT_CLASSIFIED,
    VISION_HEAD,
    ClvaParams,
    ReferenceLlava,
)
from anchorrt.exporter.reference.clva import (
    anchor_mask,
    anchor_weights,
    log_weight_bias,
    reweight,
    select_heads,
    visual_intensity,
)
from anchorrt.exporter.reference.sevi import classify_heads, edit_logits
from anchorrt.exporter.testing import TinyLlavaSpec, build_tiny_llava

IMAGE_TOKENS = TinyLlavaSpec().image_tokens  # 16 per 32x32 image
# Parameters that make both CLVA head sets non-empty on the tiny random model (its attention is nearly
# uniform, so the defaults lam=1, tau=2 select few heads and few anchor tokens).
CLVA_ON = {"lam": 0.0, "tau": 0.5}


@pytest.fixture(scope="module", params=["mha", "gqa"])
def models(request, tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    kv_heads = 8 if request.param == "mha" else 2
    path = build_tiny_llava(tmp_path_factory.mktemp(request.param), TinyLlavaSpec(kv_heads=kv_heads))
    hf = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    return hf, ReferenceLlava(hf)


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    path = build_tiny_llava(tmp_path_factory.mktemp("mha_only"), TinyLlavaSpec())
    hf = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    return hf, ReferenceLlava(hf)


def make_batch(ref: ReferenceLlava, rows=((3, 20), (2, 14)), images=(True, True), seed=0):
    """Left-padded batch: row = (tokens before the image, tokens after it); BOS first. -> ids, mask, pixels."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for (pre, post), has_image in zip(rows, images, strict=True):
        image = [ref.image_token_id] * IMAGE_TOKENS if has_image else []
        seqs.append([1] + torch.randint(5, 400, (pre,), generator=g).tolist() + image
                    + torch.randint(5, 400, (post,), generator=g).tolist())
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[ref.pad_token_id] * (width - len(s)) + s for s in seqs])  # [B, S]
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])  # [B, S]
    pixels = torch.randn(sum(images), 3, 32, 32, generator=g)  # [N, 3, 32, 32]
    return ids, mask, pixels


def positions_of(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------ flags off vs HF


def test_flags_off_matches_hf_prefill_and_three_decode_steps(models):
    from transformers import DynamicCache

    hf, ref = models
    ids, mask, pixels = make_batch(ref)
    with torch.no_grad():
        hf_out = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions_of(mask),
                    past_key_values=DynamicCache(config=hf.config), use_cache=True)
    out = ref.forward(ids, pixels, mask)
    real = mask.bool()  # fully padded query rows are defined differently (HF: uniform, here: zero attention)
    diffs = [(out.logits - hf_out.logits)[real].abs().max().item()]
    assert torch.isfinite(out.logits).all()
    hf_cache, cache = hf_out.past_key_values, out.cache
    token = hf_out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    for _ in range(3):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        with torch.no_grad():
            hf_out = hf(input_ids=token, attention_mask=mask, position_ids=positions_of(mask)[:, -1:],
                        past_key_values=hf_cache, use_cache=True)
        out = ref.forward(token, None, mask, cache=cache)
        diffs.append((out.logits - hf_out.logits).abs().max().item())
        hf_cache, cache = hf_out.past_key_values, out.cache
        token = hf_out.logits[:, -1].argmax(-1, keepdim=True)
    print("max |ref - hf| prefill, decode 1-3:", diffs)
    assert max(diffs) <= 1e-5


def test_greedy_16_tokens_equal_hf_generate(models):
    hf, ref = models
    ids, mask, pixels = make_batch(ref)
    eos = hf.generation_config.eos_token_id
    with torch.no_grad():
        hf_tokens = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=16,
                                do_sample=False)[:, ids.shape[1]:]
    tokens = ref.generate(ids, pixels, mask, max_new_tokens=16, eos_token_id=eos)
    assert tokens.shape == hf_tokens.shape == (2, 16)
    assert torch.equal(tokens, hf_tokens)


# ------------------------------------------------------------------------------------ CLVA unit tests


def test_select_heads_by_hand():
    phi = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])  # mean 4, population std sqrt(10) = 3.162
    sens, insens = select_heads(phi, lam=1.0)  # > 7.16, < 0.84
    assert sens.tolist() == [False, False, False, False, True] and not insens.any()
    sens, insens = select_heads(phi, lam=0.5)  # > 5.58, < 2.42
    assert sens.tolist() == [False, False, False, False, True]
    assert insens.tolist() == [True, True, False, False, False]
    sens, insens = select_heads(phi, lam=0.0)  # strict: the head at exactly the mean (4) is in neither set
    assert sens.tolist() == [False, False, False, False, True] and insens.tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_select_heads_sigma_zero_selects_nobody(lam):
    phi = torch.full((3,), 0.1)  # 3 x 0.1: the float mean is one ulp off 0.1, sigma is 0 mathematically
    sens, insens = select_heads(phi, lam)
    assert not sens.any() and not insens.any()


def test_visual_intensity_mean_over_t_rows_sum_over_v():
    probs = torch.zeros(2, 3, 4)  # [H, Q, K]
    probs[0, 1] = torch.tensor([0.5, 0.25, 0.25, 0.0])
    probs[0, 2] = torch.tensor([0.0, 0.5, 0.0, 0.5])
    probs[1, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    probs[1, 2] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    phi = visual_intensity(probs, torch.tensor([False, True, True]), torch.tensor([False, True, True, False]))
    assert phi.dtype == torch.float64
    assert phi.tolist() == [0.5, 0.5]  # head 0: (0.5 + 0.5) / 2; head 1: (1 + 0) / 2


def test_anchor_mask_z_scores_by_hand():
    visual = torch.tensor([False, True, True, True, True, False])
    probs_last = torch.zeros(3, 6)  # [H, K]
    probs_last[0, 1:5] = torch.tensor([0.1, 0.1, 0.1, 0.6])
    probs_last[2, 1:5] = torch.tensor([0.1, 0.1, 0.1, 0.4])
    probs_last[1, 1:5] = 0.9  # not in the head set: must not count
    heads = torch.tensor([True, False, True])
    # M over V = [0.1, 0.1, 0.1, 0.5]: mean 0.2, population std sqrt(0.03) = 0.1732 -> z = [-0.577 x3, 1.732]
    assert anchor_mask(probs_last, heads, visual, tau=1.0).tolist() == [False, False, False, False, True, False]
    assert not anchor_mask(probs_last, heads, visual, tau=2.0).any()
    assert anchor_mask(probs_last, heads, visual, tau=-1.0).tolist() == [False, True, True, True, True, False]
    # An empty head set gives an all-zero mask, even with a threshold every z = 0 would pass.
    assert not anchor_mask(probs_last, torch.zeros(3, dtype=torch.bool), visual, tau=-5.0).any()
    # A flat anchor map has sigma = 0: z = 0 / eps = 0 everywhere, nothing exceeds tau = 0.
    assert not anchor_mask(torch.full((3, 6), 0.25), heads, visual, tau=0.0).any()


def test_anchor_weights_and_clipping():
    zpos = torch.tensor([True, False, False, True, False])
    zneg = torch.tensor([False, True, False, True, False])
    w = anchor_weights(zpos, zneg, alpha=14.0, beta=0.9)
    torch.testing.assert_close(w, torch.tensor([15.0, 0.1, 1.0, 14.1, 1.0]))
    w = anchor_weights(zpos, zneg, alpha=14.0, beta=1.5)  # 1 - 1.5 < 0 is clipped to 0
    torch.testing.assert_close(w, torch.tensor([15.0, 0.0, 1.0, 13.5, 1.0]))


def test_reweight_by_hand():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = reweight(probs, torch.tensor([1.0, 0.0, 2.0, 1.0]))  # [0.1, 0, 0.6, 0.4] / 1.1
    torch.testing.assert_close(out, torch.tensor([0.1, 0.0, 0.6, 0.4]) / 1.1)


def test_reweight_equals_log_w_added_to_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 9, generator=g) * 3  # [B, H, Q, K]
    logits[..., 0] = float("-inf")  # a masked key: must stay at probability 0 in both forms
    w = torch.rand(2, 1, 1, 9, generator=g) * 5  # [B, 1, 1, K]
    w[..., 2:4] = 0.0  # w = 0 keys
    w[..., -1] = 1.0  # every row sees a key with w > 0 (the current token, w = 1)
    multiplied = reweight(torch.softmax(logits, -1), w)
    biased = torch.softmax(logits + log_weight_bias(w), -1)
    torch.testing.assert_close(multiplied, biased, atol=1e-6, rtol=0)
    assert (multiplied[..., 0] == 0).all() and (multiplied[..., 2:4] == 0).all()


def test_clva_layer_choices_are_validated():
    assert ClvaParams.from_spec({}, 8).layer_choice() == (0, 2, (3, 4, 5, 6, 7))
    with pytest.raises(ValueError, match="drift"):
        ClvaParams.from_spec({"drift_layers": [2, 5]}, 8)  # 2 <= max(l_neg, l_pos) = 2
    with pytest.raises(ValueError, match="drift"):
        ClvaParams.from_spec({"l_neg": 4, "drift_layers": [4]}, 8)
    with pytest.raises(ValueError, match="l_pos"):
        ClvaParams.from_spec({"l_pos": 8}, 8)
    with pytest.raises(ValueError, match="unknown"):
        ClvaParams.from_spec({"alpah": 3}, 8)


# ------------------------------------------------------------------------------------ CLVA end to end


def test_clva_changes_t_rows_only(mha):
    _, ref = mha
    ids, mask, pixels = make_batch(ref)
    plain = ref.forward(ids, pixels, mask)
    out = ref.forward(ids, pixels, mask, clva=CLVA_ON)
    dbg, t_rows = out.debug["clva"], out.debug["t_rows"]
    assert dbg["active"].all()
    assert dbg["sensitive_heads"].any(-1).all() and dbg["insensitive_heads"].any(-1).all()
    assert dbg["zpos"].any(-1).all() and dbg["zneg"].any(-1).all()
    assert not (dbg["zpos"] & ~out.debug["visual_mask"]).any() and not (dbg["zneg"] & ~out.debug["visual_mask"]).any()
    diff = (out.logits - plain.logits).abs().amax(-1)  # [B, S]
    print("CLVA(lam=0, tau=0.5) max |on - off| over T rows:", diff[t_rows].max().item())
    assert diff[t_rows].max() > 1e-3
    assert diff[~t_rows & mask.bool()].max() == 0  # S and V rows are never changed


def test_clva_anchors_recomputed_each_step_or_frozen(mha):
    _, ref = mha
    ids, mask, pixels = make_batch(ref)
    for freeze in (False, True):
        params = dict(CLVA_ON, freeze_anchors=freeze)
        out = ref.forward(ids, pixels, mask, clva=params)
        prefill_zpos = out.debug["clva"]["zpos"]
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        step = ref.forward(out.logits[:, -1].argmax(-1, keepdim=True), None, step_mask, cache=out.cache, clva=params)
        dbg = step.debug["clva"]
        assert dbg["active"].all() and dbg["from_frozen"].all() == freeze
        assert torch.equal(dbg["zpos"][:, :-1], prefill_zpos) or not freeze
        assert not dbg["zpos"][:, -1].any()  # a generated position is never visual, so never an anchor
        if not freeze:
            assert dbg["phi_pos"].abs().sum() > 0  # statistics of this step's own row


def test_generated_image_token_is_not_visual(mha):
    _, ref = mha
    ids, mask, pixels = make_batch(ref)
    out = ref.forward(ids, pixels, mask)
    assert torch.equal(out.cache.visual_mask, ids == ref.image_token_id)
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    token = torch.full((2, 1), ref.image_token_id)
    step = ref.forward(token, None, step_mask, cache=out.cache, clva=CLVA_ON)
    assert not step.debug["visual_mask"][:, -1].any() and step.debug["t_rows"].all()
    assert torch.equal(step.cache.visual_mask[:, :-1], ids == ref.image_token_id)


# ------------------------------------------------------------------------------------ SEVI


def test_sevi_classification_by_hand():
    # keys 0..2 = system + image (last image position 2), keys 3..5 = text after the image (incl. current row)
    probs_last = torch.tensor([
        [0.4, 0.3, 0.1, 0.1, 0.05, 0.05],  # 0.8 on the image side -> vision head
        [0.125, 0.125, 0.25, 0.25, 0.125, 0.125],  # 0.5 vs 0.5: equal masses make a text head; max 0.25 <= 0.5*0.5
        [0.0625, 0.0625, 0.0625, 0.0625, 0.0625, 0.6875],  # text 0.8125, max 0.6875 > 0.5*0.8125 -> local
    ], dtype=torch.float64)
    assert classify_heads(probs_last, 2, kappa=0.5).tolist() == [VISION_HEAD, GLOBAL_TEXT_HEAD, LOCAL_TEXT_HEAD]
    assert classify_heads(probs_last, 2, kappa=0.1).tolist() == [VISION_HEAD, LOCAL_TEXT_HEAD, LOCAL_TEXT_HEAD]
    # The last row is the image's end: no key after it, so no text head at all.
    assert classify_heads(probs_last, 5, kappa=0.5).tolist() == [VISION_HEAD] * 3


def test_sevi_steps_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0],  # vision
                           [0.0, 0.0, 6.0, 0.0],  # global
                           [2.0, 4.0, 0.0, 0.0],  # global
                           [2.0, -2.0, 0.0, 8.0],  # local
                           [4.0, 0.0, -2.0, 0.0]])  # local
    classes = torch.tensor([VISION_HEAD, GLOBAL_TEXT_HEAD, GLOBAL_TEXT_HEAD, LOCAL_TEXT_HEAD, LOCAL_TEXT_HEAD])
    edited, step1, step2 = edit_logits(logits, classes, omega=0.5)
    assert step1 and step2
    # step 1: ([1,2,3,4] + 0.5 * mean([0,0,6,0],[2,4,0,0]) = 0.5*[1,2,3,0]) / 1.5, from unedited global logits
    torch.testing.assert_close(edited[0], torch.tensor([1.0, 2.0, 3.0, 8.0 / 3.0]))
    # step 2: (global + 0.5 * elementwise max of the local heads [4,0,0,8]) / 1.5
    torch.testing.assert_close(edited[1], torch.tensor([4.0 / 3.0, 0.0, 4.0, 8.0 / 3.0]))
    torch.testing.assert_close(edited[2], torch.tensor([8.0 / 3.0, 8.0 / 3.0, 0.0, 8.0 / 3.0]))
    assert torch.equal(edited[3:], logits[3:])  # local heads are never edited
    # Steps that lack a head class are left out.
    for kept, want in (([0, 3, 4], (False, False)), ([0, 1], (True, False)), ([1, 3], (False, True))):
        edited, step1, step2 = edit_logits(logits[kept], classes[kept], omega=0.5)
        assert (step1, step2) == want
        if want == (False, False):
            assert torch.equal(edited, logits[kept])
    # omega = 0 is the unchanged model
    assert torch.equal(edit_logits(logits, classes, omega=0.0)[0], logits)


def test_sevi_keeps_masked_keys_masked():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, generator=g)  # [H, K]
    classes = torch.tensor([VISION_HEAD, GLOBAL_TEXT_HEAD, GLOBAL_TEXT_HEAD, LOCAL_TEXT_HEAD, LOCAL_TEXT_HEAD])
    masked = torch.tensor([True, False, False, True, False, False, False])  # the same keys for every head
    edited_raw, *_ = edit_logits(logits, classes, 0.5)
    edited_masked, *_ = edit_logits(logits.masked_fill(masked, float("-inf")), classes, 0.5)
    assert torch.isneginf(edited_masked[:, masked]).all()
    torch.testing.assert_close(edited_masked[:, ~masked], edited_raw[:, ~masked])


def test_sevi_default_start_layer_leaves_8_layer_model_unchanged_and_start_2_changes_it(mha):
    _, ref = mha
    ids, mask, pixels = make_batch(ref)
    plain = ref.forward(ids, pixels, mask)
    literal = ref.forward(ids, pixels, mask, sevi={})  # start_layer 8 on layers 0..7: nothing to edit
    assert torch.equal(literal.logits, plain.logits) and literal.debug["sevi"] is None
    out = ref.forward(ids, pixels, mask, sevi={"start_layer": 2})
    layers = out.debug["sevi"]
    assert sorted(layers) == list(range(2, 8))
    assert any(d["step1"].any() for d in layers.values())
    assert all((d["head_class"] != NOT_CLASSIFIED).all() for d in layers.values())
    diff = (out.logits - plain.logits).abs().amax(-1)  # [B, S]
    print("SEVI(start_layer=2) max |on - off| at the last row:", diff[:, -1].max().item())
    assert diff[:, -1].max() > 1e-3
    assert diff[:, :-1].max() == 0  # only the last query row of the pass is edited


# ------------------------------------------------------------------------------------ per-row flags


def test_per_row_flags_row_off_equals_plain_model(mha):
    _, ref = mha
    ids, mask, pixels = make_batch(ref)
    plain = ref.forward(ids, pixels, mask)
    for clva, sevi in (([CLVA_ON, None], None), (None, [{"start_layer": 2}, None]),
                       ([CLVA_ON, None], [{"start_layer": 2}, None])):
        out = ref.forward(ids, pixels, mask, clva=clva, sevi=sevi)
        assert torch.equal(out.logits[1], plain.logits[1])
        assert (out.logits[0] - plain.logits[0]).abs().max() > 1e-3
    on_off = ref.generate(ids, pixels, mask, 6, clva=[CLVA_ON, None], sevi=[{"start_layer": 2}, None])
    assert torch.equal(on_off[1], ref.generate(ids, pixels, mask, 6)[1])


def test_rows_without_image_are_unchanged(mha):
    _, ref = mha
    ids, mask, pixels = make_batch(ref, images=(True, False))
    plain = ref.forward(ids, pixels, mask)
    out = ref.forward(ids, pixels, mask, clva=CLVA_ON, sevi={"start_layer": 2})
    assert torch.equal(out.logits[1], plain.logits[1])
    assert not out.debug["clva"]["active"][1] and not out.debug["t_rows"][1].any()
    assert all((d["head_class"][1] == NOT_CLASSIFIED).all() for d in out.debug["sevi"].values())


def test_enabled_rows_must_share_layer_choices(mha):
    _, ref = mha
    ids, mask, pixels = make_batch(ref)
    with pytest.raises(ValueError, match="layer choice"):
        ref.forward(ids, pixels, mask, clva=[{"l_pos": 2}, {"l_pos": 3}])
    with pytest.raises(ValueError, match="2 per-row"):
        ref.forward(ids[:1], pixels[:1], mask[:1], clva=[None, None])
