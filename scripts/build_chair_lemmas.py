"""Build runtime/eval/chair_lemmas.json: the WordNet 3.0 lemmas that the OPERA/VCD copy of CHAIR needs.

    python scripts/build_chair_lemmas.py /usr/share/wordnet        # Debian's wordnet-base (WordNet 3.0)

OPERA's `chair.py` lemmatizes every caption token with nltk's `WordNetLemmatizer().lemmatize(word, pos)` (WordNet
3.0 data, nltk 3.6+ `_morphy`: the exception list when the word is in it, else each detachment rule applied once;
the candidates that WordNet holds for that part of speech, the word itself first; the shortest wins, the word
itself when none). Only lemmas that can matter are shipped: those in the COCO synonym table (and the demo
world's), the words of the double-word table and "toilet"/"seat". For each part of speech (n, v, a, r) the table
maps every surface form whose lemma is such a word -- and every such word whose lemma is something else -- to its
lemma; a form not in the table has a lemma that CHAIR never looks at (see runtime/eval/chair.py).

No code from nltk: the rules are WordNet's morphy (wndb(5WN), morphy(7WN)) as nltk applies them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchorrt.runtime.eval.chair import DETACH, relevant_words  # noqa: E402

FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


def load_wordnet(folder: Path) -> tuple[dict[str, set[str]], dict[str, dict[str, list[str]]]]:
    index: dict[str, set[str]] = {p: set() for p in FILES}
    exc: dict[str, dict[str, list[str]]] = {p: {} for p in FILES}
    for pos, name in FILES.items():
        for line in (folder / f"index.{name}").read_text(encoding="latin-1").splitlines():
            if line and not line.startswith(" "):
                index[pos].add(line.split()[0])
        for line in (folder / f"{name}.exc").read_text(encoding="latin-1").splitlines():
            terms = line.split()
            if terms:
                exc[pos][terms[0]] = terms[1:]
    return index, exc


def lemmatize(word: str, pos: str, index, exc) -> str:
    forms = exc[pos][word] if word in exc[pos] else [word[: -len(old)] + new for old, new in DETACH[pos]
                                                     if word.endswith(old)]
    found: list[str] = []
    for f in [word, *forms]:
        if f in index[pos] and f not in found:
            found.append(f)
    return min(found, key=len) if found else word


def build(folder: Path) -> dict:
    index, exc = load_wordnet(folder)
    targets = relevant_words()
    table: dict[str, dict[str, str]] = {}
    for pos in FILES:
        cands = set(targets)
        for t in targets:
            cands.update(t[: len(t) - len(new)] + old for old, new in DETACH[pos] if t.endswith(new))
        cands.update(k for k, v in exc[pos].items() if targets.intersection(v))
        out = {}
        for form in sorted(cands):
            lemma = lemmatize(form, pos, index, exc)
            if (lemma in targets or form in targets) and lemma != form:
                out[form] = lemma
        table[pos] = out
    return {"source": "WordNet 3.0 (index.*, *.exc); see scripts/build_chair_lemmas.py",
            "targets": sorted(targets), "lemmas": table}


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/wordnet")
    doc = build(folder)
    out = ROOT / "runtime" / "eval" / "chair_lemmas.json"
    out.write_text(json.dumps(doc, indent=0, sort_keys=True) + "\n")
    print(f"wrote {out}: " + ", ".join(f"{p} {len(v)}" for p, v in doc["lemmas"].items()))
