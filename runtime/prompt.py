"""Prompt building from the manifest: chat template → token ids with each image placeholder expanded.

The exporter rendered the checkpoint's chat template once (`prompt.template`, with `{prompt}` where the user's
text goes), so the runtime needs no Jinja. Each image's placeholder token is expanded to that image's number of
image-token positions (fixed for LLaVA-1.5, given per image by the runtime arch module otherwise), which is what
transformers' LlavaProcessor does before tokenizing; the spans of the expanded images are recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from anchorrt.runtime.errors import ArtifactError, PromptError


@dataclass
class EncodedPrompt:
    ids: np.ndarray  # [S] int64
    image_mask: np.ndarray  # [S] bool: positions that take image features
    num_images: int
    images: list[int] = field(default_factory=list)  # global index of each image (set by the pipeline)
    spans: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each image's positions, in order


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
        video = manifest.prompt.get("video_placeholder")  # Qwen2-VL: the video-pad token, refused in prompts
        self.video_placeholder: str | None = video if isinstance(video, str) and video else None
        self.context_length: int = manifest.data.get("context_length", manifest.dims["max_position_embeddings"])
        # What the chat template puts between consecutive images of one message (recorded at export by rendering
        # it with two images); None: the artifact takes one image per prompt.
        self.image_separator: str | None = manifest.prompt.get("image_separator")

    def check(self, prompt: str, num_images: int = 1) -> None:
        """The checks that need no image-token counts (run before any image is decoded)."""
        if not isinstance(prompt, str):
            raise PromptError(f"the prompt must be text, got {type(prompt).__name__}")
        if not prompt.strip():
            raise PromptError("the prompt is empty; give a question or instruction")
        if self.placeholder in prompt:
            raise PromptError(f"the prompt contains the image token '{self.placeholder}'; remove it (images are placed by the template)")
        if self.video_placeholder and self.video_placeholder in prompt:
            raise PromptError(f"the prompt contains the video token '{self.video_placeholder}'; video input is not "
                              "supported (still images only): remove it and pass video frames as images")
        if num_images < 1:
            raise PromptError("a prompt needs at least one image; pass one")
        if num_images > 1 and (self.image_separator is None or self.template.count(self.placeholder) != 1):
            raise PromptError(f"this artifact's prompt format takes exactly one image, got {num_images}; pass one "
                              "image per prompt (or re-export with a chat template that takes several images)")

    def encode(self, prompt: str, num_images: int = 1, reserve: int = 0,
               tokens_per_image: int | Sequence[int] | None = None) -> EncodedPrompt:
        """Render, tokenize, and expand image i's placeholder to `tokens_per_image[i]` copies (an int: the same
        count for every image; None: the manifest's fixed count)."""
        self.check(prompt, num_images)
        if tokens_per_image is None:
            tokens_per_image = self.tokens_per_image
        counts = [tokens_per_image] * num_images if isinstance(tokens_per_image, int) else list(tokens_per_image)
        if len(counts) != num_images:
            raise PromptError(f"{len(counts)} image-token counts for {num_images} images; pass one count per image")
        template = self.template
        if num_images > 1:  # the images of one message sit together, as the checkpoint's chat template puts them
            template = template.replace(self.placeholder, self.image_separator.join([self.placeholder] * num_images))
        text = template.replace("{prompt}", prompt)
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)
        spots = np.flatnonzero(ids == self.image_token_id)
        if len(spots) != num_images:
            raise PromptError(f"the prompt tokenizes to {len(spots)} image tokens where {num_images} were expected; "
                              "check the prompt for text that merges with the image token")
        pieces, mask_pieces, spans, start, length = [], [], [], 0, 0
        for s, count in zip(spots, counts):
            pieces += [ids[start:s], np.full(count, self.image_token_id, dtype=np.int64)]
            mask_pieces += [np.zeros(s - start, bool), np.ones(count, bool)]
            length += s - start
            spans.append((int(length), int(length + count)))
            length += count
            start = s + 1
        pieces.append(ids[start:])
        mask_pieces.append(np.zeros(len(ids) - start, bool))
        full = np.concatenate(pieces)
        if len(full) + reserve > self.context_length:
            raise PromptError(
                f"the prompt is {len(full)} tokens with the image and {reserve} new tokens were asked for, but the "
                f"context holds {self.context_length}; shorten the prompt or lower max_new_tokens"
            )
        return EncodedPrompt(full, np.concatenate(mask_pieces), num_images, spans=spans)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
