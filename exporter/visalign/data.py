"""LLaVA-format training data for VisAlign: a JSON list of {image, conversations}, checked up front.

    [{"id": "0001", "image": "coco/0001.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                        {"from": "gpt", "value": "A red cup."}, ...]}, ...]

Every entry is checked before any training starts (a missing image, a malformed conversation, an entry with no
answer token), and the first bad one is reported as one line naming its index, so a 600k-entry file does not
fail an hour in.

Prompt format: the first question goes through the checkpoint's single-turn template, the one the exporter
writes into the artifact manifest (`LlavaArch.prompt_template`), so the trained model sees at training time
exactly the prompt tokens the runtime feeds it. Each answer follows as `" " + answer + eos` (LLaVA-1.5's
"ASSISTANT: answer</s>"). Later turns use the same template without the image placeholder. Labels cover the
answer tokens (and their eos) only; everything else is -100.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from anchorrt.runtime.errors import AnchorError

IMAGE_TAG = "<image>"
IGNORE = -100  # the label of a position that has no loss (prompt, image, padding)
ROLES = ("human", "gpt")


class TrainingDataError(AnchorError):
    """The training data cannot be used (names the entry's index and what is wrong)."""


@dataclass
class Example:
    index: int
    image_path: Path
    input_ids: list[int]  # the image placeholder expanded to tokens_per_image copies
    image_mask: list[bool]
    labels: list[int]  # IGNORE except on answer tokens


@dataclass
class PromptFormat:
    """How conversations become tokens: the tokenizer, the artifact's template and the image expansion."""

    tokenizer: object  # a transformers fast tokenizer
    template: str  # single-turn, with {prompt} and the image placeholder
    image_token: str
    image_token_id: int
    tokens_per_image: int
    eos_token_id: int
    max_length: int

    @property
    def follow_up(self) -> str:
        return self.template.replace(self.image_token + "\n", "").replace(self.image_token, "")

    def encode(self, text: str, first: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=first)["input_ids"])

    def answer_ids(self, prompt_text: str, answer: str, first: bool) -> list[int]:
        """The answer's tokens as they follow the prompt: tokenized together with it (as LLaVA tokenizes whole
        conversations), then split at the prompt's own tokens; if the two disagree at the boundary (a merge across
        it), the answer alone."""
        prompt = self.encode(prompt_text, first)
        joint = self.encode(prompt_text + " " + answer, first)
        if joint[:len(prompt)] == prompt:
            ids = joint[len(prompt):]
        else:
            ids = self.encode(" " + answer, False)
        return ids + [self.eos_token_id] if ids else []


def _fail(index: int, entry: object, what: str) -> TrainingDataError:
    ident = entry.get("id") if isinstance(entry, dict) else None
    label = f"entry {index}" + (f" (id {ident!r})" if ident is not None else "")
    return TrainingDataError(f"training data {label}: {what}")


def _image_path(index: int, entry: dict, image_root: Path) -> Path:
    name = entry.get("image")
    if not isinstance(name, str) or not name.strip():
        raise _fail(index, entry, "no \"image\": VisAlign trains on image-text pairs (one image per entry)")
    path = image_root / name
    if not path.is_file():
        raise _fail(index, entry, f"image '{name}' not found under '{image_root}'")
    try:
        from PIL import Image

        with Image.open(path) as img:  # reads the header only; the pixels are read when the step needs them
            img.size  # noqa: B018 - touching the size makes PIL parse the header
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
        raise _fail(index, entry, f"image '{name}' cannot be read ({exc.__class__.__name__})") from None
    return path


def _turns(index: int, entry: dict) -> list[tuple[str, str]]:
    conv = entry.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise _fail(index, entry, "malformed conversation: \"conversations\" must be a non-empty list of "
                                  "{\"from\": \"human\"|\"gpt\", \"value\": text}")
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise _fail(index, entry, f"malformed conversation: turn {k} is not {{\"from\": \"human\"|\"gpt\", "
                                      "\"value\": text}")
        expected = ROLES[k % 2]
        if turn["from"] != expected:
            raise _fail(index, entry, f"malformed conversation: turn {k} is from '{turn['from']}', expected "
                                      f"'{expected}' (turns alternate human, gpt)")
    if len(conv) % 2:
        raise _fail(index, entry, "malformed conversation: the last human turn has no gpt answer")
    tags = sum(t["value"].count(IMAGE_TAG) for t in conv)
    if tags > 1:
        raise _fail(index, entry, f"malformed conversation: {tags} '{IMAGE_TAG}' tags; one image per entry")
    if any(IMAGE_TAG in t["value"] for t in conv[1:]):
        raise _fail(index, entry, f"malformed conversation: '{IMAGE_TAG}' must be in the first human turn")
    pairs = []
    for k in range(0, len(conv), 2):
        # the template places the image; LLaVA data carries "<image>\n" at the start (or end) of the first turn
        question = conv[k]["value"].replace(IMAGE_TAG, "").strip()
        if not question:
            raise _fail(index, entry, f"malformed conversation: turn {k} has no question text")
        pairs.append((question, conv[k + 1]["value"].strip()))
    return pairs


def encode_entry(index: int, entry: object, image_root: Path, fmt: PromptFormat) -> Example:
    if not isinstance(entry, dict):
        raise _fail(index, entry, f"must be an object {{\"image\", \"conversations\"}}, got {type(entry).__name__}")
    pairs = _turns(index, entry)
    path = _image_path(index, entry, image_root)
    ids: list[int] = []
    image_mask: list[bool] = []
    labels: list[int] = []
    for k, (question, answer) in enumerate(pairs):
        first = k == 0
        prompt_text = (fmt.template if first else fmt.follow_up).replace("{prompt}", question)
        prompt = fmt.encode(prompt_text, first)
        if first:
            spots = [i for i, t in enumerate(prompt) if t == fmt.image_token_id]
            if len(spots) != 1:
                raise _fail(index, entry, f"the prompt tokenizes to {len(spots)} image tokens, expected 1")
            s = spots[0]
            prompt = prompt[:s] + [fmt.image_token_id] * fmt.tokens_per_image + prompt[s + 1:]
            mask = [False] * s + [True] * fmt.tokens_per_image + [False] * (len(prompt) - s - fmt.tokens_per_image)
        else:
            mask = [False] * len(prompt)
        answer_ids = fmt.answer_ids(prompt_text, answer, first) if answer else []
        ids += prompt + answer_ids
        image_mask += mask + [False] * len(answer_ids)
        labels += [IGNORE] * len(prompt) + answer_ids
    if sum(image_mask[:fmt.max_length]) != fmt.tokens_per_image:
        raise _fail(index, entry, f"the image does not fit in max_length={fmt.max_length} tokens")
    ids, image_mask, labels = ids[:fmt.max_length], image_mask[:fmt.max_length], labels[:fmt.max_length]
    if all(label == IGNORE for label in labels):
        raise _fail(index, entry, f"no answer tokens (empty gpt answers, or the prompt fills max_length="
                                  f"{fmt.max_length}): nothing to learn from")
    return Example(index, path, ids, image_mask, labels)


def load_examples(data_path: str | Path, image_root: str | Path | None, fmt: PromptFormat) -> list[Example]:
    """Read and check the whole file; the first bad entry raises TrainingDataError naming its index."""
    data_path = Path(data_path)
    root = Path(image_root) if image_root is not None else data_path.parent
    if not data_path.is_file():
        raise TrainingDataError(f"training data '{data_path}' does not exist")
    if not root.is_dir():
        raise TrainingDataError(f"image folder '{root}' does not exist")
    try:
        data = json.loads(data_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainingDataError(f"training data '{data_path.name}' is not valid JSON ({exc})") from None
    if not isinstance(data, list) or not data:
        raise TrainingDataError(f"training data '{data_path.name}' must be a non-empty JSON list of "
                                "{\"image\", \"conversations\"} (the LLaVA format)")
    return [encode_entry(i, entry, root, fmt) for i, entry in enumerate(data)]
