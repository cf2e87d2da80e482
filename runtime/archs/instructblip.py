"""InstructBLIP (Vicuna/Llama) at run time (`model_type` "instructblip", exporter/archs/instructblip.py).

    PIL images ─► ImagePreprocessor (BLIP: resize to H x W, rescale, normalise) ─► pixel_values [N, 3, H, W]
               ─► vision graph ─► image_embeds [N, 1+P, dv] ─┐
    each image's prompt ─► Q-Former tokenizer ([CLS] text [SEP]) ─► qformer_input_ids / mask [N, Lq] (right pad)
               ─► qformer graph ─► image_features [N, Q, d] ─► flat [N*Q, d]

The language-model prompt is transformers' InstructBlipProcessor's: Q image tokens, then the LM tokenizer's
encoding of the raw prompt (BOS first), no chat template (`InstructBlipPromptBuilder`). The Q query outputs are
`V` in the language model (METHODS.md, "Visual positions"), so SEVI, VisAlign and IAVA run on them unchanged;
CLVA runs inside the Q-Former (graph_passes/clva_qformer.py), its flags fed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anchorrt.runtime.archs import RuntimeArch, VisualInput, _input_dtype, register_runtime
from anchorrt.runtime.errors import ArtifactError, ImageError, PromptError
from anchorrt.runtime.mitigation import graph_feeds
from anchorrt.runtime.preprocess import ImagePreprocessor
from anchorrt.runtime.prompt import EncodedPrompt, PromptBuilder


def _load_tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ArtifactError("the tokenizers package is missing; run `pip install anchorrt[cpu]`") from None
    if not path.is_file():
        raise ArtifactError(f"the artifact has no '{path.name}' (InstructBLIP's Q-Former tokenizer); re-export")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises untyped errors on bad JSON
        raise ArtifactError(f"cannot read tokenizer '{path.name}' ({str(exc)[:120]}); re-export") from None


class InstructBlipPromptBuilder(PromptBuilder):
    """[image] * Q + tokenizer(prompt) (BOS first): what InstructBlipProcessor builds. One image per prompt."""

    def encode(self, prompt: str, num_images: int = 1, reserve: int = 0,
               tokens_per_image: int | Sequence[int] | None = None) -> EncodedPrompt:
        self.check(prompt, num_images)
        count = self.tokens_per_image
        if tokens_per_image is not None:
            count = tokens_per_image if isinstance(tokens_per_image, int) else list(tokens_per_image)[0]
        text = np.asarray(self.tokenizer.encode(prompt, add_special_tokens=True).ids, dtype=np.int64)
        if np.any(text == self.image_token_id):
            raise PromptError(f"the prompt tokenizes to the image token '{self.placeholder}'; remove it")
        ids = np.concatenate([np.full(count, self.image_token_id, dtype=np.int64), text])
        if len(ids) + reserve > self.context_length:
            raise PromptError(
                f"the prompt is {len(ids)} tokens with the image and {reserve} new tokens were asked for, but the "
                f"context holds {self.context_length}; shorten the prompt or lower max_new_tokens")
        mask = np.zeros(len(ids), bool)
        mask[:count] = True
        return EncodedPrompt(ids, mask, num_images, spans=[(0, count)])


QFORMER_INPUTS = ("image_embeds", "qformer_input_ids", "qformer_attention_mask")


class QFormerText:
    """The instruction as the Q-Former reads it: BERT WordPiece ids with [CLS]/[SEP], right-padded with 0."""

    def __init__(self, manifest):
        info = manifest.data["instructblip"]
        self.tokenizer = _load_tokenizer(manifest.folder / info["qformer_tokenizer"])
        self.max_length = int(info["qformer_max_length"])

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.tokenizer.encode(t, add_special_tokens=True).ids for t in texts]
        longest = max(len(r) for r in rows)
        if longest > self.max_length:
            raise PromptError(f"the prompt is {longest} Q-Former tokens and InstructBLIP's Q-Former reads at most "
                              f"{self.max_length}; shorten the prompt")
        ids = np.zeros((len(rows), longest), dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask


def check_manifest(manifest) -> None:
    info = manifest.data.get("instructblip")
    ok = isinstance(info, dict) and isinstance(info.get("qformer_tokenizer"), str) and \
        isinstance(info.get("qformer_max_length"), int) and info["qformer_max_length"] > 0 and \
        "qformer" in manifest.data.get("graphs", {})
    if not ok:
        raise ArtifactError("this InstructBLIP artifact's manifest lacks its 'instructblip' fields or qformer graph; "
                            "re-export the model")
    if "/" in info["qformer_tokenizer"] or "\\" in info["qformer_tokenizer"] or info["qformer_tokenizer"] in (".", ".."):
        raise ArtifactError("manifest field instructblip.qformer_tokenizer must be a plain file name; re-export")
    if info["qformer_tokenizer"] not in manifest.data.get("files", {}):  # so its sha256 is checked with the rest
        raise ArtifactError("the manifest has no hash for instructblip.qformer_tokenizer; re-export the model")


@register_runtime("instructblip")
class InstructBlipRuntime(RuntimeArch):
    prompt_builder = InstructBlipPromptBuilder  # the pipeline builds its prompts with this class
    text_conditioned = True  # the features depend on the prompt: IAVA's general stream gets its own
    takes_mitigation = True  # CLVA runs in the qformer graph: `encode` takes each image's parsed flags

    def __init__(self, manifest, open_graph):
        super().__init__(manifest, open_graph)
        check_manifest(manifest)
        self.vision = open_graph("vision")
        self.qformer = open_graph("qformer")
        self.image_processor = ImagePreprocessor(manifest.preprocessing)
        self.tokens_per_image = manifest.tokens["tokens_per_image"]
        self.text = QFormerText(manifest)
        self.qformer_inputs = set(self.qformer.input_names()) - set(QFORMER_INPUTS)

    @property
    def fixed_tokens_per_image(self) -> int:
        return self.tokens_per_image

    def preprocess(self, images: Sequence, first_index: int = 0) -> VisualInput:
        if len(images) == 0:
            raise ImageError("no images to preprocess: expected a non-empty list of PIL images; pass at least one")
        pixel_values = self.image_processor(list(images))  # [N, 3, H, W]
        return VisualInput({"pixel_values": pixel_values}, [self.tokens_per_image] * len(images))

    def encode(self, visual: VisualInput, texts: Sequence[str] | None = None, mitigation: list | None = None
               ) -> np.ndarray:
        """vision -> qformer with each image's prompt -> [N*Q, d]. `mitigation`: runtime.mitigation.parse_request's
        result per image (None: every method off). `texts=None` (the vision-only timing of `anchorrt profile`):
        the Q-Former reads an empty instruction ([CLS] [SEP]); generation always passes the prompts."""
        if texts is None:
            texts = [""] * visual.num_images
        if len(texts) != visual.num_images:
            raise PromptError("InstructBLIP's Q-Former reads each image's prompt; pass one prompt per image")
        pixel_values = visual.feeds["pixel_values"]
        embeds = self.vision.run({"pixel_values": pixel_values.astype(_input_dtype(self.vision, "pixel_values"))},
                                 ["image_embeds"])["image_embeds"]  # [N, 1+P, dv]
        ids, mask = self.text.encode(texts)
        feeds = {"image_embeds": embeds.astype(_input_dtype(self.qformer, "image_embeds")),
                 "qformer_input_ids": ids, "qformer_attention_mask": mask}
        feeds.update(graph_feeds(self.manifest.mitigation, "qformer", self.qformer_inputs, mitigation,
                                 visual.num_images))
        out = self.qformer.run(feeds, ["image_features"])["image_features"]  # [N, Q, d]
        return out.reshape(-1, out.shape[-1])
