"""Parity of an artifact folder against the PyTorch model it came from (optimum's validate_model_outputs idea).

For each case (image, prompt) the transformers model and the exported graphs run the same prefill and the same
teacher-forced decode steps (the tokens transformers picks greedily); we report the largest absolute logit
difference per step and whether the greedy tokens agree. Used by `anchorrt verify` and by the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import VerifyError

DEFAULT_PROMPTS = ("What is in the image?", "Describe the content of the image.")


@dataclass
class VerifyReport:
    max_abs_diff: float
    per_step_max_abs_diff: list[float]
    greedy_agreement: float  # fraction of (row, step) greedy tokens that agree
    tokens_torch: list[list[int]]
    tokens_onnx: list[list[int]]
    atol: float
    cases: int
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol and self.greedy_agreement == 1.0

    def summary(self) -> str:
        return (f"max |logit diff| {self.max_abs_diff:.3g} (tolerance {self.atol:g}) over prefill + "
                f"{len(self.per_step_max_abs_diff) - 1} decode steps, {self.cases} case(s); greedy tokens agree "
                f"{100 * self.greedy_agreement:.1f}%: {'PASS' if self.ok else 'FAIL'}")


def random_images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (64, 40), (50, 50), (30, 90)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def verify(model_dir: str | Path, artifact_dir: str | Path, *, images: Sequence | None = None,
           prompts: Sequence[str] | None = None, steps: int = 5, atol: float = 1e-4, batch: bool = True,
           providers: Sequence[str] | None = None, verify_files: bool = True) -> VerifyReport:
    """Compare logits (prefill + `steps` decode steps) of the torch model and the artifact on the same inputs.

    `batch=True` runs all cases as one left-padded batch (different prompt lengths), as a serving runtime would.
    """
    import torch
    from transformers import AutoProcessor, DynamicCache, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from runtime.kv_cache import KVCache
    from runtime.pipeline import Pipeline

    hf_logging.disable_progress_bar()  # our own progress lines replace transformers' weight-loading bar
    prompts = list(prompts or DEFAULT_PROMPTS)
    images = list(images) if images is not None else random_images(len(prompts))
    if len(images) != len(prompts):
        raise ValueError("verify needs one image per prompt")
    pipe = Pipeline.from_dir(artifact_dir, providers=providers, verify=verify_files)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    template = pipe.manifest.prompt["template"]
    groups = [list(range(len(prompts)))] if batch else [[i] for i in range(len(prompts))]
    per_step: list[float] = []
    tok_t: list[list[int]] = []
    tok_o: list[list[int]] = []
    for group in groups:
        texts = [template.replace("{prompt}", prompts[i]) for i in group]
        pil = [pipe._load(images[i], i) for i in group]
        inputs = processor(images=pil, text=texts, return_tensors="pt", padding=True)
        # --- torch: prefill then teacher-forced greedy steps with a DynamicCache
        with torch.no_grad():
            out = model(**inputs, use_cache=True, past_key_values=DynamicCache())
            t_logits = [out.logits[:, -1, :].float().numpy()]
            past = out.past_key_values
            mask = inputs["attention_mask"]
            chosen = [t_logits[-1].argmax(-1)]
            for _ in range(steps):
                nxt = torch.from_numpy(chosen[-1])[:, None]
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                out = model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
                past = out.past_key_values
                t_logits.append(out.logits[:, -1, :].float().numpy())
                chosen.append(t_logits[-1].argmax(-1))
        # --- onnx: the same inputs through the runtime's own stages
        enc = [pipe.prompts.encode(prompts[i]) for i in group]
        b = pipe._pad(enc)
        if not np.array_equal(b.ids, inputs["input_ids"].numpy()):
            raise VerifyError(
                f"the artifact's prompt ids ({b.ids.shape[1]} tokens) differ from the checkpoint processor's "
                f"({inputs['input_ids'].shape[1]} tokens); is '{model_dir}' the checkpoint this artifact came from?"
            )
        feats = pipe.encode_images(pipe.preprocess(pil))
        cache = KVCache(pipe.num_layers, len(group), pipe.kv_heads, pipe.head_dim, b.ids.shape[1] + steps + 1,
                        pipe.kv_dtype, device=pipe.decoder.device)
        extra = pipe._extra_inputs(b)
        o_logits = [pipe.prefill(b, feats, cache, extra)]
        amask, pos = b.attention_mask, b.attention_mask.sum(-1) - 1
        for s in range(steps):
            amask = np.concatenate([amask, np.ones((len(group), 1), np.int64)], axis=1)
            pos = pos + 1
            o_logits.append(pipe.decode_one_token(chosen[s].astype(np.int64), amask, pos, cache, extra))
        for s, (tl, ol) in enumerate(zip(t_logits, o_logits)):
            d = float(np.abs(tl - ol).max())
            if s < len(per_step):
                per_step[s] = max(per_step[s], d)
            else:
                per_step.append(d)
        tok_t += np.stack([c for c in chosen[: steps + 1]], 1).tolist()
        tok_o += np.stack([ol.argmax(-1) for ol in o_logits], 1).tolist()
    agree = float(np.mean(np.array(tok_t) == np.array(tok_o)))
    return VerifyReport(max(per_step), per_step, agree, tok_t, tok_o, atol, len(prompts))
