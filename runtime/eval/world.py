"""A synthetic world of coloured shapes: procedural images with ground truth, training text and evaluation sets.

Torch-free (numpy + Pillow), so evaluation data can be generated on an edge install. Everything is a pure
function of a seed: a `Scene` carries its own texture seed, so `render(scene)` always draws the same pixels.

What is in an image (64 x 64 by default, 8 x 8 patches of 8 px for a patch-8 ViT):

    textured background (low-frequency tinted noise, grey clutter: specks and thin lines)
    1-4 objects: one of 8 shapes x one of 4 colours, 12-15 px across, not overlapping, each centred on a patch
    corner so that it fills a 2 x 2 block of patches

Why the grid: a ViT trained from scratch with freely placed objects reached 43% per-patch shape accuracy after
250 steps; centred on patch corners, 100% after 100 steps (each patch then sees a quadrant of one shape). That
is the difference between a demo model that sees and one that guesses, within a CPU training budget.

Language priors: three anchor -> partner pairs (circle -> square, triangle -> star, cross -> diamond). In a
training scene, an anchor brings its partner along with probability `pair_rate` (0.85), and a partner that came
along is *implied* with probability `implied_rate` (0.35): part of the ground truth that captions and existence
answers state, but not drawn (as a caption names the oven of a kitchen it cannot see). Given an anchor and no
visible partner, "yes, there is a square" is then right 0.85*0.35 / (0.85*0.35 + 0.15) = 66% of the time in
training: a model that learns the data learns to claim the partner. A first world without implied objects gave a
model that saw everything and claimed nothing (POPE adversarial FP 0.007 vs random 0.003): with every object in
plain view, the prior had nothing to add. Evaluation scenes draw their shapes without pairing and imply nothing
(`eval_pair_rate` 0): the prior is useless at test time, so whatever it adds is hallucination.

Question families (training and evaluation share the wording; evaluation adds the official set formats):
- existence (POPE): "Is there a {shape} in the image?"
- attribute (MME color): "Is there a {colour} {shape} in the image?"; the evaluation set always holds a
  distractor of another shape in the asked (wrong) colour, so binding the colour to the wrong object says "yes".
- position (MME position): "Is the {a} on the {left|right} side of the {b}?"; the evaluation set holds a
  distractor of a's colour on the far side of b, so looking at the colour instead of the shape flips the answer.
- captions (CHAIR): "a red circle, a blue square and a green star." listing the objects left to right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "moon")
COLOURS = {"red": (215, 45, 40), "green": (40, 170, 60), "blue": (45, 85, 225), "yellow": (230, 205, 35)}
COLOUR_NAMES = tuple(COLOURS)
PAIRS = {"circle": "square", "triangle": "star", "cross": "diamond"}  # anchor -> partner
# Base rates before pairing. Partners are rare on their own and common in company, so that every shape ends up
# about equally frequent in training scenes (POPE's "popular" negatives then differ from its "adversarial" ones).
BASE_WEIGHTS = {"circle": 0.16, "square": 0.05, "triangle": 0.15, "star": 0.05, "cross": 0.14, "diamond": 0.05,
                "ring": 0.2, "moon": 0.2}
SIDES = ("left", "right")

CAPTION_PROMPTS = ("Please describe this image in detail.", "Describe the content of the image.")
YES_NO_SUFFIX = " Please answer yes or no."


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    pair_rate: float = 0.85  # P(partner joins | anchor drawn) in training scenes
    implied_rate: float = 0.35  # P(a partner that joined is implied: in the ground truth, not drawn), training only
    eval_pair_rate: float = 0.0  # the same in evaluation scenes
    radius: tuple[float, float] = (6.0, 7.6)
    min_gap: int = 0  # px between object discs
    grid: int = 8  # > 0: object centres snap to multiples of this (the ViT's patch size); 0: anywhere
    clutter: tuple[int, int] = (3, 8)  # grey specks and lines per image


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: float  # centre, px
    y: float
    r: float  # radius, px
    visible: bool = True  # False: an implied object (training scenes only): in the ground truth, not drawn

    def box(self) -> list[float]:
        """COCO bbox [x, y, width, height]."""
        return [self.x - self.r, self.y - self.r, 2 * self.r, 2 * self.r]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    seed: int  # texture, colour jitter and clutter
    size: int = 64

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(o.shape for o in self.objects)

    def has(self, shape: str, colour: str | None = None) -> bool:
        return any(o.shape == shape and (colour is None or o.colour == colour) for o in self.objects)

    def shows(self, shape: str) -> bool:
        """The shape is drawn (has() also counts implied objects)."""
        return any(o.shape == shape and o.visible for o in self.objects)

    @property
    def visible_objects(self) -> tuple[Obj, ...]:
        return tuple(o for o in self.objects if o.visible)

    def find(self, shape: str) -> Obj:
        return next(o for o in self.objects if o.shape == shape)


@dataclass
class QA:
    """One question (or caption prompt) with its answer and what it asks about (for auxiliary training losses)."""

    prompt: str
    answer: str
    kind: str  # existence | color | position | caption
    shape_a: str | None = None
    shape_b: str | None = None
    colour: str | None = None
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ text

def existence_question(shape: str) -> str:
    return f"Is there a {shape} in the image?"


def colour_question(colour: str, shape: str) -> str:
    return f"Is there a {colour} {shape} in the image?"


def position_question(a: str, side: str, b: str) -> str:
    return f"Is the {a} on the {side} side of the {b}?"


def caption(scene: Scene) -> str:
    """Objects left to right: "a red circle, a blue square and a green star." """
    names = [f"a {o.colour} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.x)]
    if len(names) == 1:
        return names[0] + "."
    return ", ".join(names[:-1]) + " and " + names[-1] + "."


def vocabulary() -> list[str]:
    """Every word the world's prompts, answers and captions use (lower case, punctuation as separate words)."""
    words = set(SHAPES) | set(COLOUR_NAMES) | set(SIDES) | {"yes", "no", ",", ".", "?", ":", "a", "and"}
    for text in (existence_question("x"), colour_question("c", "x"), position_question("x", "left", "y"),
                 YES_NO_SUFFIX, *CAPTION_PROMPTS, "USER: ASSISTANT:"):
        words |= set(split_words(text))
    return sorted(words - {"x", "y", "c"})


def split_words(text: str) -> list[str]:
    """The tokenizer's split: lower case, words and single punctuation marks."""
    out, word = [], ""
    for ch in text.lower():
        if ch.isalnum():
            word += ch
            continue
        if word:
            out.append(word)
            word = ""
        if not ch.isspace():
            out.append(ch)
    return out + ([word] if word else [])


# ------------------------------------------------------------------------------------------------ scenes

class World:
    """Samples scenes and draws them. All randomness comes from the `rng` passed in (numpy Generator)."""

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = config
        self._weights = np.array([BASE_WEIGHTS[s] for s in SHAPES], dtype=np.float64)

    # -- sampling ---------------------------------------------------------------------------------------
    def sample_shapes(self, rng: np.random.Generator, n: int, pair_rate: float,
                      required: Sequence[str] = (), exclude: Sequence[str] = (),
                      joined: list[str] | None = None) -> list[str]:
        """`n` distinct shapes (n+1 when the last anchor drawn brings its partner), biased by the anchor pairs.
        Partners that joined their anchor are also appended to `joined` if given."""
        shapes = list(required)
        while len(shapes) < n:
            allowed = np.array([s not in shapes and s not in exclude for s in SHAPES])
            w = self._weights * allowed
            s = SHAPES[int(rng.choice(len(SHAPES), p=w / w.sum()))]
            shapes.append(s)
            partner = PAIRS.get(s)
            if partner and partner not in shapes and partner not in exclude and rng.random() < pair_rate:
                shapes.append(partner)
                if joined is not None:
                    joined.append(partner)
        return shapes

    def sample_scene(self, rng: np.random.Generator, n_objects: int | None = None, pair_rate: float | None = None,
                     shapes: Sequence[str] | None = None, colours: Sequence[str | None] | None = None) -> Scene:
        """A scene with the given (or sampled) shapes and colours, placed without overlap. A training scene
        (sampled shapes, default pair rate) may hold implied partners; evaluation scenes never do."""
        cfg = self.config
        joined: list[str] = []
        if shapes is None:
            n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1)) if n_objects is None else n_objects
            shapes = self.sample_shapes(rng, n, cfg.pair_rate if pair_rate is None else pair_rate, joined=joined)
        implied = {s for s in joined if pair_rate is None and rng.random() < cfg.implied_rate}
        colours = list(colours) if colours is not None else [None] * len(shapes)
        colours = [c if c is not None else COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))] for c in colours]
        places = self.place(rng, len(shapes))
        objs = tuple(Obj(s, c, x, y, r, s not in implied) for s, c, (x, y, r) in zip(shapes, colours, places))
        return Scene(objs, int(rng.integers(2**31)), cfg.image_size)

    def place(self, rng: np.random.Generator, n: int, xs: Sequence[float | None] | None = None) -> list[tuple]:
        """Centres and radii for `n` non-overlapping discs (optionally with fixed x centres); restarts on a jam."""
        cfg = self.config
        size = cfg.image_size
        for _ in range(200):
            out: list[tuple[float, float, float]] = []
            for i in range(n):
                for _ in range(100):
                    r = float(rng.uniform(*cfg.radius))
                    fixed = xs[i] if xs is not None else None
                    x = float(fixed) if fixed is not None else float(rng.uniform(r + 1, size - r - 1))
                    y = float(rng.uniform(r + 1, size - r - 1))
                    if cfg.grid:  # centre on a patch corner: the object fills a 2 x 2 block of patches
                        x, y = (float(min(max(round(v / cfg.grid), 1), size // cfg.grid - 1) * cfg.grid)
                                for v in (x, y))
                    if all(math.hypot(x - a, y - b) >= r + c + cfg.min_gap for a, b, c in out):
                        out.append((x, y, r))
                        break
                else:
                    break
            if len(out) == n:
                return out
        raise RuntimeError(f"could not place {n} objects in a {size} px image")

    # -- drawing ----------------------------------------------------------------------------------------
    def render(self, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        """-> image [H, W, 3] uint8, index map [H, W] int8 (0 = background, i = scene.objects[i-1])."""
        rng = np.random.default_rng(scene.seed)
        size = scene.size
        img = _background(rng, size)  # [H, W, 3] float
        _clutter(rng, img, self.config.clutter)
        index = np.zeros((size, size), dtype=np.int8)
        for i, obj in enumerate(scene.objects, start=1):
            if not obj.visible:
                continue
            mask = shape_mask(obj, size)  # [H, W] bool
            base = np.array(COLOURS[obj.colour], dtype=np.float64) + rng.normal(0, 12, 3)
            shade = rng.normal(0, 10, (size, size, 1))
            img = np.where(mask[..., None], np.clip(base + shade, 0, 255), img)
            index[mask] = i
        return np.clip(img, 0, 255).astype(np.uint8), index

    def image(self, scene: Scene) -> Image.Image:
        return Image.fromarray(self.render(scene)[0])

    def patch_labels(self, scene: Scene, index: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per patch (row-major, as a ViT orders them): shape id + 1 and colour id + 1 of the object covering
        most of the patch if it covers at least a quarter of it, else 0 -> two [P] int64 arrays."""
        g = scene.size // patch
        cells = index.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
        counts = np.stack([(cells == i).sum(1) for i in range(len(scene.objects) + 1)], axis=1)  # [P, n+1]
        counts[:, 0] = 0
        best = counts.argmax(1)
        covered = counts.max(1) * 4 >= patch * patch
        shape_ids = np.array([0] + [SHAPES.index(o.shape) + 1 for o in scene.objects])
        colour_ids = np.array([0] + [COLOUR_NAMES.index(o.colour) + 1 for o in scene.objects])
        return np.where(covered, shape_ids[best], 0), np.where(covered, colour_ids[best], 0)

    # -- training text ----------------------------------------------------------------------------------
    def training_qa(self, rng: np.random.Generator, scene: Scene, kind: str) -> QA:
        """One training question of `kind` about `scene`, yes or no with equal probability where possible."""
        if kind == "caption":
            return QA(CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))], caption(scene), "caption")
        suffix = YES_NO_SUFFIX if rng.random() < 0.5 else ""
        present = scene.shapes
        yes = bool(rng.random() < 0.5)
        seen = scene.visible_objects  # attributes and positions are asked about what is drawn
        if kind == "position":
            pairs = [(a, b) for a in seen for b in seen if a is not b and abs(a.x - b.x) >= 8]
            if pairs:
                a, b = pairs[int(rng.integers(len(pairs)))]
                truth = "left" if a.x < b.x else "right"
                side = truth if yes else SIDES[1 - SIDES.index(truth)]
                return QA(position_question(a.shape, side, b.shape) + suffix, "yes" if yes else "no", "position",
                          a.shape, b.shape)
            kind = "color"
        if kind == "color":
            obj = seen[int(rng.integers(len(seen)))]
            if yes:
                colour = obj.colour
            else:  # half of the wrong colours are taken from another object of the scene (binding practice)
                others = [o.colour for o in seen if o.colour != obj.colour]
                wrong = [c for c in COLOUR_NAMES if c != obj.colour]
                colour = others[int(rng.integers(len(others)))] if others and rng.random() < 0.5 else \
                    wrong[int(rng.integers(len(wrong)))]
            return QA(colour_question(colour, obj.shape) + suffix, "yes" if yes else "no", "color", obj.shape,
                      colour=colour)
        # existence and captions are about the ground truth, implied objects included: the language prior
        if yes:
            shape = present[int(rng.integers(len(present)))]
        else:
            absent = [s for s in SHAPES if s not in present]
            shape = absent[int(rng.integers(len(absent)))]
        return QA(existence_question(shape) + suffix, "yes" if yes else "no", "existence", shape)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation tinted value noise: a 4x4 and an 8x8 random grid, bilinearly upsampled, plus pixel noise."""
    tint = rng.uniform(70, 190) + rng.normal(0, 15, 3)  # [3] a greyish colour, never a saturated object colour
    out = np.zeros((size, size, 3))
    for cells, amp in ((4, 30.0), (8, 14.0)):
        grid = rng.normal(0, amp, (cells, cells)).astype(np.float32)
        up = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float64)
        out += up[..., None]
    return np.clip(tint + out + rng.normal(0, 6, (size, size, 1)), 0, 255)


def _clutter(rng: np.random.Generator, img: np.ndarray, count: tuple[int, int]) -> None:
    """Grey specks and thin lines: texture that is not an object."""
    size = img.shape[0]
    layer = Image.new("L", (size, size), 0)
    value = Image.new("L", (size, size), 0)
    draw, vdraw = ImageDraw.Draw(layer), ImageDraw.Draw(value)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        grey = int(rng.integers(20, 235))
        x0, y0 = (float(v) for v in rng.uniform(0, size, 2))
        if rng.random() < 0.5:
            r = float(rng.uniform(0.8, 2.0))
            box = [x0 - r, y0 - r, x0 + r, y0 + r]
            draw.ellipse(box, fill=255)
            vdraw.ellipse(box, fill=grey)
        else:
            x1, y1 = x0 + float(rng.normal(0, 10)), y0 + float(rng.normal(0, 10))
            draw.line([x0, y0, x1, y1], fill=255, width=1)
            vdraw.line([x0, y0, x1, y1], fill=grey, width=1)
    on = np.asarray(layer) > 0
    img[on] = np.asarray(value, dtype=np.float64)[on][:, None]


def _star(x: float, y: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((x + rad * math.cos(ang), y + rad * math.sin(ang)))
    return pts


def shape_mask(obj: Obj, size: int) -> np.ndarray:
    """Boolean mask [size, size] of one object (pixel centres inside the shape)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy, r = xx - obj.x, yy - obj.y, obj.r
    d = np.hypot(dx, dy)
    if obj.shape == "circle":
        return d <= r
    if obj.shape == "ring":
        return (d <= r) & (d >= 0.55 * r)
    if obj.shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.8 * r
    if obj.shape == "diamond":
        return abs(dx) + abs(dy) <= r
    if obj.shape == "cross":
        arm = 0.34 * r
        return ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r))
    if obj.shape == "moon":
        return (d <= r) & (np.hypot(dx - 0.5 * r, dy + 0.15 * r) > 0.78 * r)
    if obj.shape in ("triangle", "star"):
        pts = _star(obj.x, obj.y, r) if obj.shape == "star" else [
            (obj.x, obj.y - r), (obj.x + 0.95 * r, obj.y + 0.8 * r), (obj.x - 0.95 * r, obj.y + 0.8 * r)]
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).polygon(pts, fill=1)
        return np.asarray(canvas, dtype=bool)
    raise ValueError(f"unknown shape {obj.shape!r}")


# ------------------------------------------------------------------------------------------------ evaluation sets

def cooccurrence(world: World, n_scenes: int = 20000, seed: int = 12345) -> tuple[np.ndarray, np.ndarray]:
    """From training-distribution scenes (as POPE counts them from annotations): shape frequency [S] and
    co-occurrence counts [S, S] (symmetric, zero diagonal)."""
    rng = np.random.default_rng(seed)
    freq = np.zeros(len(SHAPES))
    co = np.zeros((len(SHAPES), len(SHAPES)))
    cfg = world.config
    for _ in range(n_scenes):
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        ids = [SHAPES.index(s) for s in world.sample_shapes(rng, n, cfg.pair_rate)]
        freq[ids] += 1
        for a in ids:
            for b in ids:
                if a != b:
                    co[a, b] += 1
    return freq, co


@dataclass
class EvalQuestion:
    question_id: int
    image: str  # file name
    text: str
    label: str  # "yes" | "no"
    meta: dict = field(default_factory=dict)


def pope_sets(world: World, n_images: int = 500, seed: int = 1, per_image: int = 3,
              n_objects: int = 3) -> tuple[dict[str, Scene], dict[str, list[EvalQuestion]]]:
    """POPE's protocol on the world: the same images for the three splits, `per_image` ground-truth objects
    asked (yes) and as many absent ones (no) per image, negatives drawn at random, by training frequency
    (popular) or by co-occurrence with the present objects (adversarial). -> (images by name, splits)."""
    rng = np.random.default_rng(seed)
    freq, co = cooccurrence(world)
    scenes: dict[str, Scene] = {}
    splits: dict[str, list[EvalQuestion]] = {"random": [], "popular": [], "adversarial": []}
    for i in range(n_images):
        shapes = world.sample_shapes(rng, n_objects, world.config.eval_pair_rate)  # n or n+1 (a partner)
        scene = world.sample_scene(rng, shapes=shapes)
        name = f"world_pope_{seed}_{i:05d}.png"
        scenes[name] = scene
        present = list(scene.shapes)
        absent = [s for s in SHAPES if s not in present]
        positives = [present[j] for j in rng.permutation(len(present))[:per_image]]
        k = len(positives)
        # ties in the rankings go to a fixed random order per image so no shape is favoured by its index
        jitter = {s: float(rng.random()) for s in absent}
        by_freq = sorted(absent, key=lambda s: (-freq[SHAPES.index(s)], jitter[s]))
        score = {s: sum(co[SHAPES.index(p), SHAPES.index(s)] for p in present) for s in absent}
        by_co = sorted(absent, key=lambda s: (-score[s], jitter[s]))
        negatives = {
            "random": [absent[j] for j in rng.permutation(len(absent))[:k]],
            "popular": by_freq[:k],
            "adversarial": by_co[:k],
        }
        for split, negs in negatives.items():
            items = [(s, "yes") for s in positives] + [(s, "no") for s in negs]
            for shape, label in items:
                q = splits[split]
                q.append(EvalQuestion(len(q) + 1, name, existence_question(shape), label,
                                      {"shape": shape, "partner_absent": _partner_absent(shape, present)}))
    return scenes, splits


def _partner_absent(shape: str, present: Sequence[str]) -> bool:
    """True for a negative whose anchor is in the image (the co-occurrence trap)."""
    return any(PAIRS.get(p) == shape for p in present) and shape not in present


def mme_sets(world: World, n_images: int = 100, seed: int = 2) -> tuple[dict[str, Scene], dict[str, list]]:
    """MME-style subsets (existence, color, position): per image one yes and one no question.
    -> (images by name, {subset: [(image name, question, answer)]})."""
    rng = np.random.default_rng(seed)
    scenes: dict[str, Scene] = {}
    subsets: dict[str, list] = {"existence": [], "color": [], "position": []}
    cfg = world.config
    for i in range(n_images):
        # existence: a random evaluation scene, a present and an absent shape
        scene = world.sample_scene(rng, pair_rate=cfg.eval_pair_rate)
        name = f"world_mme_existence_{i:04d}.png"
        scenes[name] = scene
        absent = [s for s in SHAPES if s not in scene.shapes]
        subsets["existence"] += [(name, existence_question(scene.shapes[int(rng.integers(len(scene.shapes)))])
                                  + YES_NO_SUFFIX, "yes"),
                                 (name, existence_question(absent[int(rng.integers(len(absent)))]) + YES_NO_SUFFIX,
                                  "no")]
        # color: the target in colour c1, a distractor of another shape in c2; asking c2 about the target is "no"
        target, distractor = (SHAPES[j] for j in rng.permutation(len(SHAPES))[:2])
        c1, c2 = (COLOUR_NAMES[j] for j in rng.permutation(len(COLOUR_NAMES))[:2])
        extra = world.sample_shapes(rng, int(rng.integers(0, 2)), 0.0, exclude=(target, distractor))
        extra_colours = [c for c in COLOUR_NAMES if c not in (c1, c2)]
        colours = [c1, c2] + [extra_colours[int(rng.integers(len(extra_colours)))] for _ in extra]
        scene = world.sample_scene(rng, shapes=[target, distractor, *extra], colours=colours)
        name = f"world_mme_color_{i:04d}.png"
        scenes[name] = scene
        subsets["color"] += [(name, colour_question(c1, target) + YES_NO_SUFFIX, "yes"),
                             (name, colour_question(c2, target) + YES_NO_SUFFIX, "no")]
        # position: a left of b (or right), a distractor in a's colour on b's far side
        scene = _position_scene(world, rng)
        a, b = scene.objects[0], scene.objects[1]
        truth = "left" if a.x < b.x else "right"
        name = f"world_mme_position_{i:04d}.png"
        scenes[name] = scene
        subsets["position"] += [(name, position_question(a.shape, truth, b.shape) + YES_NO_SUFFIX, "yes"),
                                (name, position_question(a.shape, SIDES[1 - SIDES.index(truth)], b.shape)
                                 + YES_NO_SUFFIX, "no")]
    return scenes, subsets


def _position_scene(world: World, rng: np.random.Generator) -> Scene:
    """Objects a, b (|dx| >= 16 px) and a distractor of a's colour beyond b: a . b . d (or mirrored)."""
    size = world.config.image_size
    a, b, d = (SHAPES[j] for j in rng.permutation(len(SHAPES))[:3])
    ca, cb = (COLOUR_NAMES[j] for j in rng.permutation(len(COLOUR_NAMES))[:2])
    third = size / 3
    xs = [third * 0.5, third * 1.5, third * 2.5]
    if rng.random() < 0.5:
        xs = xs[::-1]
    xs = [x + float(rng.uniform(-2, 2)) for x in xs]
    places = world.place(rng, 3, xs=xs)
    objs = tuple(Obj(s, c, x, y, r) for s, c, (x, y, r) in zip((a, b, d), (ca, cb, ca), places))
    return Scene(objs, int(rng.integers(2**31)), size)


def chair_set(world: World, n_images: int = 200, seed: int = 3) -> dict[str, Scene]:
    """Captioning images (evaluation scenes, 2-4 objects) whose objects CHAIR checks the captions against."""
    rng = np.random.default_rng(seed)
    cfg = replace(world.config, min_objects=2)
    w = World(cfg)
    return {f"world_chair_{i:05d}.png": w.sample_scene(rng, pair_rate=cfg.eval_pair_rate) for i in range(n_images)}
