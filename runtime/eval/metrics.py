"""Hallucination metrics, exactly as ../shared/METHODS.md "Evaluation protocol" fixes them: each benchmark as its
official code scores it.

- POPE (Li et al. 2023, RUCAIBox/POPE `evaluate.py`): an answer's text before the first ".", commas removed,
  split on spaces; any of the words `No`, `not`, `no` means "no", anything else "yes". Accuracy, precision,
  recall, F1 and yes-ratio with "yes" as the positive class; we add the false-positive rate
  `FP / (FP + TN)`, the share of absent objects the model claims to see. An all-"no" answer set has no
  positive prediction: evaluate.py divides by zero there (ZeroDivisionError); we report precision 0 and F1 0.
- CHAIR (Rohrbach et al. 2018): runtime/eval/chair.py, the official code's two variants word for word.
- MME (Fu et al. 2023): runtime/eval/mme.py, the official eval tool's rule (not POPE's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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


# ------------------------------------------------------------------------------------------------ CHAIR, MME

def chair_metrics(captions: Mapping, ground_truth: Mapping, chair) -> dict:
    """`captions`: image id -> generated caption; `ground_truth`: image id -> category nodes; `chair`: a
    runtime.eval.chair.Chair. -> {"chair_s", "chair_i", "recall", "n_captions", "mentions", ...}."""
    return chair.score(captions, ground_truth)


def mme_scores(records: Iterable[Mapping]) -> dict:
    """`records`: {"subset", "label", "answer"} in question order -> {subset: {"acc", "acc_plus", "score", ...},
    "totals": {"perception", "cognition", "hallucination"}} (runtime/eval/mme.py)."""
    from anchorrt.runtime.eval.mme import score_records

    return score_records(records)
