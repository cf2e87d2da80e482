"""Prompt building from the manifest: chat template → token ids with each image placeholder expanded.

The exporter rendered the checkpoint's chat template once (`prompt.template`, with `{prompt}` where the user's
text goes), so the runtime needs no Jinja. The placeholder token is expanded to `tokens_per_image` copies, which is
what transformers' LlavaProcessor does before tokenizing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import ArtifactError, PromptError


@dataclass
class EncodedPrompt:
    ids: np.ndarray  # [S] int64
    image_mask: np.ndarray  # [S] bool: positions that take image features
    num_images: int


class PromptBuilder:
    def __init__(self, tokenizer_path: Path, manifest):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ArtifactError("the tokenizers package is missing; run `pip install anchorrt[cpu]`") from None
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises untyped errors on bad JSON
            raise ArtifactError(f"cannot read tokenizer '{tokenizer_path.name}' ({str(exc)[:120]}); re-export") from None
        self.template: str = manifest.prompt["template"]
        self.placeholder: str = manifest.prompt.get("image_placeholder", manifest.tokens["image_token"])
        self.image_token_id: int = manifest.tokens["image_token_id"]
        self.tokens_per_image: int = manifest.tokens["tokens_per_image"]
        self.context_length: int = manifest.data.get("context_length", manifest.dims["max_position_embeddings"])

    def encode(self, prompt: str, num_images: int = 1, reserve: int = 0) -> EncodedPrompt:
        if not isinstance(prompt, str):
            raise PromptError(f"the prompt must be text, got {type(prompt).__name__}")
        if not prompt.strip():
            raise PromptError("the prompt is empty; give a question or instruction")
        if self.placeholder in prompt:
            raise PromptError(f"the prompt contains the image token '{self.placeholder}'; remove it (images are placed by the template)")
        if num_images != 1:
            raise PromptError(f"this model's prompt format takes exactly one image, got {num_images}")
        text = self.template.replace("{prompt}", prompt)
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)
        spots = np.flatnonzero(ids == self.image_token_id)
        if len(spots) != num_images:
            raise PromptError(f"the prompt tokenizes to {len(spots)} image tokens where {num_images} were expected; "
                              "check the prompt for text that merges with the image token")
        pieces, mask_pieces, start = [], [], 0
        for s in spots:
            pieces += [ids[start:s], np.full(self.tokens_per_image, self.image_token_id, dtype=np.int64)]
            mask_pieces += [np.zeros(s - start, bool), np.ones(self.tokens_per_image, bool)]
            start = s + 1
        pieces.append(ids[start:])
        mask_pieces.append(np.zeros(len(ids) - start, bool))
        full = np.concatenate(pieces)
        if len(full) + reserve > self.context_length:
            raise PromptError(
                f"the prompt is {len(full)} tokens with the image and {reserve} new tokens were asked for, but the "
                f"context holds {self.context_length}; shorten the prompt or lower max_new_tokens"
            )
        return EncodedPrompt(full, np.concatenate(mask_pieces), num_images)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
