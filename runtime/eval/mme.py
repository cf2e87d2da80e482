"""MME scored as the official eval tool scores it (BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation
branch, `tools/eval_tool/calculation.py`; facts in /work/ref/official/NOTES.md).

Per subset ("task") a results file `{task}.txt`, one line per question `image<TAB>question<TAB>gt<TAB>answer`;
consecutive pairs of lines are one image (the tool does not group by image name). The answer is lower-cased:
exactly "yes"/"no", else "yes" if its first four characters hold "yes", else "no" if they hold "no", else
"other" (counted wrong: "Not sure" -> no, "NO" -> no, "" -> other, "  yes" -> other, "know" -> no).
acc = right answers / answers; acc+ = images with both answers right / images; score = 100*acc + 100*acc+.
Perception = the sum over the ten perception subsets, Cognition over the four cognition subsets; the hallucination
score the papers report is the sum over existence, count, position and color.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from anchorrt.runtime.errors import AnchorError

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBSETS = PERCEPTION + COGNITION
HALLUCINATION = ("existence", "count", "position", "color")


class MMEFormatError(AnchorError):
    """An MME results file the official tool would reject."""


def parse_answer(answer: str) -> str:
    """calculation.py's parse_pred_ans on the lower-cased answer -> "yes", "no" or "other"."""
    pred = answer.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def clean_answer(answer: str) -> str:
    """An answer as our results files write it: tabs and line breaks would split the tool's line, so they become
    spaces (the score is computed on this text, so that it equals the tool's on our files)."""
    return " ".join(answer.replace("\t", " ").splitlines()) if answer else ""


def task_score(rows: Sequence[tuple[str, str]], task: str = "") -> dict:
    """`rows`: (gt, answer) per line in file order -> {"acc", "acc_plus", "score", "n", "images", "other"}."""
    if len(rows) % 2:
        raise MMEFormatError(f"MME {task}: {len(rows)} answers, not pairs; the tool reads two questions per image "
                             "on consecutive lines")
    right = other = plus = 0
    for k in range(0, len(rows), 2):
        both = 0
        for gt, answer in rows[k:k + 2]:
            gt = gt.lower()
            if gt not in ("yes", "no"):
                raise MMEFormatError(f"MME {task}: ground truth {gt!r} is not yes or no")
            pred = parse_answer(answer)
            other += pred == "other"
            both += pred == gt
        right += both
        plus += both == 2
    n, images = len(rows), len(rows) // 2
    acc = right / n if n else 0.0
    acc_plus = plus / images if images else 0.0
    return {"n": n, "images": images, "acc": acc, "acc_plus": acc_plus, "score": acc * 100 + acc_plus * 100,
            "other": other}


def totals(per_task: Mapping[str, Mapping]) -> dict:
    """Perception / Cognition sums over the subsets present, and the hallucination sum (all four needed)."""
    out = {"perception": sum(per_task[t]["score"] for t in PERCEPTION if t in per_task),
           "cognition": sum(per_task[t]["score"] for t in COGNITION if t in per_task),
           "perception_subsets": sum(t in per_task for t in PERCEPTION),
           "cognition_subsets": sum(t in per_task for t in COGNITION)}
    if all(t in per_task for t in HALLUCINATION):
        out["hallucination"] = sum(per_task[t]["score"] for t in HALLUCINATION)
    return out


def score_records(records: Iterable[Mapping]) -> dict:
    """Our records ({"subset", "label", "answer"}, in question order) -> {task: scores, ..., "totals": {...}}."""
    by_task: dict[str, list[tuple[str, str]]] = {}
    for r in records:
        by_task.setdefault(r["subset"], []).append((r["label"], clean_answer(r["answer"])))
    per_task = {t: task_score(rows, t) for t, rows in by_task.items()}
    return {**per_task, "totals": totals(per_task)}


def result_lines(records: Iterable[Mapping]) -> dict[str, str]:
    """-> {task: text of `{task}.txt`} in the tool's format, lines in question order."""
    out: dict[str, list[str]] = {}
    for r in records:
        fields = [clean_answer(str(r["image"])), clean_answer(r["prompt"]),
                  "Yes" if r["label"] == "yes" else "No", clean_answer(r["answer"])]
        out.setdefault(r["subset"], []).append("\t".join(fields) + "\n")
    return {t: "".join(lines) for t, lines in out.items()}


def read_results_dir(folder: str | Path) -> dict[str, list[tuple[str, str]]]:
    """The tool's input: `{task}.txt` for each official task present -> {task: [(gt, answer), ...]}; a line that
    does not split into exactly four tab-separated fields is refused, as the tool refuses it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MMEFormatError(f"MME results folder '{folder}' does not exist; pass the folder of <subset>.txt files")
    out = {}
    for task in SUBSETS:
        path = folder / f"{task}.txt"
        if not path.is_file():
            continue
        rows = []
        try:
            with open(path, encoding="utf-8") as f:  # readlines(), as the tool reads: each line keeps its "\n"
                lines = f.readlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise MMEFormatError(f"cannot read '{path}': {exc}") from None
        for n, line in enumerate(lines, start=1):
            parts = line.split("\t")
            if len(parts) != 4:
                raise MMEFormatError(f"{path}:{n}: {len(parts)} tab-separated fields; the tool needs exactly 4: "
                                     "image, question, ground truth, answer")
            rows.append((parts[2], parts[3]))
        out[task] = rows
    if not out:
        raise MMEFormatError(f"no MME results file (<subset>.txt for {', '.join(SUBSETS[:4])}, ...) in '{folder}'")
    return out
