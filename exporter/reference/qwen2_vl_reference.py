"""Independent PyTorch reference of Qwen2-VL / Qwen2.5-VL's language model with CLVA and SEVI.

The decoder is `ReferenceLlava`'s explicit PyTorch forward (the Qwen2 decoder is the Llama one plus q/k/v biases,
which `_linear` applies; tied embeddings arrive through `lm_head`), with the rotary part replaced by multimodal
RoPE written here from the paper's description (Qwen2-VL, arXiv 2409.12191, section 2.1 "M-RoPE"):

    positions [3, B, S]: text tokens share one running index on all three axes; an image of t x h x w merged tokens
    takes (start + i_t, start + i_h, start + i_w), and the text after it continues at start + max(t, h, w)
    (t = 1 for a still image); decode steps continue at the row's largest position + 1.

    rotary frequencies f_0 .. f_{Dh/2-1} split into `mrope_section` [s_t, s_h, s_w] consecutive chunks: chunk a
    rotates with axis a's position; cos/sin = the chunks concatenated, twice (the halves layout).

Only the vision tower is called from the HF model (`get_image_features` with `image_grid_thw`); none of the methods
touch it. Nothing here is shared with the exporter (exporter/archs/qwen2_vl.py) or the runtime's numpy positions
(runtime/archs/qwen2_vl.py). V = the image-pad positions of the prompt pass (METHODS.md, "Visual positions across
architectures"): the vision start/end markers are text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .iava import ReferenceIava
from .llava_reference import ReferenceLlava, RefOutput


class ReferenceQwen2VL(ReferenceLlava):
    """`forward(..., image_grid_thw=[N, 3])` / `generate(..., image_grid_thw=...)`: the grids of the images in
    `pixel_values` (flattened patches, the processor's output), in prompt order."""

    def __init__(self, hf_model):
        super().__init__(hf_model)
        text = hf_model.config.text_config
        rope = getattr(text, "rope_parameters", None) or {}
        self.mrope_section = [int(x) for x in rope["mrope_section"]]
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} does not cover head_dim {self.head_dim}")
        self.merge = int(hf_model.config.vision_config.spatial_merge_size)
        self._grid: torch.Tensor | None = None
        self._prompt_deltas: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ReferenceQwen2VL:
        import json

        import transformers

        arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
        return cls(getattr(transformers, arch).from_pretrained(str(model_dir), dtype=torch.float32))

    # -- images --------------------------------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
               image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed[input_ids]  # [B, S, D]
        if pixel_values is None:
            return h
        out = self.hf.model.get_image_features(pixel_values=pixel_values.float(), image_grid_thw=self._grid,
                                               return_dict=True).pooler_output
        features = torch.cat(list(out), dim=0)  # [total image tokens, D]
        slots = input_ids == self.image_token_id  # [B, S]
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{int(slots.sum())} image tokens in input_ids but {features.shape[0]} image features")
        h = h.clone()
        h[slots] = features.to(h.dtype)
        return h

    # -- M-RoPE --------------------------------------------------------------------------------------------
    def _positions(self, input_ids, attention_mask, past: int, visual, cache) -> torch.Tensor:
        batch, seq = input_ids.shape
        seen = attention_mask.bool()
        if cache is None:
            positions = torch.zeros(3, batch, seq, dtype=torch.long)  # pads stay 0
            deltas = torch.zeros(batch, dtype=torch.long)
            grids = iter([] if self._grid is None else self._grid.tolist())
            for b in range(batch):
                cols = torch.nonzero(seen[b, past:]).flatten().tolist()
                start, index, row = 0, 0, []
                while index < len(cols):
                    col = cols[index]
                    if not bool(visual[b, past + col]):
                        row.append([start] * 3)
                        start, index = start + 1, index + 1
                        continue
                    t, gh, gw = next(grids)
                    gh, gw = gh // self.merge, gw // self.merge
                    for it in range(t):
                        for ih in range(gh):
                            for iw in range(gw):
                                row.append([start + it, start + ih, start + iw])
                    index += t * gh * gw
                    start += max(t, gh, gw)
                pos = torch.tensor(row, dtype=torch.long).T  # [3, n]
                positions[:, b, torch.tensor(cols, dtype=torch.long)] = pos
                deltas[b] = int(pos.max()) + 1 - len(cols)
            self._prompt_deltas = deltas
            return positions
        deltas = getattr(cache, "rope_deltas", None)
        if deltas is None:
            raise ValueError("the cache has no rope deltas: run the prompt pass through this reference first")
        text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:] + deltas[:, None]  # [B, S]
        return text[None].expand(3, -1, -1)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [3, B, S, Dh/2]
        chunks, start = [], 0
        for axis, size in enumerate(self.mrope_section):
            chunks.append(freqs[axis, ..., start:start + size])  # this chunk of frequencies follows `axis`
            start += size
        mixed = torch.cat(chunks, dim=-1)  # [B, S, Dh/2]
        angles = torch.cat((mixed, mixed), dim=-1)  # [B, S, Dh]
        return angles.cos(), angles.sin()

    # -- passes --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids, pixel_values=None, attention_mask=None, cache=None, clva=None, sevi=None,
                visual_mask=None, image_grid_thw=None, image_sizes=None) -> RefOutput:
        """ReferenceLlava.forward with the images' grids (kept for the decode passes of `generate`); `image_sizes`
        (LLaVA-NeXT's) has no meaning here and must be None."""
        if image_sizes is not None:
            raise ValueError("Qwen2-VL takes its image grids from image_grid_thw, not image_sizes")
        if image_grid_thw is not None:
            self._grid = torch.as_tensor(image_grid_thw)
        if pixel_values is not None and self._grid is None:
            raise ValueError("Qwen2-VL needs image_grid_thw with pixel_values")
        out = super().forward(input_ids, pixel_values, attention_mask, cache, clva, sevi, visual_mask)
        out.cache.rope_deltas = self._prompt_deltas if cache is None else cache.rope_deltas
        return out

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids, pixel_values, attention_mask, max_new_tokens: int, clva=None, sevi=None,
                 eos_token_id=None, image_grid_thw=None) -> torch.Tensor:
        self._grid = None if image_grid_thw is None else torch.as_tensor(image_grid_thw)
        return super().generate(input_ids, pixel_values, attention_mask, max_new_tokens, clva=clva, sevi=sevi,
                                eos_token_id=eos_token_id)


class ReferenceIavaQwen2VL(ReferenceIava):
    """IAVA's reference (exporter/reference/iava.py) on transformers' Qwen2-VL with eager attention: the inputs as
    Qwen2VLProcessor builds them, M-RoPE positions from the model's own `get_rope_index` on the full prompt (so the
    hidden keys of V* do not move them), decode steps at n + step + rope delta on all three axes."""

    def __init__(self, model_dir: str | Path):
        from anchorrt.exporter.archs.qwen2_vl import Qwen2VLArch

        side = Qwen2VLArch.verify_torch_side(Path(model_dir), attn_implementation="eager")
        self.side, self.model = side, side.model
        self.image_token_id = self.model.config.image_token_id
        self._delta = 0

    def _inputs(self, image, text: str, template: str):
        return self.side.inputs([image], [template.replace("{prompt}", text)])

    def _prompt_positions(self, inputs) -> torch.Tensor:
        positions, delta = self.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
        self._delta = int(delta[0, 0])
        return positions  # [3, 1, n]

    def _step_position(self, n: int, step: int) -> torch.Tensor:
        return torch.full((3, 1, 1), n + step + self._delta, dtype=torch.long)


class VisAlignQwen2VL:
    """VisAlign's reference (METHODS.md "VisAlign"; exporter/visalign/reference.py for LLaVA) on transformers'
    Qwen2-VL: e' = W [e_t ; v_bar] + b on every non-image position of enabled rows, v_bar = the mean of the row's
    merged visual tokens (the image-pad positions), image positions keep the visual tokens; transformers' own
    language model and M-RoPE (its get_rope_index at the prefill, text position + rope delta at decode steps)."""

    def __init__(self, model_dir: str | Path, fusion):
        from anchorrt.exporter.archs.qwen2_vl import Qwen2VLArch

        self.side = Qwen2VLArch.verify_torch_side(Path(model_dir))
        self.model = self.side.model
        self.fusion = fusion.float().eval()

    @torch.no_grad()
    def generate(self, images, texts, enable: list[bool], max_new_tokens: int, eos_token_id: list[int]):
        """Greedy decoding -> (input_ids [B, S], new tokens per row up to its first stop token, logits per pass)."""
        from transformers import DynamicCache

        inputs = self.side.inputs(images, texts)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        image_mask = ids == self.side.image_token_id  # [B, S]
        embed = self.model.get_input_embeddings()
        e = embed(ids)  # [B, S, d]
        feats = self.model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                    image_grid_thw=inputs["image_grid_thw"]).pooler_output
        e = e.masked_scatter(image_mask[..., None], torch.cat(list(feats)).to(e.dtype))
        count = image_mask.sum(-1, keepdim=True).clamp(min=1).float()  # [B, 1]
        v_bar = (e * image_mask[..., None]).sum(1) / count  # [B, d]
        on = torch.tensor(enable)
        fused = self.fusion(e, v_bar, on[:, None] & ~image_mask)
        out = self.model(input_ids=ids, inputs_embeds=fused, attention_mask=mask, image_grid_thw=inputs["image_grid_thw"],
                         mm_token_type_ids=inputs["mm_token_type_ids"], cache=DynamicCache(), use_cache=True)
        b = ids.shape[0]
        rows: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        all_logits = []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()  # [B, V]
            all_logits.append(logits)
            token = logits.argmax(-1)  # [B]
            for i in range(b):
                if not done[i]:
                    rows[i].append(int(token[i]))
                    done[i] = int(token[i]) in eos_token_id
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            new = self.fusion(embed(token[:, None]), v_bar, on[:, None].expand(-1, 1))
            out = self.model(inputs_embeds=new, attention_mask=mask, cache=out.cache, use_cache=True,
                             **self.side.decode_kwargs(mask))
        return ids, rows, all_logits
