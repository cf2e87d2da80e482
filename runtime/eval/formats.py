"""Answer files in the official scripts' formats, written from our runs and read from anyone's.

- POPE (RUCAIBox/POPE `evaluate.py`): JSON lines in question-file order, one per question; evaluate.py reads
  `answer`, LLaVA's `eval_pope.py` reads `text` and `question_id`: we write all three (plus `prompt`). Scoring
  pairs the i-th answer with the i-th question, as evaluate.py does; where both carry a question_id they must
  agree.
- MME (eval tool `calculation.py`): a folder with `{subset}.txt` per subset, lines
  `image<TAB>question<TAB>Yes|No<TAB>answer` in question order (runtime/eval/mme.py).
- CHAIR: OPERA's `chair.py --cap_file` input, a JSON list of `{"image_id": int, "caption": str}`; read back from
  a JSON list, JSON lines, LisaAnne's `{"imgToEval": {id: {"image_id", "caption"}}}` or our answers files.
Every file is written atomically (harness.write_atomic).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from anchorrt.runtime.eval.loaders import EvalDataError

HEADER_KEY = "anchorrt_eval"


def _int_or_str(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _json_rows(path: Path, what: str) -> list:
    """A JSON array, or JSON lines (our answers files' header line skipped)."""
    if not path.is_file():
        raise EvalDataError(f"{what} '{path}' does not exist; point at the file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"cannot read {what} '{path}': {exc}") from None
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and "\n" not in stripped.strip()):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{what} '{path}' is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return data if isinstance(data, list) else [data]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path}:{n}: not a JSON object ({exc.msg}); expected JSON lines") from None
        if isinstance(row, dict) and HEADER_KEY in row:
            continue
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ POPE

def pope_answer_lines(records: Sequence[Mapping]) -> str:
    return "".join(json.dumps({"question_id": _int_or_str(r["id"]), "prompt": r["prompt"], "text": r["answer"],
                               "answer": r["answer"]}) + "\n" for r in records)


def read_pope_answers(path: str | Path) -> list[tuple[object, str]]:
    """-> [(question_id or None, answer text)] in file order; the text is `answer`, else `text`."""
    path = Path(path)
    out = []
    for n, row in enumerate(_json_rows(path, "POPE answers file"), start=1):
        if not isinstance(row, dict) or not any(isinstance(row.get(k), str) for k in ("answer", "text")):
            raise EvalDataError(f"{path}: entry {n} has no 'answer' (or 'text') string; POPE answers are JSON lines "
                                '{"question_id", "answer"}')
        text = row["answer"] if isinstance(row.get("answer"), str) else row["text"]
        out.append((row.get("question_id", row.get("id")), text))
    if not out:
        raise EvalDataError(f"POPE answers file '{path}' holds no answers")
    return out


def pair_pope(answers: Sequence[tuple[object, str]], items: Sequence, where: str) -> list[dict]:
    """i-th answer with i-th question (evaluate.py's pairing) -> records {"id", "label", "answer"}."""
    if len(answers) != len(items):
        raise EvalDataError(f"{where}: {len(answers)} answers for {len(items)} questions; the answers file must hold "
                            "one answer per question, in the question file's order")
    out = []
    for (qid, text), it in zip(answers, items):
        if qid is not None and str(qid) != it.id:
            raise EvalDataError(f"{where}: answer for question_id {qid} stands where the questions have {it.id}; "
                                "write the answers in the question file's order")
        out.append({"id": it.id, "label": it.label, "answer": text})
    return out


# ------------------------------------------------------------------------------------------------ CHAIR

def chair_caption_doc(records: Sequence[Mapping]) -> str:
    return json.dumps([{"image_id": _int_or_str(r["id"]), "caption": r["answer"]} for r in records], indent=1) + "\n"


def read_chair_captions(path: str | Path, image_id_key: str = "image_id",
                        caption_key: str = "caption") -> list[tuple[str, str]]:
    """-> [(image id as str, caption)] in file order; an image listed twice counts twice, as in OPERA's list."""
    path = Path(path)
    rows = _json_rows(path, "CHAIR captions file")
    if len(rows) == 1 and isinstance(rows[0], dict) and "imgToEval" in rows[0]:
        rows = list(rows[0]["imgToEval"].values())
    out = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise EvalDataError(f"{path}: entry {n} is not an object; expected {{'{image_id_key}', '{caption_key}'}}")
        image_id = row.get(image_id_key, row.get("id"))
        caption = row.get(caption_key, row.get("answer"))
        if image_id is None or not isinstance(caption, str):
            raise EvalDataError(f"{path}: entry {n} lacks '{image_id_key}' or '{caption_key}'; set --image-id-key / "
                                "--caption-key to the file's keys")
        out.append((str(image_id), caption))
    if not out:
        raise EvalDataError(f"CHAIR captions file '{path}' holds no captions")
    return out
