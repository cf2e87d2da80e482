"""Hallucination metrics, exactly as ../shared/METHODS.md "Evaluation protocol" fixes them.

- POPE (Li et al. 2023, RUCAIBox/POPE `evaluate.py`): an answer's text before the first ".", commas removed,
  split on spaces; any of the words `No`, `not`, `no` means "no", anything else "yes". Accuracy, precision,
  recall, F1 and yes-ratio with "yes" as the positive class; we add the false-positive rate
  `FP / (FP + TN)`, the share of absent objects the model claims to see.
- CHAIR (Rohrbach et al. 2018): the objects a caption mentions (through a synonym table, every mention
  counted, as the reference code does) against the image's ground-truth objects.
  CHAIR_i = hallucinated mentions / all mentions; CHAIR_s = captions with a hallucinated mention / captions;
  recall = ground-truth objects mentioned / ground-truth objects (summed over images).
- MME (Fu et al. 2023): per subset, acc over questions and acc+ over images (every question of the image
  right); score = 100*acc + 100*acc+ (max 200). Answers are parsed with the POPE rule (one rule everywhere).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

NO_WORDS = frozenset({"No", "not", "no"})


def parse_yes_no(text: str) -> str:
    """POPE's rule: "no" if the first sentence holds the word No, not or no (case as written), else "yes"."""
    first = text.split(".")[0]
    words = first.replace(",", "").split(" ")
    return "no" if NO_WORDS.intersection(words) else "yes"


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """`predictions` and `labels` are "yes"/"no" (parse raw answers with `parse_yes_no` first)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    bad = {x for x in (*predictions, *labels) if x not in ("yes", "no")}
    if bad:
        raise ValueError(f"POPE predictions and labels must be 'yes' or 'no', got {sorted(bad)[:3]}")
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predictions, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predictions, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(predictions, labels))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predictions, labels))
    n = len(labels)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "n": n,
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
        "false_positive_rate": _ratio(fp, fp + tn),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


# ------------------------------------------------------------------------------------------------ CHAIR

@dataclass(frozen=True)
class SynonymTable:
    """word or phrase (lower case, singular) -> category name. `max_words`: the longest phrase, in words."""

    words: Mapping[str, str]
    categories: tuple[str, ...]

    @property
    def max_words(self) -> int:
        return max((len(w.split()) for w in self.words), default=1)

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> SynonymTable:
        """One category per line: `category, synonym, synonym, ...` (the first entry names the category and is a
        synonym of itself), the layout of the CHAIR reference code's `synonyms.txt`. Blank lines and lines
        starting with # are skipped."""
        words: dict[str, str] = {}
        cats: list[str] = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            entries = [_norm(e) for e in line.split(",") if e.strip()]
            cats.append(entries[0])
            for e in entries:
                words.setdefault(e, entries[0])
        return cls(words, tuple(cats))


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z]+", text.lower()))


def _singular(word: str, known: Mapping[str, str]) -> str:
    """A small stand-in for the reference code's singularizer: strip plural endings when that gives a known word."""
    if word in known:
        return word
    for suffix, repl in (("ies", "y"), ("ves", "f"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and word[: -len(suffix)] + repl in known:
            return word[: -len(suffix)] + repl
    return word


def caption_objects(caption: str, table: SynonymTable) -> list[str]:
    """Categories a caption mentions, one entry per mention, longest phrase first (e.g. "hot dog" before "dog")."""
    words = [_singular(w, table.words) for w in re.findall(r"[a-z]+", caption.lower())]
    found, i = [], 0
    longest = table.max_words
    while i < len(words):
        for span in range(min(longest, len(words) - i), 0, -1):
            phrase = " ".join(words[i:i + span])
            if phrase in table.words:
                found.append(table.words[phrase])
                i += span
                break
        else:
            i += 1
    return found


def chair_metrics(captions: Mapping, ground_truth: Mapping, table: SynonymTable) -> dict:
    """`captions`: image id -> generated caption; `ground_truth`: image id -> set of category names.
    -> {"chair_s", "chair_i", "recall", "n_captions", "mentions", "hallucinated_mentions", "per_image"}."""
    mentions = hallucinated = bad_captions = covered = total_gt = 0
    per_image = {}
    for image_id, text in captions.items():
        gt = set(ground_truth.get(image_id, ()))
        objs = caption_objects(text, table)
        wrong = [o for o in objs if o not in gt]
        mentions += len(objs)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        covered += len(gt & set(objs))
        total_gt += len(gt)
        per_image[image_id] = {"mentioned": objs, "hallucinated": wrong, "ground_truth": sorted(gt)}
    return {
        "chair_s": _ratio(bad_captions, len(captions)),
        "chair_i": _ratio(hallucinated, mentions),
        "recall": _ratio(covered, total_gt),
        "n_captions": len(captions),
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "per_image": per_image,
    }


# ------------------------------------------------------------------------------------------------ MME

def mme_scores(records: Iterable[Mapping]) -> dict:
    """`records`: {"subset", "image", "label", "prediction"} with "yes"/"no" values.
    -> {subset: {"n", "images", "acc", "acc_plus", "score"}, ..., "total": sum of the subset scores}."""
    by_subset: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_subset[r["subset"]][r["image"]].append(r["prediction"] == r["label"])
    out: dict = {}
    for subset, images in sorted(by_subset.items()):
        flat = [ok for oks in images.values() for ok in oks]
        acc = _ratio(sum(flat), len(flat))
        acc_plus = _ratio(sum(all(oks) for oks in images.values()), len(images))
        out[subset] = {"n": len(flat), "images": len(images), "acc": acc, "acc_plus": acc_plus,
                       "score": 100 * acc + 100 * acc_plus}
    out["total"] = sum(v["score"] for v in out.values())
    return out
