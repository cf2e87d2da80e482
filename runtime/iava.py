"""IAVA in the runtime: instruction-aligned irrelevant tokens and contrastive decoding (METHODS.md "IAVA";
arXiv 2503.18556). No torch.

    pipe.generate(image, "Is there a dog in the image?", mitigation={"iava": {"alpha": 1.0, "i": 0.1}})

Per request:
1. One prefill pass of two rows, the general instruction G and the query Q through the same chat template and
   image, with the attention probe on (`probe.attention`: the last row's attention over the keys, mean over heads,
   per probed layer) → att_G(j), att_Q(j) at the image positions, each the mean over the probed layers.
2. `select_irrelevant`: delta = att_G - att_Q; I = {delta > 0} ∩ top-i of delta over all of V (ties to the lower
   index) ∩ {att_G > mu_G + lam * sigma_G} (population std).
3. V*: the attention mask is zero at the image positions not in I (every layer, prefill and decode), positions
   unchanged. The Q row of pass 1 already is the main stream's prefill; the V* prefill writes its cache into the
   G row's slot, so both streams then decode as ONE batch of two rows sharing the image features.
4. `contrastive_scores`: (1 + a) * log_softmax(l) - a * log_softmax(l*), with the optional plausibility cut-off
   (keep tokens whose original probability is at least beta_cut times the maximum).

Shared and compacted passes (fused decoder that reads each row's length from its mask, Manifest.row_lengths; host
cache; no key-reading decoder method on: `compaction_allowed`; runtime/pipeline.py `_shared_probe_prefill`,
`_contrastive_prefill`):
- G and Q hold the same tokens at the same positions through the end of the image, and a causal row there sees only
  that prefix, so its keys and values are the same in both rows: it is computed once (in Q's cache row) and its
  slots copied into G's row; G's and Q's own text then run over it with the probe on.
- V* never attends to the image keys outside I (nor to left padding), and no row reads their keys, so they are
  never computed: V*'s template prefix is copied from Q's row and one pass covers the image tokens in I and the
  text, at their own positions, stored right after it. Each V* step then reads |S| + |I| + |T| slots instead of
  the whole prompt (LLaVA-1.5: 576 image tokens, i = 10% keeps 58).
- Every row holds its real tokens from slot 0 and decodes with a mask of ones up to its own length (`append_token`):
  the same keys, values and positions (the rotary is applied before the cache), the same softmax over the same terms
  up to summation order. `compact_contrastive_rows` gives a full-length V* prefill's cache that layout (what
  scripts/bench_peers.py does).
None of it with CLVA or SEVI on (their subgraphs index every row by the batch's common length), on an artifact
without row_lengths, or on a device cache (CUDA, TensorRT): then the full passes above. The G/Q prefix is not
shared with prompt-conditioned image features (InstructBLIP: G's differ) or when G and Q differ before the image's
end. scripts/bench_iava.py measures both forms in one run; the tests check both give the same tokens and scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from anchorrt.runtime.errors import FlagError

GENERAL_INSTRUCTION = "Describe the content of the image."
PROBE_ENABLE = "probe.enable"
PROBE_OUTPUT = "probe.attention"
DEFAULT_FRACTION = Fraction(1, 10)  # default i: 10% of the visual tokens, rounded up (METHODS.md "IAVA")
MAX_ALPHA = 1e4  # contrast strength bound: keeps (1 + a) * log-probabilities far inside float32


@dataclass(frozen=True)
class IavaParams:
    alpha: float = 1.0
    i: int | float | None = None  # a count of image tokens, or a fraction in (0, 1]; None: 10%, rounded up
    lam: float = 0.0  # LLaVA: 0 (InstructBLIP: -0.1)
    instruction: str = GENERAL_INSTRUCTION
    beta_cut: float | None = None  # plausibility cut-off; None: off

    def count(self, num_visual: int) -> int:
        """|top-i| for `num_visual` image tokens. A fraction is rounded up (METHODS.md "IAVA") from the exact
        product of the decimal the user wrote (the float's shortest repr) and the count: 0.28 of 25 is 7 and 0.07 of
        100 is 7, where the float products (7.000000000000001, 7.000000000000001) would round up to 8."""
        if self.i is None:
            return math.ceil(DEFAULT_FRACTION * num_visual)
        if isinstance(self.i, float):
            return min(math.ceil(Fraction(repr(self.i)) * num_visual), num_visual)
        return min(int(self.i), num_visual)


def _number(key: str, value: Any, rule: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FlagError(f"iava {key} must be a number {rule}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or not ok(v):
        raise FlagError(f"iava {key} must be {rule}, got {value!r}")
    return v


def parse_iava(spec: Any) -> IavaParams | None:
    """`True` / a dict of parameters → IavaParams; `False`/`None` → None (off). Bad values → FlagError."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return IavaParams()
    if not isinstance(spec, dict):
        raise FlagError(f"iava must be true/false or a dict of parameters, got {type(spec).__name__}")
    known = {"alpha", "i", "lambda", "lam", "instruction", "beta_cut"}
    unknown = set(spec) - known
    if unknown:
        raise FlagError(f"unknown iava parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    if "alpha" in spec:
        # bounded: the scores are float64 cast to float32, and (1 + a) * logp past ~1e38 would become inf (then a
        # sampled step fails on NaN probabilities); METHODS.md uses a = 1 (found by scripts/security_report.py)
        kw["alpha"] = _number("alpha", spec["alpha"], f">= 0 and <= {MAX_ALPHA:g}", lambda v: 0 <= v <= MAX_ALPHA)
    if "i" in spec and spec["i"] is not None:
        i = spec["i"]
        if isinstance(i, bool) or not isinstance(i, (int, float, np.integer, np.floating)):
            raise FlagError(f"iava i must be a count (integer >= 0) or a fraction in (0, 1], got {i!r}")
        if isinstance(i, (int, np.integer)):
            if i < 0:
                raise FlagError(f"iava i must be a count >= 0 or a fraction in (0, 1], got {i}")
            kw["i"] = int(i)
        else:
            if isinstance(i, np.floating):  # its own shortest repr: np.float32(0.28) means 0.28, not 0.2800000011920929
                i = float(np.format_float_positional(i, unique=True, trim="0"))
            kw["i"] = _number("i", i, "a fraction in (0, 1] (or an integer count)", lambda v: 0 < v <= 1)
    lam_key = "lambda" if "lambda" in spec else "lam" if "lam" in spec else None
    if lam_key:
        kw["lam"] = _number("lambda", spec[lam_key], "a finite number", lambda v: True)
    if "instruction" in spec:
        text = spec["instruction"]
        if not isinstance(text, str) or not text.strip():
            raise FlagError("iava instruction must be a non-empty text (the general instruction G)")
        kw["instruction"] = text
    if spec.get("beta_cut") is not None:
        kw["beta_cut"] = _number("beta_cut", spec["beta_cut"], "in [0, 1]", lambda v: 0 <= v <= 1)
    return IavaParams(**kw)


def select_irrelevant(att_general: np.ndarray, att_query: np.ndarray, count: int, lam: float) -> np.ndarray:
    """[T] attentions → [T] bool mask of the irrelevant image tokens I."""
    g = np.asarray(att_general, dtype=np.float64)
    delta = g - np.asarray(att_query, dtype=np.float64)
    # stable sort of -delta: equal deltas keep index order, so ties go to the lower index
    top = np.zeros(len(g), dtype=bool)
    top[np.argsort(-delta, kind="stable")[:count]] = True
    return top & (delta > 0) & (g > g.mean() + lam * g.std())


def compaction_allowed(row_lengths: bool, cache, extra: dict) -> bool:
    """V* rows can be compacted: the decoder reads per-row lengths, the cache is a host in-place one, and no
    decoder method that reads the keys is on (every `*.enable` feed false)."""
    flags = [v for k, v in extra.items() if k.endswith(".enable")]
    return row_lengths and cache.compactable and not any(np.any(v) for v in flags)


def compact_contrastive_rows(cache, hidden: np.ndarray) -> np.ndarray:
    r"""After the V* prefill, rows 0..b-1 of `cache` hold the V* stream (`hidden` [b, S]: its mask, 0 at V \ I and
    at left padding). Keep only each row's visible slots, in order, at the front of its row -> [b] new lengths."""
    return np.array([cache.compact_row(r, np.flatnonzero(hidden[r])) for r in range(hidden.shape[0])],
                    dtype=np.int64)


def compacted_mask(hidden: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The decode mask of compacted V* rows: ones up to each row's length, zeros after (width S)."""
    return (np.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(np.int64)


def append_token(mask: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask of the next decode step: one column more, with each row's new token at its own length (the slot
    the fused decoder writes it to; = the new last column for a row of full length) -> (mask, lengths + 1)."""
    rows = np.arange(mask.shape[0])
    out = np.concatenate([mask, np.zeros((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
    out[rows, lengths] = 1
    return out, lengths + 1


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis in float32, the reference's (torch.log_softmax of float32 logits), with the
    normaliser summed in float64. float32 throughout: the float64 form cost ~3x as much per token (IAVA runs it on
    every step of both streams)."""
    x = np.asarray(x, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


def contrastive_scores(logits: np.ndarray, logits_star: np.ndarray, alpha: np.ndarray,
                       beta_cut: np.ndarray | None = None) -> np.ndarray:
    """logits, logits_star [B, V]; alpha [B]; beta_cut [B] (nan = off) → scores [B, V] (float32, as the reference
    computes them)."""
    lp, lp_star = log_softmax(logits), log_softmax(logits_star)
    a = np.asarray(alpha, dtype=np.float32)[:, None]
    scores = (1 + a) * lp - a * lp_star
    if np.any(a == 0):
        scores = np.where(a == 0, lp, scores)  # exactly the plain log-probabilities when a = 0
    if beta_cut is not None:
        cut = np.asarray(beta_cut, dtype=np.float64)[:, None]
        # p >= beta * max p  ⇔  log p >= log beta + max log p
        keep = np.isnan(cut) | (lp >= np.log(np.maximum(cut, 1e-300)) + lp.max(axis=-1, keepdims=True))
        scores = np.where(keep, scores, np.float32(-np.inf))
    return scores.astype(np.float32, copy=False)
