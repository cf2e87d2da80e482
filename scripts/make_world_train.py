"""Write training data of the synthetic world in LLaVA's conversation format (for `anchorrt visalign train`).

    python scripts/make_world_train.py --out out/world-train --images 2000

    out/world-train/train.json    [{id, image, conversations: [{from: human, value: "<image>\\n..."}, {from: gpt, ...}]}]
    out/world-train/images/*.png

The scenes and questions come from the distribution the demo model was trained on (`World.sample_scene` with its
co-occurrence prior and implied partners, `World.training_qa` with the demo recipe's mix of existence / colour /
position / caption questions), one single-turn entry per question, so a VisAlign fusion learns from the same world.
Torch-free; deterministic for `--seed`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchorrt.runtime.eval.world import World  # noqa: E402
from anchorrt.runtime.manifest import replace_folder  # noqa: E402

KINDS = ("existence", "color", "position", "caption")
MIX = (0.3, 0.2, 0.3, 0.2)  # the demo recipe's kind_mix (exporter/demo/train.py DemoSpec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/world-train"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per-image", type=int, default=4, help="questions per image (at most one caption)")
    parser.add_argument("--seed", type=int, default=7, help="differs from the demo training seed and the eval seeds")
    args = parser.parse_args()
    if args.images < 1 or args.per_image < 1:
        parser.error("--images and --per-image must be at least 1")

    world, rng = World(), np.random.default_rng(args.seed)
    tmp = args.out.with_name(f".{args.out.name}.partial")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(args.images):
        scene = world.sample_scene(rng)
        name = f"train_{i:06d}.png"
        world.image(scene).save(tmp / "images" / name)
        kinds = [KINDS[int(k)] for k in rng.choice(len(KINDS), args.per_image, p=np.asarray(MIX))]
        kinds = [k if k != "caption" or k not in kinds[:j] else "existence" for j, k in enumerate(kinds)]
        for j, kind in enumerate(kinds):
            qa = world.training_qa(rng, scene, kind)
            entries.append({"id": f"{i:06d}-{j}", "image": f"images/{name}", "conversations": [
                {"from": "human", "value": "<image>\n" + qa.prompt}, {"from": "gpt", "value": qa.answer}]})
    (tmp / "train.json").write_text(json.dumps(entries) + "\n")
    replace_folder(tmp, args.out)
    print(f"wrote {len(entries)} entries over {args.images} images to {args.out / 'train.json'}")


if __name__ == "__main__":
    main()
