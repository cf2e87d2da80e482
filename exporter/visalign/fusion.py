"""VisAlign's fusion module: `e'_t = W [e_t ; v_bar] + b` on text positions (METHODS.md, VisAlign; the paper's
"Concatenate → Linear_Project" before the LLM).

    e [B,S,d] ─┐
               ├─ concat [B,S,2d] ── Linear(2d → d) ──► fused [B,S,d] ──┐
    v_bar [B,d] ─ repeat over S ─┘                                     ├─ where(text & enabled) ──► e' [B,S,d]
    e ──────────────────────────────────────────────────────────────────┘

`W = [I | 0]`, `b = 0` at initialisation, so an untrained fusion is exactly the base model; xavier is the
alternative (the one public port's choice). The layout is `torch.nn.Linear(2d, d)`: `weight` [d, 2d] with the
`e_t` columns first, which is what `visalign.safetensors` stores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from anchorrt.exporter.visalign.checkpoint import INITS
from anchorrt.graph_passes.visalign import BIAS_KEY, WEIGHT_KEY, FusionWeights
from torch import nn


class VisAlignFusion(nn.Module):
    def __init__(self, hidden_size: int, init: str = "identity", seed: int = 0):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"VisAlign init must be one of {', '.join(INITS)}, got {init!r}")
        self.hidden_size = hidden_size
        self.init = init
        self.proj = nn.Linear(2 * hidden_size, hidden_size)
        self.reset_parameters(init, seed)

    @torch.no_grad()
    def reset_parameters(self, init: str, seed: int = 0) -> None:
        d = self.hidden_size
        self.proj.bias.zero_()
        if init == "identity":
            self.proj.weight.zero_()
            self.proj.weight[:, :d] = torch.eye(d)
        else:  # a generator of its own: the init does not depend on (or move) the global RNG
            nn.init.xavier_uniform_(self.proj.weight, generator=torch.Generator().manual_seed(seed))

    @classmethod
    def from_weights(cls, weights: FusionWeights) -> VisAlignFusion:
        fusion = cls(weights.hidden_size)
        with torch.no_grad():
            fusion.proj.weight.copy_(torch.from_numpy(weights.weight))
            fusion.proj.bias.copy_(torch.from_numpy(weights.bias))
        return fusion

    def forward(self, embeds: torch.Tensor, v_bar: torch.Tensor, fuse_here: torch.Tensor) -> torch.Tensor:
        """embeds [B, S, d], v_bar [B, d], fuse_here [B, S] bool (text positions of enabled rows) -> [B, S, d]."""
        v = v_bar[:, None, :].expand(-1, embeds.shape[1], -1).to(embeds.dtype)  # [B, S, d]
        fused = self.proj(torch.cat([embeds, v], dim=-1))  # [B, S, d]
        # where, not a blend: rows and positions that are not fused keep their embeddings bit for bit
        return torch.where(fuse_here[..., None], fused.to(embeds.dtype), embeds)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {WEIGHT_KEY: self.proj.weight.detach().float().cpu().contiguous(),
                   BIAS_KEY: self.proj.bias.detach().float().cpu().contiguous()}
        meta = {"format": "anchorrt-visalign", "layout": "weight [d, 2d]: e_t columns first, then v_bar"}
        save_file(tensors, str(path), metadata={**meta, **(metadata or {})})
