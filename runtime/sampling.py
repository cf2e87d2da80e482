"""Next-token selection: repetition penalty, temperature, top-k, top-p, greedy or seeded sampling.

Order and semantics follow transformers' logits processors (repetition penalty on every token already in the
sequence, prompt included; then temperature, top-k, top-p), so greedy decoding is token-identical and sampling
is distributionally the same (the random streams differ: numpy's, seeded per request).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from anchorrt.runtime.errors import FlagError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def validate(self) -> SamplingConfig:
        def finite(name: str, v, lo: float, lo_open: bool = False, hi: float | None = None) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise FlagError(f"{name} must be a finite number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
                bound = f"> {lo}" if lo_open else f">= {lo}"
                raise FlagError(f"{name} must be {bound}{f' and <= {hi}' if hi is not None else ''}, got {v!r}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise FlagError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        finite("temperature", self.temperature, 0.0, lo_open=True)
        finite("top_p", self.top_p, 0.0, lo_open=True, hi=1.0)
        finite("repetition_penalty", self.repetition_penalty, 0.0, lo_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise FlagError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise FlagError(f"seed must be a non-negative integer, got {self.seed!r}")
        return self


def apply_repetition_penalty(logits: np.ndarray, seen: list[np.ndarray], penalty: float) -> np.ndarray:
    """logits [B, V]; seen[b]: token ids already in row b. Positive logits / penalty, negative ones * penalty."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for b, ids in enumerate(seen):
        ids = np.unique(ids)
        vals = out[b, ids]
        out[b, ids] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def _top_p(logits: np.ndarray, p: float) -> np.ndarray:
    if p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending, as transformers sorts
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = _softmax(sorted_logits)
    cum = np.cumsum(probs, axis=-1)
    remove = cum <= (1 - p)
    remove[:, -1] = False  # always keep the most likely token
    masked = np.where(remove, -np.inf, sorted_logits)
    out = np.empty_like(logits)
    np.put_along_axis(out, order, masked, axis=-1)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def select_tokens(logits: np.ndarray, cfg: SamplingConfig, seen: list[np.ndarray],
                  rngs: list[np.random.Generator]) -> np.ndarray:
    """logits [B, V] float → next token ids [B] int64."""
    logits = apply_repetition_penalty(logits.astype(np.float32, copy=False), seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return np.argmax(logits, axis=-1).astype(np.int64)
    logits = logits / cfg.temperature
    logits = _top_p(_top_k(logits, cfg.top_k), cfg.top_p)
    probs = _softmax(logits.astype(np.float64))
    return np.array([rng.choice(probs.shape[-1], p=row) for rng, row in zip(rngs, probs)], dtype=np.int64)
