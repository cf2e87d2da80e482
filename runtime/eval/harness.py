"""Run benchmark items through a model and keep every answer: batches, a progress bar, `limit`, resume, reports.

    pipe = Pipeline.from_dir("out/demo")
    answer = pipeline_answerer(pipe, max_new_tokens=8, mitigation={"clva": {"alpha": 14.0}})
    records = run_items(load_pope("pope_adversarial.json", "images/"), answer, Path("out/eval/adv.answers.jsonl"),
                        settings={"benchmark": "pope", ...}, batch_size=16)
    metrics = pope_report({"adversarial": records})

The answers file is JSON lines: a header `{"anchorrt_eval": 1, "settings": {...}}`, then one record per answered
item, appended and flushed batch by batch. A run that stops (Ctrl-C, crash) resumes where it stopped: items whose
id is already in the file are skipped; a half-written last line is dropped. The header records every input that
shapes the answers (the artifact's file hashes, backend, device, mitigation, decoding, prompts, and each input
file's path and sha256 and each image folder's path): a file made with other inputs is refused with one line
naming them, rather than mixed or reused; `overwrite=True` starts it over. Result files are written atomically.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from anchorrt.runtime.eval.loaders import EvalDataError, EvalItem
from anchorrt.runtime.eval.metrics import chair_metrics, mme_scores, parse_yes_no, pope_metrics

Answerer = Callable[[Sequence[EvalItem]], list[str]]
HEADER_KEY = "anchorrt_eval"


def pipeline_answerer(pipe, max_new_tokens: int, mitigation: Mapping | None = None) -> Answerer:
    """Answers through a runtime `Pipeline` (greedy). `mitigation` ({"clva": {...}, ...}) is passed to
    `generate_batch` only when it is not empty, so a baseline run works with any runtime version."""
    from anchorrt.runtime.pipeline import Request

    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if mitigation:
        kw["mitigation"] = dict(mitigation)

    def answer(items: Sequence[EvalItem]) -> list[str]:
        return [g.text for g in pipe.generate_batch([Request(str(it.image), it.prompt) for it in items], **kw)]

    return answer


# ------------------------------------------------------------------------------------------------ answers file

class AnswerLog:
    """The resumable answers file of one question set."""

    def __init__(self, path: Path, settings: Mapping):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(dict(settings)))  # as it will read back from JSON

    def load(self) -> dict[str, dict]:
        """Records already in the file (by id); writes the header if the file is new."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_lines([{HEADER_KEY: 1, "settings": self.settings}], mode="w")
            return {}
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):  # a run killed mid-line: drop the partial record
            data = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
        lines = data.decode("utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if HEADER_KEY not in header:
            raise EvalDataError(f"'{self.path}' is not an anchorrt answers file; choose another --out")
        if header.get("settings") != self.settings:
            old = header.get("settings") or {}
            diff = _differences(old, self.settings)
            raise EvalDataError(f"'{self.path}' holds answers made with other inputs ({'; '.join(diff[:4])}); "
                                "use another --out folder, or --overwrite to start over")
        done = {}
        for n, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise EvalDataError(f"{self.path}:{n} is not valid JSON; delete the line or the file") from None
            done[rec["id"]] = rec
        return done

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)

    def append(self, records: Iterable[Mapping]) -> None:
        self._write_lines(records, mode="a")

    def _write_lines(self, records: Iterable[Mapping], mode: str) -> None:
        with open(self.path, mode, encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Keys whose values differ, nested keys dotted: ["image_root: '/a' -> '/b'", ...]."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {_short(a)} -> {_short(b)}")
    return out


def _short(value) -> str:
    text = repr(value)
    return text[:60] + "..." if len(text) > 63 else text


def file_fingerprint(path: str | Path) -> dict:
    """{"path", "sha256"} of an input file (its content, so that an edited file at the same path counts)."""
    import hashlib

    path = Path(path).resolve()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"path": str(path), "sha256": h.hexdigest()}


class _Counter:
    """A progress line for when tqdm is not installed."""

    def __init__(self, total: int, initial: int, desc: str):
        self.total, self.n, self.desc = total, initial, desc
        self.step = max(1, total // 20)
        self._last = initial

    def update(self, k: int) -> None:
        self.n += k
        if self.n - self._last >= self.step or self.n == self.total:
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)
            self._last = self.n

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True)


class _Silent:
    def update(self, k: int) -> None:
        pass

    def close(self) -> None:
        pass


def run_items(items: Sequence[EvalItem], answer: Answerer, answers_path: Path, settings: Mapping,
              batch_size: int = 8, limit: int | None = None, progress: bool = True, desc: str = "eval",
              overwrite: bool = False) -> list[dict]:
    """Answer `items` (the first `limit` of them), skipping those already in `answers_path`; -> one record per
    item, in item order: {"id", "image", "prompt", "label", "answer", "seconds", **meta}. `overwrite` discards
    an existing answers file first."""
    if batch_size < 1:
        raise EvalDataError(f"batch size must be at least 1, got {batch_size}")
    items = list(items[:limit] if limit is not None else items)
    log = AnswerLog(answers_path, settings)
    if overwrite:
        log.discard()
    done = log.load()
    todo = [it for it in items if it.id not in done]
    bar = _progress(len(items), len(items) - len(todo), desc, progress)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            t = time.perf_counter()
            texts = answer(chunk)
            per_item = (time.perf_counter() - t) / len(chunk)
            records = [{"id": it.id, "image": it.meta.get("image_name", it.image.name), "prompt": it.prompt,
                        "label": it.label, "answer": text, "seconds": round(per_item, 5),
                        **{k: v for k, v in it.meta.items() if k != "image_name"}}
                       for it, text in zip(chunk, texts)]
            log.append(records)
            done.update((r["id"], r) for r in records)
            bar.update(len(chunk))
    finally:
        bar.close()
    return [done[it.id] for it in items]


# ------------------------------------------------------------------------------------------------ reports

def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _seconds(records: Sequence[Mapping]) -> float:
    return sum(r.get("seconds", 0.0) for r in records)


def pope_report(records_by_split: Mapping[str, Sequence[Mapping]]) -> tuple[dict, str]:
    """-> ({split: POPE metrics}, markdown table)."""
    out = {}
    for split, recs in records_by_split.items():
        preds = [parse_yes_no(r["answer"]) for r in recs]
        out[split] = pope_metrics(preds, [r["label"] for r in recs])
        out[split]["seconds"] = round(_seconds(recs), 2)
    rows = [(s, m["n"], m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"],
             m["false_positive_rate"]) for s, m in out.items()]
    table = markdown_table(["split", "n", "accuracy", "precision", "recall", "F1", "yes-ratio", "FP rate"], rows)
    return out, table


def chair_report(records: Sequence[Mapping], ground_truth: Mapping[str, set], chair) -> tuple[dict, str]:
    captions = {r["id"]: r["answer"] for r in records}
    m = chair_metrics(captions, ground_truth, chair)
    m["seconds"] = round(_seconds(records), 2)
    md = markdown_table(["captions", "CHAIR_s", "CHAIR_i", "recall", "object mentions", "implementation"],
                        [(m["n_captions"], m["chair_s"], m["chair_i"], m["recall"], m["mentions"], m["impl"])])
    return m, md


def mme_report(records: Sequence[Mapping]) -> tuple[dict, str]:
    m = mme_scores(records)
    rows = [(k, v["n"], v["acc"], v["acc_plus"], v["other"], v["score"]) for k, v in m.items() if k != "totals"]
    t = m["totals"]
    if "hallucination" in t:
        rows.append(("hallucination (existence+count+position+color)", "", "", "", "", t["hallucination"]))
    if t["perception_subsets"]:
        rows.append((f"perception ({t['perception_subsets']}/10 subsets)", "", "", "", "", t["perception"]))
    if t["cognition_subsets"]:
        rows.append((f"cognition ({t['cognition_subsets']}/4 subsets)", "", "", "", "", t["cognition"]))
    return m, markdown_table(["subset", "n", "acc", "acc+", "other", "score"], rows)
