"""Independent PyTorch reference of IAVA (METHODS.md "IAVA"; arXiv 2503.18556, "Instruction-Aligned Visual
Attention"), written plainly on the Hugging Face model with eager attention. It shares no code with the runtime's
IAVA (runtime/iava.py) or the attention-probe pass; the tests compare the two.

1. Prefill the image with the general instruction G and with the query Q (each through the chat template), and read
   the post-softmax attention of the last prompt row: mean over heads, then over the chosen layers, at the image
   positions → att_G(j), att_Q(j).
2. delta = att_G - att_Q; irrelevant set I = {j : delta(j) > 0} ∩ top-i of delta over all of V (ties to the lower
   index) ∩ {j : att_G(j) > mu_G + lam * sigma_G} (population std).
3. V*: the keys of V \\ I hidden from every row in every layer, prefill and decode, positions unchanged (explicit
   position ids, so the hidden keys do not shift them).
4. Two sequential streams (this is the reference; the runtime decodes them as one batch):
   logits = (1 + a) * log_softmax(l(y | V, Q)) - a * log_softmax(l(y | V*, Q)), with the optional plausibility
   cut-off (keep tokens whose original probability is at least beta_cut times the maximum).
"""

from __future__ import annotations

import decimal
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

GENERAL_INSTRUCTION = "Describe the content of the image."


@dataclass
class IavaTrace:
    irrelevant: list[int]  # indices into the image tokens (0 .. T-1), sorted
    att_general: torch.Tensor  # [T] float64
    att_query: torch.Tensor  # [T] float64
    logits: list[torch.Tensor] = field(default_factory=list)  # combined scores per step [V]
    tokens: list[int] = field(default_factory=list)


def count_from(i: int | float | None, num_visual: int) -> int:
    """`i` as a count (int) or a fraction of the visual tokens (float in (0, 1]); default 10%, rounded up.

    The fraction is the decimal the user wrote (the float's shortest repr), multiplied exactly: 0.28 of 25 is 7, where
    the float product 0.28 * 25 = 7.000000000000001 would round up to 8."""
    if i is None:
        i = 0.1
    if isinstance(i, float):
        exact = decimal.Decimal(repr(i)) * num_visual
        return int(exact.to_integral_value(rounding=decimal.ROUND_CEILING))
    return int(i)


def irrelevant_tokens(att_g: torch.Tensor, att_q: torch.Tensor, i: int, lam: float) -> list[int]:
    g = att_g.double()
    delta = g - att_q.double()
    order = sorted(range(len(delta)), key=lambda j: (-float(delta[j]), j))  # largest first, ties to the lower index
    top = set(order[:i])
    threshold = float(g.mean() + lam * g.std(unbiased=False))
    return [j for j in range(len(delta)) if j in top and float(delta[j]) > 0 and float(g[j]) > threshold]


class ReferenceIava:
    def __init__(self, model_dir: str | Path):
        import json

        import transformers
        from transformers import AutoProcessor

        arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]  # LLaVA-1.5 or NeXT
        self.model = getattr(transformers, arch).from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager").eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.image_token_id = self.model.config.image_token_id

    def _prompt_positions(self, inputs) -> torch.Tensor:
        """Position ids of the prompt from the full (padding-free) mask, so hidden keys do not shift them."""
        return torch.arange(inputs["input_ids"].shape[1])[None]

    def _step_position(self, n: int, step: int) -> torch.Tensor:
        return torch.tensor([[n + step]])

    def _inputs(self, image, text: str, template: str):
        return self.processor(images=[image], text=[template.replace("{prompt}", text)], return_tensors="pt")

    @torch.no_grad()
    def visual_attention(self, inputs, layers: list[int] | None = None) -> torch.Tensor:
        """Mean over heads, then over `layers`, of the last row's attention at the image positions → [T]."""
        out = self.model(**inputs, output_attentions=True)
        attn = out.attentions  # per layer [1, H, S, S]
        chosen = range(len(attn)) if layers is None else layers
        per_layer = torch.stack([attn[li][0, :, -1, :].double().mean(0) for li in chosen])  # [L, S]
        image_pos = (inputs["input_ids"][0] == self.image_token_id).nonzero().flatten()
        return per_layer.mean(0)[image_pos]

    @torch.no_grad()
    def generate(self, image, prompt: str, template: str, *, alpha: float = 1.0, i: int | float | None = None,
                 lam: float = 0.0, instruction: str = GENERAL_INSTRUCTION, layers: list[int] | None = None,
                 max_new_tokens: int = 16, beta_cut: float | None = None, eos_token_id: int | None = None) -> IavaTrace:
        q_inputs = self._inputs(image, prompt, template)
        att_g = self.visual_attention(self._inputs(image, instruction, template), layers)
        att_q = self.visual_attention(q_inputs, layers)
        irrelevant = irrelevant_tokens(att_g, att_q, count_from(i, len(att_g)), lam)
        trace = IavaTrace(irrelevant, att_g, att_q)

        ids = q_inputs["input_ids"]
        n = ids.shape[1]
        image_pos = (ids[0] == self.image_token_id).nonzero().flatten()
        hidden = torch.ones(n, dtype=torch.long)
        keep = set(irrelevant)
        for k, pos in enumerate(image_pos.tolist()):
            if k not in keep:
                hidden[pos] = 0
        masks = [torch.ones(1, n, dtype=torch.long), hidden[None]]
        positions = self._prompt_positions(q_inputs)
        pasts = [None, None]
        logits = [None, None]
        for s in range(2):  # main stream (V), contrastive stream (V*)
            out = self.model(**q_inputs | {"attention_mask": masks[s]}, position_ids=positions, use_cache=True)
            pasts[s], logits[s] = out.past_key_values, out.logits[0, -1].float()
        eos = self.model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        for step in range(max_new_tokens):
            lp, lp_star = torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1], -1)
            scores = (1 + alpha) * lp - alpha * lp_star
            if beta_cut is not None:
                probs = lp.exp()
                scores = torch.where(probs >= beta_cut * probs.max(), scores, torch.tensor(-math.inf))
            trace.logits.append(scores)
            tok = int(scores.argmax())
            trace.tokens.append(tok)
            if tok in eos or step == max_new_tokens - 1:
                break
            nxt = torch.tensor([[tok]])
            pos = self._step_position(n, step)
            for s in range(2):
                masks[s] = torch.cat([masks[s], torch.ones(1, 1, dtype=torch.long)], dim=1)
                out = self.model(input_ids=nxt, attention_mask=masks[s], position_ids=pos, past_key_values=pasts[s],
                                 use_cache=True)
                pasts[s], logits[s] = out.past_key_values, out.logits[0, -1].float()
        return trace
