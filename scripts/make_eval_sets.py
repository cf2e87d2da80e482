"""Write the synthetic world's POPE, MME and CHAIR sets in the benchmarks' official file formats.

    python scripts/make_eval_sets.py --out out/world-eval

    out/world-eval/pope/world_pope_{random,popular,adversarial}.json   JSON lines {question_id, image, text, label}
    out/world-eval/pope/images/*.png, pope/world_pope_meta.json (objects per image, trap flag per negative)
    out/world-eval/mme/{existence,color,position}/<image>.png + <image>.txt   "question<TAB>Yes|No" per line
    out/world-eval/chair/instances_world.json, captions_world.json            COCO annotation format
    out/world-eval/chair/synonyms.txt, chair/images/*.png

`anchorrt eval pope|mme|chair` then reads them exactly as it reads the real files. Torch-free; deterministic for
`--seed` (POPE uses the seed, MME seed + 1, CHAIR seed + 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchorrt.runtime.eval.world import SHAPES, World, caption, chair_set, mme_sets, pope_sets  # noqa: E402

SYNONYMS = {  # category -> other words for it (the model's own vocabulary uses the category names)
    "circle": ["disc", "disk"], "square": [], "triangle": [], "star": [], "cross": ["plus"],
    "diamond": ["rhombus", "lozenge"], "ring": ["annulus", "donut"], "moon": ["crescent"],
}


def write_pope(world: World, out: Path, n_images: int, seed: int) -> list[Path]:
    scenes, splits = pope_sets(world, n_images=n_images, seed=seed)
    _save_images(world, scenes, out / "images")
    files = []
    # Not part of POPE's format: what each image holds and which negatives are co-occurrence traps (an anchor in
    # the image, its usual partner absent), for breaking the false positives down.
    meta = {"images": {name: [f"{o.colour} {o.shape}" for o in sc.objects] for name, sc in scenes.items()},
            "questions": {split: {q.question_id: q.meta for q in qs} for split, qs in splits.items()}}
    (out / "world_pope_meta.json").write_text(json.dumps(meta))
    for split, questions in splits.items():
        path = out / f"world_pope_{split}.json"
        with open(path, "w", encoding="utf-8") as f:
            for q in questions:
                f.write(json.dumps({"question_id": q.question_id, "image": q.image, "text": q.text,
                                    "label": q.label}) + "\n")
        files.append(path)
    return files


def write_mme(world: World, out: Path, n_images: int, seed: int) -> None:
    scenes, subsets = mme_sets(world, n_images=n_images, seed=seed)
    for subset, rows in subsets.items():
        folder = out / subset
        folder.mkdir(parents=True, exist_ok=True)
        by_image: dict[str, list[str]] = {}
        for image, question, answer in rows:
            by_image.setdefault(image, []).append(f"{question}\t{answer.capitalize()}")
        for image, lines in by_image.items():
            world.image(scenes[image]).save(folder / image)
            (folder / image).with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_chair(world: World, out: Path, n_images: int, seed: int) -> None:
    scenes = chair_set(world, n_images=n_images, seed=seed)
    _save_images(world, scenes, out / "images")
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    images, annotations, captions = [], [], []
    for image_id, (name, scene) in enumerate(scenes.items(), start=1):
        images.append({"id": image_id, "file_name": name, "width": scene.size, "height": scene.size})
        for obj in scene.objects:
            x, y, w, h = (round(v, 2) for v in obj.box())
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": SHAPES.index(obj.shape) + 1, "bbox": [x, y, w, h],
                                "area": round(w * h, 2), "iscrowd": 0, "segmentation": []})
        captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption(scene)})
    info = {"description": "AnchorRT synthetic shapes world", "version": "1"}
    (out / "instances_world.json").write_text(json.dumps({"info": info, "images": images, "annotations": annotations,
                                                          "categories": categories}))
    (out / "captions_world.json").write_text(json.dumps({"info": info, "images": images, "annotations": captions}))
    (out / "synonyms.txt").write_text("".join(", ".join([s, *SYNONYMS[s]]) + "\n" for s in SHAPES))


def _save_images(world: World, scenes: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, scene in scenes.items():
        world.image(scene).save(folder / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/world-eval"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pope-images", type=int, default=500, help="images (x 6 questions per split)")
    parser.add_argument("--mme-images", type=int, default=150, help="images per MME subset (x 2 questions)")
    parser.add_argument("--chair-images", type=int, default=300)
    args = parser.parse_args()
    world = World()
    (args.out / "pope").mkdir(parents=True, exist_ok=True)
    (args.out / "chair").mkdir(parents=True, exist_ok=True)
    pope_files = write_pope(world, args.out / "pope", args.pope_images, args.seed)
    write_mme(world, args.out / "mme", args.mme_images, args.seed + 1)
    write_chair(world, args.out / "chair", args.chair_images, args.seed + 2)
    q = " ".join(f"-q {p}" for p in pope_files)
    c = args.out / "chair"
    print(f"wrote {args.out}. Evaluate an exported model ART with:\n"
          f"  anchorrt eval pope ART {q} --image-root {args.out / 'pope' / 'images'}\n"
          f"  anchorrt eval mme ART --root {args.out / 'mme'}\n"
          f"  anchorrt eval chair ART --instances {c / 'instances_world.json'} --captions {c / 'captions_world.json'} "
          f"--synonyms {c / 'synonyms.txt'} --image-root {c / 'images'}")


if __name__ == "__main__":
    main()
