"""Loaders for the official file formats of POPE, CHAIR and MME. Nothing is downloaded: the user points at files.

- POPE (RUCAIBox/POPE `output/{coco,aokvqa,gqa}/*_pope_{random,popular,adversarial}.json`): JSON lines, one
  object per line `{"question_id": int, "image": "COCO_val2014_....jpg", "text": "Is there a ... in the
  image?", "label": "yes"|"no"}`. A JSON array of the same objects is accepted too.
- CHAIR (Rohrbach et al. 2018): COCO `instances_<split>.json` (images, annotations with `category_id`,
  categories with `name`), COCO `captions_<split>.json` (ground-truth captions; objects they mention count as
  present, as the official code does) and the synonym table (default: the official COCO table shipped in
  runtime/eval/coco_synonyms.txt; `category, synonym, ...` per line, parsed as the official code parses it).
- MME (the hallucination subsets existence, count, position, color): per subset either the released layout,
  a folder `<root>/<subset>/` holding `<image>.<ext>` beside `<image>.txt` (or `images/` and
  `questions_answers_YN/` subfolders), each .txt line `question<TAB>answer`; or the eval tool's results layout,
  a file `<root>/<subset>.txt` with lines `image<TAB>question<TAB>answer[<TAB>prediction]` and the images in
  `<image_root>/<subset>/` (or its `images/`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anchorrt.runtime.errors import AnchorError
from anchorrt.runtime.eval.chair import DEFAULT_IMPL, Chair

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MME_HALLUCINATION_SUBSETS = ("existence", "count", "position", "color")


class EvalDataError(AnchorError):
    """A benchmark file is missing or not in the format its loader expects."""


@dataclass
class EvalItem:
    """One question (or caption prompt) of a benchmark: what the harness asks, and what the metric needs."""

    id: str  # unique within the set; the key for resuming
    image: Path
    prompt: str
    label: str | None = None
    meta: dict = field(default_factory=dict)


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise EvalDataError(f"{what} '{path}' does not exist; point at the file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"cannot read {what} '{path}': {exc}") from None


def _read_json(path: Path, what: str):
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{what} '{path}' is not valid JSON (line {exc.lineno}: {exc.msg})") from None


# ------------------------------------------------------------------------------------------------ POPE

def load_pope(path: str | Path, image_root: str | Path) -> list[EvalItem]:
    """POPE questions -> items with label "yes"/"no" (labels are lower-cased)."""
    path, root = Path(path), Path(image_root)
    text = _read_text(path, "POPE file")
    if text.lstrip().startswith("["):
        rows = _read_json(path, "POPE file")
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{path}:{n}: not a JSON object ({exc.msg}); POPE files hold one JSON object "
                                    "per line") from None
    items, seen = [], set()
    for n, row in enumerate(rows, start=1):
        missing = [k for k in ("question_id", "image", "text", "label") if not isinstance(row, dict) or k not in row]
        if missing:
            raise EvalDataError(f"{path}: entry {n} lacks {', '.join(missing)}; a POPE entry is "
                                '{"question_id", "image", "text", "label"}')
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise EvalDataError(f"{path}: entry {n} has label {row['label']!r}; POPE labels are yes or no")
        qid = str(row["question_id"])
        if qid in seen:
            raise EvalDataError(f"{path}: question_id {qid} appears twice; ids must be unique to resume a run")
        seen.add(qid)
        items.append(EvalItem(qid, root / row["image"], str(row["text"]), label, {"image_name": row["image"]}))
    if not items:
        raise EvalDataError(f"POPE file '{path}' holds no questions")
    return items


# ------------------------------------------------------------------------------------------------ CHAIR

@dataclass
class ChairSet:
    items: list[EvalItem]  # one per image; meta["objects"]: ground-truth category nodes
    chair: Chair

    def ground_truth(self) -> dict[str, set[str]]:
        return {it.id: set(it.meta["objects"]) for it in self.items}


def load_synonyms(path: str | Path | None) -> str | None:
    """The synonym table's text (None: the official COCO table)."""
    if path is None:
        return None
    text = _read_text(Path(path), "synonym table")
    if not any(line.strip() for line in text.splitlines()):
        raise EvalDataError(f"synonym table '{path}' is empty; one line per category: 'category, synonym, ...'")
    return text


def make_chair(impl: str = DEFAULT_IMPL, synonyms: str | Path | None = None) -> Chair:
    try:
        return Chair(impl, load_synonyms(synonyms))
    except ValueError as exc:
        raise EvalDataError(str(exc)) from None


def coco_ground_truth(instances, captions, chair: Chair) -> tuple[dict[int, set[str]], dict[int, str]]:
    """COCO annotations (a file or a list of files each: OPERA combines train2014 and val2014) -> ({image id:
    ground-truth nodes}, {image id: file name}), as the official code builds them: the node of every annotated
    category's name, plus the nodes the human captions mention."""
    inst_files = [instances] if isinstance(instances, (str, Path)) else list(instances)
    cap_files = [captions] if isinstance(captions, (str, Path)) else list(captions)
    objects: dict[int, set[str]] = {}
    files: dict[int, str] = {}
    for path in inst_files:
        inst = _read_json(Path(path), "COCO instances file")
        if not isinstance(inst, dict) or any(k not in inst for k in ("images", "annotations", "categories")):
            raise EvalDataError(f"the COCO instances file '{path}' lacks images/annotations/categories; pass "
                                "instances_*.json")
        cat_name = {c["id"]: c["name"] for c in inst["categories"]}
        for img in inst["images"]:
            objects.setdefault(img["id"], set())
            files[img["id"]] = img["file_name"]
        for ann in inst["annotations"]:
            name = cat_name.get(ann["category_id"])
            if name not in chair.inverse:
                raise EvalDataError(f"COCO category {name!r} is not in the synonym table; add a line for it")
            objects.setdefault(ann["image_id"], set()).add(chair.inverse[name])
    for path in cap_files:
        caps = _read_json(Path(path), "COCO captions file")
        if not isinstance(caps, dict) or "annotations" not in caps:
            raise EvalDataError(f"the COCO captions file '{path}' lacks annotations; pass captions_*.json")
        for ann in caps["annotations"]:  # objects the human captions name count as present (official code)
            objects.setdefault(ann["image_id"], set()).update(chair.caption_words(ann.get("caption", "")).nodes)
    return objects, files


def load_chair(instances: str | Path, captions: str | Path, synonyms: str | Path | None, image_root: str | Path,
               prompt: str, sample: int | None = None, seed: int = 0, impl: str = DEFAULT_IMPL) -> ChairSet:
    """COCO annotations -> one captioning item per image with its ground-truth categories. `sample` picks that
    many images at random with `seed` (the usual protocol: 500 val2014 images); else all, in id order."""
    chair = make_chair(impl, synonyms)
    objects, files = coco_ground_truth(instances, captions, chair)
    ids = sorted(files)
    if sample is not None and sample < len(ids):
        ids = sorted(random.Random(seed).sample(ids, sample))
    root = Path(image_root)
    items = [EvalItem(str(i), root / files[i], prompt, None, {"objects": sorted(objects[i]), "image_name": files[i]})
             for i in ids]
    if not items:
        raise EvalDataError(f"the COCO instances file '{instances}' lists no images")
    return ChairSet(items, chair)


# ------------------------------------------------------------------------------------------------ MME

def load_mme(root: str | Path, subsets: Sequence[str] = MME_HALLUCINATION_SUBSETS,
             image_root: str | Path | None = None) -> list[EvalItem]:
    """MME yes/no questions of `subsets` -> items (meta: subset, image name). See the module docstring."""
    root = Path(root)
    items: list[EvalItem] = []
    for subset in subsets:
        results_file = root / f"{subset}.txt"
        folder = root / subset
        if results_file.is_file():
            rows = _mme_results_file(results_file, Path(image_root) if image_root else root, subset)
        elif folder.is_dir():
            rows = _mme_folder(folder)
        else:
            raise EvalDataError(f"no MME subset '{subset}' under '{root}' (looked for {results_file.name} and "
                                f"{folder.name}/)")
        per_image: dict[str, int] = {}
        for image, question, answer in rows:
            label = answer.strip().lower()
            if label not in ("yes", "no"):
                raise EvalDataError(f"MME {subset}: answer {answer!r} for '{image.name}' is not Yes or No")
            k = per_image[image.name] = per_image.get(image.name, 0) + 1
            items.append(EvalItem(f"{subset}/{image.name}/{k}", image, question, label,
                                  {"subset": subset, "image_name": image.name}))
    return items


def _mme_results_file(path: Path, image_root: Path, subset: str) -> list[tuple[Path, str, str]]:
    base = image_root / subset
    if (base / "images").is_dir():
        base = base / "images"
    rows = []
    for n, line in enumerate(_read_text(path, "MME file").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            raise EvalDataError(f"{path}:{n}: expected 'image<TAB>question<TAB>answer', got {len(parts)} field(s)")
        rows.append((base / parts[0], parts[1], parts[2]))
    return rows


def _mme_folder(folder: Path) -> list[tuple[Path, str, str]]:
    if (folder / "questions_answers_YN").is_dir():
        qa_dir, img_dir = folder / "questions_answers_YN", folder / "images"
    else:
        qa_dir = img_dir = folder
    rows = []
    for txt in sorted(qa_dir.glob("*.txt")):
        image = next((img_dir / (txt.stem + ext) for ext in IMAGE_EXTENSIONS if (img_dir / (txt.stem + ext)).is_file()),
                     None)
        if image is None:
            raise EvalDataError(f"MME question file '{txt}' has no image '{txt.stem}.*' in '{img_dir}'")
        for n, line in enumerate(_read_text(txt, "MME question file").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise EvalDataError(f"{txt}:{n}: expected 'question<TAB>answer'")
            rows.append((image, parts[0], parts[1]))
    if not rows:
        raise EvalDataError(f"MME folder '{folder}' holds no question files (*.txt)")
    return rows
