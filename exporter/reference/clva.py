"""CLVA (Cross-Layer Visual Anchors) as small pure tensor functions, for the PyTorch reference.

Paper: `papers/clva-cross-layer-visual-anchors.txt`; semantics fixed by `METHODS.md` section CLVA.

    Phi_h      = mean_{i in T} sum_{j in V} A_h(i, j)                      eq. 1   -> visual_intensity
    H_sens     = {h | Phi_h > mu + lam*sigma},  H_insens = {h | Phi_h < mu - lam*sigma}   eqs. 2-3 -> select_heads
    M(j)       = mean_{h in H} A_h(last, j),  j in V                       eq. 4   -> anchor_mask
    z(j)       = (M(j) - mean_V M) / (std_V M + 1e-6),  Z(j) = 1[z(j) > tau]       eqs. 8-9 -> anchor_mask
    w(j)       = max(0, 1 + alpha*Zpos(j) - beta*Zneg(j))                  eq. 10  -> anchor_weights
    A^(i, j)   = A(i, j) w(j) / sum_k A(i, k) w(k)                         eqs. 10-11 -> reweight

Statistics (Phi, mu, sigma, M, z) are computed in float64: the thresholds are strict inequalities on
floating-point statistics, and float64 keeps the reference's own rounding far below the ~1e-6 band that
METHODS.md lets a parity test excuse. All standard deviations are population ones (METHODS.md step 7).
The re-weighting itself runs in the attention dtype (fp32).

Nothing here knows about models: each function takes one batch row's tensors, so that the unit tests can
feed hand-made attention maps with known answers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from anchorrt.runtime.errors import FlagError

Z_EPS = 1e-6  # eq. 8's epsilon (METHODS.md step 4)
LOG_ZERO = -1e9  # stands for log(0) in the additive-bias form: exp(-1e9 + any fp32 logit) is exactly 0


class ReferenceFlagError(FlagError, ValueError):
    """A bad CLVA/SEVI parameter given to the reference (a FlagError for the CLI, a ValueError for Python)."""


@dataclass(frozen=True)
class ClvaParams:
    """One batch row's CLVA settings. `l_pos=None` and `drift_layers=None` mean the METHODS.md defaults.

    `alpha, beta, tau, lam` are run-time values (per row in the graphs); the layer choices are fixed at
    export, so the reference refuses a batch whose enabled rows disagree on them. `freeze_anchors` is the
    extra mode of METHODS.md step 6: anchors from the first pass with T rows (normally the prefill) are
    reused by every later pass instead of being recomputed.
    """

    alpha: float = 14.0
    beta: float = 0.9
    tau: float = 2.0
    lam: float = 1.0
    l_neg: int = 0
    l_pos: int | None = None
    drift_layers: tuple[int, ...] | None = None
    freeze_anchors: bool = False

    @classmethod
    def from_spec(cls, spec: dict | ClvaParams, num_layers: int) -> ClvaParams:
        """Parse a user dict (or an instance), fill the layer defaults for `num_layers`, validate."""
        if isinstance(spec, ClvaParams):
            params = spec
        elif isinstance(spec, dict):
            unknown = set(spec) - set(cls.__dataclass_fields__)
            if unknown:
                raise ReferenceFlagError(f"unknown CLVA key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
            params = cls(**spec)
        else:
            raise ReferenceFlagError(f"a CLVA setting must be a dict or None, got {type(spec).__name__}")
        return params.resolved(num_layers)

    def resolved(self, num_layers: int) -> ClvaParams:
        l_neg = int(self.l_neg)
        l_pos = num_layers // 2 - 2 if self.l_pos is None else int(self.l_pos)
        for name, layer in (("l_neg", l_neg), ("l_pos", l_pos)):
            if not 0 <= layer < num_layers:
                raise ReferenceFlagError(f"CLVA {name}={layer} is outside the model's layers 0..{num_layers - 1}")
        # Default drift layers start after both anchor layers; with the default l_neg=0 <= l_pos this is
        # exactly METHODS.md's `l_pos+1 .. L-1`.
        first_drift = max(l_neg, l_pos) + 1
        drift = tuple(range(first_drift, num_layers)) if self.drift_layers is None else tuple(
            sorted({int(x) for x in self.drift_layers}))
        bad = [x for x in drift if x < first_drift or x >= num_layers]
        if bad:
            # The anchors come from the *unedited* attention of l_neg/l_pos in the same pass (METHODS.md
            # step 7), so a drift layer at or before them would have to be edited before its anchor exists.
            raise ReferenceFlagError(
                f"CLVA drift layers {bad} must lie in {first_drift}..{num_layers - 1} "
                f"(after max(l_neg={l_neg}, l_pos={l_pos}) and inside the model)")
        values = {k: float(getattr(self, k)) for k in ("alpha", "beta", "tau", "lam")}
        for k, v in values.items():
            if v != v or v in (float("inf"), float("-inf")):
                raise ReferenceFlagError(f"CLVA {k} must be a finite number, got {v}")
        return replace(self, l_neg=l_neg, l_pos=l_pos, drift_layers=drift, freeze_anchors=bool(self.freeze_anchors),
                       **values)

    def layer_choice(self) -> tuple:
        return (self.l_neg, self.l_pos, self.drift_layers)


def visual_intensity(probs: torch.Tensor, t_rows: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Eq. 1 / step 1. probs [H, Q, K] post-softmax, t_rows [Q] bool, visual [K] bool -> Phi [H] float64.

    The mean runs over the T rows of this pass only (METHODS.md step 1), the sum over the V keys.
    """
    p = probs.double()[:, t_rows][:, :, visual]  # [H, nT, nV]
    return p.sum(-1).mean(-1)  # [H]


def select_heads(phi: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 2-3 / step 2. phi [H] -> (sensitive [H] bool, insensitive [H] bool).

    Population std and strict inequalities. When every head has the same Phi, sigma is 0 and the strict
    inequalities select nobody; that case is decided explicitly, because the computed mean of equal
    float values can be one ulp away from them and would otherwise "select" every head with lam=0.
    """
    phi = phi.double()
    if bool(phi.max() == phi.min()):
        none = torch.zeros_like(phi, dtype=torch.bool)
        return none, none.clone()
    mu = phi.mean()
    sigma = phi.std(unbiased=False)  # population std (METHODS.md step 7)
    return phi > mu + lam * sigma, phi < mu - lam * sigma


def anchor_mask(probs_last: torch.Tensor, heads: torch.Tensor, visual: torch.Tensor, tau: float) -> torch.Tensor:
    """Eqs. 4, 8, 9 / steps 3-4. probs_last [H, K] (attention of the pass's last query row), heads [H] bool,
    visual [K] bool -> Z [K] bool, False outside V.

    An empty head set gives an all-zero mask (METHODS.md step 3). Without that rule M would be all zeros,
    z would be 0 everywhere and a negative tau would mark every visual key.
    """
    z_mask = torch.zeros(probs_last.shape[-1], dtype=torch.bool, device=probs_last.device)  # [K]
    if not bool(heads.any()) or not bool(visual.any()):
        return z_mask
    m = probs_last.double()[heads][:, visual].mean(0)  # [nV]  eq. 4
    z = (m - m.mean()) / (m.std(unbiased=False) + Z_EPS)  # [nV]  eq. 8, population std
    z_mask[visual] = z > tau  # eq. 9, strict
    return z_mask


def anchor_weights(zpos: torch.Tensor, zneg: torch.Tensor, alpha: float, beta: float,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Eq. 10's factor, clipped at 0 (step 5). zpos, zneg [..., K] bool -> w [..., K].

    Outside V both masks are False, so w = 1 there without a separate rule.
    """
    w = 1.0 + alpha * zpos.to(dtype) - beta * zneg.to(dtype)  # [..., K]
    return w.clamp(min=0.0)


def reweight(probs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Eqs. 10-11: multiply post-softmax probabilities by w and renormalise. probs [..., K], w broadcastable.

    Invisible keys already have probability 0, so the sum over all keys is the sum over the keys the row
    can see. A row whose re-weighted mass is 0 (only possible if every visible key has w = 0 or underflowed)
    keeps its original probabilities rather than becoming NaN; a T row always sees its own key, with w = 1.
    """
    tilde = probs * w  # [..., K]
    total = tilde.sum(-1, keepdim=True)  # [..., 1]
    return torch.where(total > 0, tilde / torch.where(total > 0, total, 1.0), probs)


def log_weight_bias(w: torch.Tensor) -> torch.Tensor:
    """The additive pre-softmax form of the same edit (step 5): log w, with LOG_ZERO where w = 0.

    softmax(logits + log_weight_bias(w)) == reweight(softmax(logits), w) on every row with a visible key of
    w > 0; this is the form graph passes use to keep fused attention kernels.
    """
    return torch.where(w > 0, torch.log(torch.where(w > 0, w, 1.0)), torch.full_like(w, LOG_ZERO))
