"""SEVI (aligning attention to information flow, arXiv 2505.14257) as small pure tensor functions.

The paper body was not available; the semantics are METHODS.md section SEVI (taken from the authors'
public code), with its "precise readings":

- layers `start_layer .. L-1`, the last query row of each pass only, pre-softmax scaled logits `QK^T/sqrt(d)`;
- classification from the layer's *unedited* attention at the last row:
  text head  <=> mass on keys after the last image position (current row included)
                 >= mass on keys up to and including the image's end (equality makes a text head);
  global     <=> text head and max_{j in text} A(last, j) <= kappa * sum_{j in text} A(last, j)
                 (text keys of the row's full softmax); otherwise local; a non-text head is a vision head;
- step 1: vision heads' logits <- (logits + omega * mean over global text heads' logits) / (1 + omega),
  only if there is at least one vision and one global text head;
- step 2: global text heads' logits <- (logits + omega * elementwise max over local text heads' logits) / (1 + omega),
  only if there is at least one global and one local text head.
  Step 1 edits only vision heads and step 2 reads only global and local heads, so both steps read unedited
  logits whatever their order; step 1 is applied first as written.

Masked keys: the functions here take the *raw* scaled logits of one row (finite at every key, masked or not)
and the caller applies the visibility mask to the edited logits, so invisible keys end at -inf and the
softmax ignores them. Because every head of a row shares the same additive mask m, mean and max commute
with it (mean_h(x_h + m) = mean_h(x_h) + m, max likewise, and (x + m + omega*(y + m))/(1+omega) = edit + m),
so a graph that edits the already-masked logits gets the same values at visible keys and keeps masked
keys at (or below) its mask value. Classification statistics are computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .clva import ReferenceFlagError

VISION_HEAD, GLOBAL_TEXT_HEAD, LOCAL_TEXT_HEAD = 0, 1, 2
NOT_CLASSIFIED = -1  # debug value for rows where SEVI is off or has no image


@dataclass(frozen=True)
class SeviParams:
    """One batch row's SEVI settings (METHODS.md defaults). `start_layer` is literal: a model with
    `start_layer` layers or fewer is unchanged. `omega, kappa` are run-time values; `start_layer` is fixed at
    export, so the reference refuses a batch whose enabled rows disagree on it."""

    omega: float = 0.5
    kappa: float = 0.2
    start_layer: int = 8

    @classmethod
    def from_spec(cls, spec: dict | SeviParams, num_layers: int) -> SeviParams:
        if isinstance(spec, SeviParams):
            params = spec
        elif isinstance(spec, dict):
            unknown = set(spec) - set(cls.__dataclass_fields__)
            if unknown:
                raise ReferenceFlagError(f"unknown SEVI key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
            params = cls(**spec)
        else:
            raise ReferenceFlagError(f"a SEVI setting must be a dict or None, got {type(spec).__name__}")
        omega, kappa, start = float(params.omega), float(params.kappa), int(params.start_layer)
        if not omega >= 0.0 or omega == float("inf"):
            raise ReferenceFlagError(f"SEVI omega must be a finite number >= 0 (0 = unchanged model), got {omega}")
        if not kappa >= 0.0 or kappa == float("inf"):
            raise ReferenceFlagError(f"SEVI kappa must be a finite number >= 0, got {kappa}")
        if start < 0:
            raise ReferenceFlagError(f"SEVI start_layer must be >= 0, got {start}")
        return replace(params, omega=omega, kappa=kappa, start_layer=start)


def classify_heads(probs_last: torch.Tensor, last_image_pos: int, kappa: float) -> torch.Tensor:
    """probs_last [H, K]: the unedited attention of the last query row; last_image_pos: key index of the
    row's last image token. -> classes [H] int64 (VISION_HEAD / GLOBAL_TEXT_HEAD / LOCAL_TEXT_HEAD)."""
    p = probs_last.double()  # [H, K]
    text = p[:, last_image_pos + 1:]  # [H, K_text]  keys after the image, the current row included
    text_mass = text.sum(-1)  # [H]
    image_side_mass = p[:, :last_image_pos + 1].sum(-1)  # [H]  S and V keys: everything up to the image's end
    is_text = text_mass >= image_side_mass  # equal masses make a text head
    if text.shape[-1] == 0:  # the last row is the image's end: nothing after it, so no text head
        return torch.full(is_text.shape, VISION_HEAD, dtype=torch.long)
    text_max = text.max(-1).values  # [H]
    is_global = is_text & (text_max <= kappa * text_mass)
    classes = torch.full(is_text.shape, VISION_HEAD, dtype=torch.long)  # [H]
    classes[is_text] = LOCAL_TEXT_HEAD
    classes[is_global] = GLOBAL_TEXT_HEAD
    return classes


def edit_logits(logits_last: torch.Tensor, classes: torch.Tensor, omega: float) -> tuple[torch.Tensor, bool, bool]:
    """logits_last [H, K]: raw scaled logits of the last query row; classes [H] from classify_heads.
    -> (edited logits [H, K], step 1 applied, step 2 applied)."""
    vision = classes == VISION_HEAD  # [H]
    glob = classes == GLOBAL_TEXT_HEAD  # [H]
    local = classes == LOCAL_TEXT_HEAD  # [H]
    edited = logits_last.clone()  # [H, K]
    step1 = bool(vision.any()) and bool(glob.any())
    if step1:
        global_mean = logits_last[glob].mean(0)  # [K]  reads unedited logits
        edited[vision] = (logits_last[vision] + omega * global_mean) / (1.0 + omega)
    step2 = bool(glob.any()) and bool(local.any())
    if step2:
        local_max = logits_last[local].max(0).values  # [K]  local heads are never edited
        edited[glob] = (logits_last[glob] + omega * local_max) / (1.0 + omega)
    return edited, step1, step2
