"""Compare our CHAIR with an official `chair.py` on the same captions (where the official code can run).

    python scripts/compare_official_chair.py --official path/to/OPERA/chair.py --coco-path coco/annotations \
        --cap-file captions.json [--impl opera|rohrbach] [--image-id-key image_id] [--caption-key caption]

`--official` is a copy of the official script that you obtained (OPERA's `chair.py`, or a Python-3 port of the
Rohrbach code with the same interface: `CHAIR(coco_path).compute_chair(cap_file, image_id_key, caption_key)`
returning {"sentences": [...], "overall_metrics": {"CHAIRs", "CHAIRi", "Recall"}}); it needs nltk and its data
(punkt, averaged_perceptron_tagger, wordnet) installed in that environment. `--coco-path` holds
instances_{train,val}2014.json and captions_{train,val}2014.json, as the official script reads them.
Prints both sets of metrics and every caption whose object words differ; exit 1 on any difference at 4
decimals. This is how the one approximate step of our ``opera`` variant, nltk's POS tagger (see
runtime/eval/chair.py), can be measured where the tagger's weights exist.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchorrt.runtime.eval.chair import Chair  # noqa: E402
from anchorrt.runtime.eval.formats import read_chair_captions  # noqa: E402
from anchorrt.runtime.eval.loaders import coco_ground_truth  # noqa: E402


def compare(official: Path, coco_path: Path, cap_file: Path, impl: str = "opera", image_id_key: str = "image_id",
            caption_key: str = "caption", show: int = 20) -> int:
    spec = importlib.util.spec_from_file_location("official_chair", official)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.CHAIR(str(coco_path)).compute_chair(str(cap_file), image_id_key, caption_key)
    theirs = out["overall_metrics"]

    chair = Chair(impl)
    files = [coco_path / f"{kind}_{split}2014.json" for kind in ("instances", "captions") for split in ("val", "train")]
    objects, _ = coco_ground_truth(files[:2], files[2:], chair)
    caps = read_chair_captions(cap_file, image_id_key, caption_key)
    ours = chair.score(caps, {str(k): v for k, v in objects.items()})

    rows = [("CHAIRs", "chair_s"), ("CHAIRi", "chair_i"), ("Recall", "recall")]
    bad = 0
    for name, key in rows:
        if name in theirs:
            same = round(theirs[name], 4) == round(ours[key], 4)
            bad += not same
            print(f"{name:7s} official {theirs[name]:.4f}  ours {ours[key]:.4f}  {'ok' if same else 'DIFFERENT'}")
    diffs = [(s["caption"], list(s["mscoco_generated_words"]), chair.caption_words(s["caption"]).nodes)
             for s in out["sentences"] if list(s["mscoco_generated_words"]) != chair.caption_words(s["caption"]).nodes]
    print(f"captions whose object words differ: {len(diffs)} of {len(out['sentences'])}")
    for caption, a, b in diffs[:show]:
        print(f"  {caption!r}\n    official {a}\n    ours     {b}")
    return 1 if bad or diffs else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="the official chair.py (OPERA-style interface)")
    ap.add_argument("--coco-path", type=Path, required=True)
    ap.add_argument("--cap-file", type=Path, required=True)
    ap.add_argument("--impl", choices=["opera", "rohrbach"], default="opera")
    ap.add_argument("--image-id-key", default="image_id")
    ap.add_argument("--caption-key", default="caption")
    a = ap.parse_args(argv)
    return compare(a.official, a.coco_path, a.cap_file, a.impl, a.image_id_key, a.caption_key)


if __name__ == "__main__":
    sys.exit(main())
