"""The numbers behind `anchorrt explain`'s pictures, from one pass's attention rows, in numpy (float64).

Paper: `papers/clva-cross-layer-visual-anchors.txt`, eqs. 1-6 (Figures 1-2); METHODS.md section CLVA fixes the
readings (T rows of the pass, population standard deviations, strict inequalities, an empty head set -> no map).

    attention [L, H, R, K]  (rows R = the pass's T rows, the last one last; keys K; V = image keys)
    Phi[l, h]      = mean_{i in T} sum_{j in V} A_h^l(i, j)                       eq. 1     -> intensity
    sens / insens  = Phi > mu + lam*sigma / Phi < mu - lam*sigma, per layer       eqs. 2-3  -> head_sets
    M^(l, H)(j)    = mean_{h in H} A_h^l(last, j), j in V                          eq. 4     -> head_map
    Z(j)           = 1[(M(j) - mean M) / (std M + 1e-6) > tau]                     eqs. 8-9  -> anchor
    entropy(l)     = -sum_j p(j) log p(j),  p = M / sum_V M                        eq. 5 (renormalised, see below)
    r(l)           = Pearson(M^(l, all), M^(l_neg, insens)) and (..., M^(l_pos, sens))          eq. 6

Eq. 5 is written on M itself; M sums to the row's visual mass (< 1), so the entropy here is taken of M renormalised
over V (nats; 0 = one token, log|V| = uniform): it measures spread, not mass. Nothing here imports torch.
"""

from __future__ import annotations

import math

import numpy as np

Z_EPS = 1e-6  # eq. 8


def intensity(attention: np.ndarray, visual: np.ndarray) -> np.ndarray:
    """Eq. 1. attention [L, H, R, K] (R = T rows), visual [K] bool -> Phi [L, H] float64."""
    return attention[..., visual].astype(np.float64).sum(-1).mean(-1)


def head_sets(phi: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Eqs. 2-3 per layer. phi [L, H] -> (sensitive [L, H], insensitive [L, H]) bool. A layer whose heads all have
    the same Phi selects none (sigma = 0 and strict inequalities; decided as max == min, like the reference)."""
    mu = phi.mean(-1, keepdims=True)
    sigma = phi.std(-1, keepdims=True)  # population
    flat = (phi.max(-1, keepdims=True) == phi.min(-1, keepdims=True))
    return (phi > mu + lam * sigma) & ~flat, (phi < mu - lam * sigma) & ~flat


def head_map(last: np.ndarray, heads: np.ndarray) -> np.ndarray | None:
    """Eq. 4. last [H, V] (last row over the image keys), heads [H] bool -> M [V] float64, None if no head."""
    if not heads.any():
        return None
    return last[heads].astype(np.float64).mean(0)


def anchor(m: np.ndarray | None, tau: float, n: int) -> np.ndarray:
    """Eqs. 8-9: M [V] -> Z [V] bool (all False for an empty head set)."""
    if m is None:
        return np.zeros(n, dtype=bool)
    z = (m - m.mean()) / (m.std() + Z_EPS)
    return z > tau


def entropy(m: np.ndarray | None) -> float | None:
    """Eq. 5 on M renormalised over V (see the module docstring); None without a map or with zero mass."""
    if m is None or m.sum() <= 0:
        return None
    p = m / m.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def pearson(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Eq. 6; None when either map is missing or constant (the coefficient is undefined)."""
    if a is None or b is None or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def layer_curves(last: np.ndarray, sensitive: np.ndarray, m_neg: np.ndarray | None,
                 m_pos: np.ndarray | None) -> dict:
    """Per layer: the all-heads and own-sensitive-heads maps, their entropies and the correlations of the all-heads
    map with the two anchor maps. last [L, H, V]; sensitive [L, H]."""
    layers = last.shape[0]
    all_maps = [head_map(last[li], np.ones(last.shape[1], dtype=bool)) for li in range(layers)]
    sens_maps = [head_map(last[li], sensitive[li]) for li in range(layers)]
    return {
        "map_all_heads": all_maps,
        "map_sensitive_heads": sens_maps,
        "entropy_all_heads": [entropy(m) for m in all_maps],
        "entropy_sensitive_heads": [entropy(m) for m in sens_maps],
        "pearson_neg": [pearson(m, m_neg) for m in all_maps],
        "pearson_pos": [pearson(m, m_pos) for m in all_maps],
    }


def suggest(last: np.ndarray, sensitive: np.ndarray, insensitive: np.ndarray, l_neg: int) -> dict:
    """A suggestion of l_pos and drift layers read from the curves of one pass (the paper's reading of its Fig. 2b).

    l_pos: among the intermediate layers 1..L-2 with at least one sensitive head, the one whose sensitive-head map
    has the lowest entropy (the sharpest focus: "the peak grounding center ... low entropy"). Drift layers: from
    the first layer after l_pos whose all-heads map correlates more with the l_neg insensitive-head map than with
    the l_pos sensitive-head map ("regression toward initial-layer spatial noise") to the last layer; if no layer
    does, METHODS.md's default l_pos+1..L-1. One image and one prompt: the paper averages over 100 images."""
    layers = last.shape[0]
    basis = ("one forward pass (this image and prompt); the paper reads its curves averaged over 100 COCO images: "
             "run explain on several images before changing the export")
    candidates = [(entropy(head_map(last[li], sensitive[li])), li) for li in range(1, layers - 1) if sensitive[li].any()]
    candidates = [(e, li) for e, li in candidates if e is not None]
    if layers < 3 or not candidates:
        return {"l_pos": None, "drift_layers": None, "basis": basis,
                "reason": "no intermediate layer has a sensitive head at this lam: no suggestion"}
    _, l_pos = min(candidates)
    m_pos = head_map(last[l_pos], sensitive[l_pos])
    m_neg = head_map(last[l_neg], insensitive[l_neg])
    first = max(l_pos, l_neg) + 1
    drifting = []
    for layer in range(first, layers):
        m = head_map(last[layer], np.ones(last.shape[1], dtype=bool))
        r_neg, r_pos = pearson(m, m_neg), pearson(m, m_pos)
        if r_neg is not None and r_pos is not None and r_neg > r_pos:
            drifting.append(layer)
    if drifting:
        drift = list(range(drifting[0], layers))
        why = (f"l_pos = layer {l_pos}: lowest entropy of the sensitive-head map among layers 1..{layers - 2}; "
               f"drift from layer {drifting[0]}: the first layer after l_pos whose map correlates more with the "
               f"l_neg={l_neg} noise map than with the l_pos map")
    else:
        drift = list(range(first, layers)) if first < layers else []
        why = (f"l_pos = layer {l_pos}: lowest entropy of the sensitive-head map among layers 1..{layers - 2}; "
               f"no later layer correlates more with the l_neg={l_neg} noise map than with the l_pos map, so the "
               "drift layers are METHODS.md's default (every layer after the anchors)")
    return {"l_pos": int(l_pos), "drift_layers": drift or None, "basis": basis, "reason": why}


def finite(x):
    """JSON-safe: numpy arrays -> lists, NaN/inf -> None, recursively."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return finite(x.tolist())
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x
