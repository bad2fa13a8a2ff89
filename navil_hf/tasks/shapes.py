"""A synthetic visual question-answering task: colored shapes on plain backgrounds.

It proves that training teaches a small NaViL to *see*: every answer depends on the image, the answers are
balanced given the question, so a model that reads only the text scores no better than the blind baseline
(`blind_accuracy`, about 1/3 overall), and a model that looks can reach 100%.

    python -m navil_hf.tasks.shapes OUT_DIR [--train N] [--test N] [--seed S] [--force]

writes

* `OUT_DIR/images/{train,test}_NNNNN.png`: one to three non-overlapping shapes (circle, square, triangle) in
  one of six colors (`PALETTE`, each drawn with a little jitter), on a light or dark, low-saturation
  background (solid, gradient or noise; never close to a shape color). Each side of an image is 96 or 128
  pixels (a multiple of the 32-px merged token), so images are square, tall or wide. Every shape is at least
  `MIN_SHAPE_SIZE` (32) pixels, one merged token, and the one a question asks about at least
  `MIN_TARGET_SIZE` (40): at a processor's resize that does not shrink the image (the demo model's
  `min_pixels` of 128 x 128 enlarges them) the asked-about shape's box covers at least 20 of the 32 pixels
  of some token in each direction, wherever it lies.
  (`smallest_target_side` gives that size for other processor settings: shapes smaller than a token are
  where a model stays blind);
* `OUT_DIR/train.jsonl` and `OUT_DIR/test.jsonl`: one record per image, in the transformers chat format
  (`messages`, with the image path relative to the jsonl file's folder) plus `answer`, `kind`, `question`
  and what was drawn (`shapes`: shape, color, rgb, center [x, y], size, bbox [x0, y0, x1, y1] inclusive).
  With `questions` Q > 1 (`--questions`) each train record carries up to Q question-and-answer turns about
  its image (`ask_more`: its own question first, then others from `all_questions`), more to learn from per
  image encoded; the images and the test split stay the same;
* `OUT_DIR/meta.json`: the generation parameters and the summary that `make_shapes_dataset` returns.

Question kinds (`KINDS`) and their closed answer sets (`ANSWERS`):

* `color`: "What color is the shape?" (one shape) or "What color is the circle?" (the only circle);
* `shape`: "What shape is the red object?" (the only red shape);
* `count`: "How many shapes are there?" -> "1", "2" or "3";
* `position`: "Is the red shape on the left or the right?" / "... at the top or the bottom?", asked only
  when the whole shape lies in one half of the image.

Each question ends with `ANSWER_HINT`. Each split has the kinds in equal numbers and, within a kind, the
answers in equal numbers (each off by at most one): the answer is chosen first and the image built to fit
it. The train and test splits come from different seed streams of the same seed, and no test image is
byte-identical to a train image. Generation is deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 2
KINDS = ("color", "shape", "count", "position")
SHAPES = ("circle", "square", "triangle")
# Clearly distinct, saturated colors; shapes are drawn with up to COLOR_JITTER per channel around them.
PALETTE = {
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (140, 50, 180),
    "orange": (240, 125, 20),
}
COLOR_JITTER = 12
MAX_SHAPES = 3
ANSWERS = {
    "color": tuple(PALETTE),
    "shape": SHAPES,
    "count": tuple(str(n) for n in range(1, MAX_SHAPES + 1)),
    "position": ("left", "right", "top", "bottom"),
}
ANSWER_HINT = "Answer the question using a single word or number."
# Backgrounds: a light or dark gray with a small tint; every background color is at least this far
# (Euclidean RGB) from every palette color.
MIN_BACKGROUND_DISTANCE = 80.0
BACKGROUNDS = ("solid", "gradient", "noise")
NOISE_SIGMA = 6.0
SIDE_MULTIPLE = 32  # the merged token: 2x2 patches of 16 px
DEFAULT_IMAGE_SIZE = (96, 128)
GAP = 2  # pixels between the bounding boxes of two shapes, and between a position target and the midline
MERGED_TOKEN = 32
MIN_SHAPE_SIZE = MERGED_TOKEN  # every shape covers a token's width
MIN_TARGET_SIZE = 40  # the shape asked about, more: most of some token whatever its offset
# The target of a position question lies in one half of the image, GAP clear of the midline.
MIN_IMAGE_SIDE = 2 * (MIN_TARGET_SIZE + GAP)
SPLIT_STREAMS = {"train": 0, "test": 1, "more questions": 2}
_NUMBER_WORDS = {"one": "1", "two": "2", "three": "3"}
_OWN_IMAGE = re.compile(r"(train|test)_\d+\.png")


# ----------------------------------------------------------------------------------------------- images


def _image_sides(image_size, side_multiple):
    """The allowed side lengths: `image_size` is an int (square, fixed) or (min, max) of each side."""
    lo, hi = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo > hi:
        raise ValueError(f"image_size must be an int or (min, max) with min <= max, got {image_size!r}")
    if lo < MIN_IMAGE_SIDE:
        raise ValueError(
            f"image sides must be at least {MIN_IMAGE_SIDE} pixels to hold {MAX_SHAPES} shapes of at least "
            f"{MIN_SHAPE_SIZE} pixels, got {lo}"
        )
    if side_multiple < 1:
        raise ValueError(f"side_multiple must be positive, got {side_multiple}")
    sides = [s for s in range(lo, hi + 1) if s % side_multiple == 0] or list(range(lo, hi + 1))
    return sides


def _background_color(rng, light):
    while True:
        gray = rng.integers(175, 246) if light else rng.integers(10, 71)
        rgb = np.clip(gray + rng.integers(-14, 15, size=3), 0, 255)
        if min(np.linalg.norm(rgb - np.array(c)) for c in PALETTE.values()) >= MIN_BACKGROUND_DISTANCE:
            return rgb.astype(np.float64)


def _background(rng, width, height):
    style = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    light = bool(rng.integers(2))
    base = _background_color(rng, light)
    pixels = np.broadcast_to(base, (height, width, 3)).astype(np.float64)
    if style == "gradient":
        other = _background_color(rng, light)  # same lightness class, so every mixture stays far from the palette
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        pixels = base * (1 - t[..., None]) + other * t[..., None]
    elif style == "noise":
        pixels = pixels + rng.normal(0, NOISE_SIGMA, size=(height, width, 3))
    return style, np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _place(rng, boxes, width, height, size, x_range=None, y_range=None):
    """The top-left corner of a `size` box that keeps GAP from `boxes`, inside the ranges (inclusive
    bounds of the box), or None after some tries."""
    x_lo, x_hi = x_range or (0, width - 1)
    y_lo, y_hi = y_range or (0, height - 1)
    if x_hi - x_lo + 1 < size or y_hi - y_lo + 1 < size:
        return None
    for _ in range(50):
        x0 = int(rng.integers(x_lo, x_hi - size + 2))
        y0 = int(rng.integers(y_lo, y_hi - size + 2))
        x1, y1 = x0 + size - 1, y0 + size - 1
        if all(x1 + GAP < a0 or a1 + GAP < x0 or y1 + GAP < b0 or b1 + GAP < y0 for a0, b0, a1, b1 in boxes):
            return x0, y0
    return None


TARGET_FRACTION = (0.3, 0.45)  # the asked-about shape's side, as a fraction of the image's short side


def _layout(rng, width, height, specs, target_region=None, target_fraction=TARGET_FRACTION):
    """Boxes for `specs` (the first one inside `target_region`, an (x_range, y_range) pair, when given).
    The first (asked-about) shape is at least MIN_TARGET_SIZE, the others MIN_SHAPE_SIZE.
    Returns a list of (x0, y0, size), or None when they did not fit (the caller draws again)."""
    short = min(width, height)
    boxes, placed = [], []
    for i, _ in enumerate(specs):
        smallest = MIN_TARGET_SIZE if i == 0 else MIN_SHAPE_SIZE
        lo = max(smallest, round((target_fraction[0] if i == 0 else 0.25) * short))
        hi = max(lo, round((target_fraction[1] if i == 0 else 0.45) * short) - 3 * (len(specs) - 1))
        size = int(rng.integers(lo, hi + 1))
        ranges = target_region if (i == 0 and target_region) else (None, None)
        corner = None
        while corner is None and size >= smallest:
            corner = _place(rng, boxes, width, height, size, *ranges)
            if corner is None:
                size -= 2
        if corner is None:
            return None
        x0, y0 = corner
        boxes.append((x0, y0, x0 + size - 1, y0 + size - 1))
        placed.append((x0, y0, size))
    return placed


def _draw_shape(draw, s, fill):
    x0, y0, x1, y1 = s["bbox"]
    if s["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif s["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # triangle, apex up or down; the bbox center is inside it either way
        mid = (x0 + x1) / 2
        if s.get("apex", "up") == "up":
            draw.polygon([(mid, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            draw.polygon([(x0, y0), (x1, y0), (mid, y1)], fill=fill)


def _draw(pixels, shapes):
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for s in shapes:
        _draw_shape(draw, s, tuple(s["rgb"]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


TOKEN_COVERAGE = 0.25  # a merged token belongs to the shape covering the most of it, if at least this much


def token_targets(record, merged_h: int, merged_w: int) -> np.ndarray:
    """What a record's image holds under each token of a `merged_h x merged_w` grid laid over it (the merged
    tokens of one image scale), in raster order: an int array [merged_h * merged_w, 4] of (shape: 0
    background or 1 + index in `SHAPES`; color: 0 or 1 + index in `PALETTE`; 1 if the token holds a shape's
    center, else 0; the token's shape: 0 or 1 + its index in `record["shapes"]`). A token belongs to the shape
    covering the largest fraction of it, when that is at least `TOKEN_COVERAGE`. Dense labels for training an
    encoder on its own (`navil_hf.tasks.vision_stage`)."""
    width, height = record["image_size"]
    targets = np.zeros((merged_h, merged_w, 4), dtype=np.int64)
    best = np.full((merged_h, merged_w), TOKEN_COVERAGE)
    colors = tuple(PALETTE)
    for index, s in enumerate(record["shapes"]):
        mask = Image.new("L", (width, height), 0)
        _draw_shape(ImageDraw.Draw(mask), s, 255)
        # the mean of the mask over each token's region of the image
        coverage = np.asarray(mask.resize((merged_w, merged_h), Image.Resampling.BOX), dtype=np.float64) / 255
        mine = coverage >= best
        best = np.where(mine, coverage, best)
        targets[mine, 0] = 1 + SHAPES.index(s["shape"])
        targets[mine, 1] = 1 + colors.index(s["color"])
        targets[mine, 3] = 1 + index
        x, y = s["center"]
        targets[min(int(y * merged_h / height), merged_h - 1), min(int(x * merged_w / width), merged_w - 1), 2] = 1
    return targets.reshape(-1, 4)


# -------------------------------------------------------------------------------------------- questions


# The question texts, shared by the generator (`_scene`) and `all_questions`.
COUNT_QUESTION = "How many shapes are there?"
COLOR_QUESTION = "What color is the {}?"  # "shape" when it is alone, else its kind
SHAPE_QUESTION = "What shape is the {} object?"  # its color
POSITION_QUESTIONS = {"x": "Is the {} on the left or the right?", "y": "Is the {} at the top or the bottom?"}


def _pick(rng, options, exclude=()):
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def _scene(rng, kind, answer, width, height, max_shapes=MAX_SHAPES):
    """(question, specs, target_region) for a question of `kind` whose answer is `answer`: what to draw,
    the first spec being the one asked about."""
    n = int(answer) if kind == "count" else int(rng.integers(1, max_shapes + 1))
    colors, shapes = tuple(PALETTE), SHAPES
    if kind == "count":
        specs = [(_pick(rng, shapes), _pick(rng, colors)) for _ in range(n)]
        return COUNT_QUESTION, specs, None
    if kind == "color":
        color, shape = answer, _pick(rng, shapes)
        others = [(_pick(rng, shapes, exclude=(shape,)), _pick(rng, colors)) for _ in range(n - 1)]
        question = COLOR_QUESTION.format("shape" if n == 1 else shape)
        return question, [(shape, color), *others], None
    if kind == "shape":
        color, shape = _pick(rng, colors), answer
        others = [(_pick(rng, shapes), _pick(rng, colors, exclude=(color,))) for _ in range(n - 1)]
        return SHAPE_QUESTION.format(color), [(shape, color), *others], None
    if kind == "position":
        color, shape = _pick(rng, colors), _pick(rng, shapes)
        by_color = bool(rng.integers(2))
        if n == 1:
            ref, others = (f"{color} shape" if by_color else "shape"), []
        elif by_color:
            ref = f"{color} shape"
            others = [(_pick(rng, shapes), _pick(rng, colors, exclude=(color,))) for _ in range(n - 1)]
        else:
            ref = shape
            others = [(_pick(rng, shapes, exclude=(shape,)), _pick(rng, colors)) for _ in range(n - 1)]
        horizontal = answer in ("left", "right")
        # the whole target box in one half, GAP pixels clear of the midline
        half_w, half_h = width // 2, height // 2
        x_range = {"left": (0, half_w - 1 - GAP), "right": (width - half_w + GAP, width - 1)}.get(answer)
        y_range = {"top": (0, half_h - 1 - GAP), "bottom": (height - half_h + GAP, height - 1)}.get(answer)
        question = POSITION_QUESTIONS["x" if horizontal else "y"].format(ref)
        return question, [(shape, color), *others], (x_range, y_range)
    raise ValueError(f"unknown question kind {kind!r} (expected one of {', '.join(KINDS)})")


def _sample(rng, kind, answer, sides, max_shapes=MAX_SHAPES, target_fraction=TARGET_FRACTION):
    width, height = int(sides[rng.integers(len(sides))]), int(sides[rng.integers(len(sides))])
    question, specs, region = _scene(rng, kind, answer, width, height, max_shapes)
    placed = None
    while placed is None:
        placed = _layout(rng, width, height, specs, region, target_fraction)
    shapes = []
    for (shape, color), (x0, y0, size) in zip(specs, placed):
        rgb = np.clip(np.array(PALETTE[color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
        item = {
            "shape": shape,
            "color": color,
            "rgb": [int(v) for v in rgb],
            "center": [x0 + size // 2, y0 + size // 2],
            "size": size,
            "bbox": [x0, y0, x0 + size - 1, y0 + size - 1],
        }
        if shape == "triangle":
            item["apex"] = "up" if rng.integers(2) else "down"
        shapes.append(item)
    style, pixels = _background(rng, width, height)
    return question, shapes, style, [width, height], _draw(pixels, shapes)


def _record(image_path, kind, question, answer, shapes, style, size):
    prompt = f"{question} {ANSWER_HINT}"
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": image_path}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "answer": answer,
        "kind": kind,
        "question": question,
        "image_size": size,
        "background": style,
        "shapes": shapes,
    }


def _generate_split(
    out_dir, split, count, seed, sides, kinds, avoid, max_shapes=MAX_SHAPES, target_fraction=TARGET_FRACTION
):
    """Write `count` images of `split` and return their records; `avoid` holds the sha256 digests of images
    already written (another split's), which are redrawn rather than repeated."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split]])
    # kinds in equal numbers and, within a kind, its answers in equal numbers (each off by at most one)
    per_kind = [count // len(kinds) + (i < count % len(kinds)) for i in range(len(kinds))]
    order = []
    for kind, n in zip(kinds, per_kind):
        answers = list(ANSWERS[kind][:max_shapes] if kind == "count" else ANSWERS[kind])
        rng.shuffle(answers)  # which answers get the extra record when n does not divide evenly
        order += [(kind, answers[j % len(answers)]) for j in range(n)]
    rng.shuffle(order)
    records, digests = [], set()
    for i, (kind, answer) in enumerate(order):
        while True:
            question, shapes, style, size, png = _sample(rng, kind, answer, sides, max_shapes, target_fraction)
            digest = hashlib.sha256(png).hexdigest()
            if digest not in avoid and digest not in digests:
                break
        digests.add(digest)
        name = f"images/{split}_{i:05d}.png"
        (out_dir / name).write_bytes(png)
        records.append(_record(name, kind, question, answer, shapes, style, size))
    return records, digests


def all_questions(record) -> list[tuple[str, str, str]]:
    """Every question the generator could ask about a record's image, by its own rules, with its answer:
    a list of (kind, question, answer). `count` always; `color` of the only shape or of the only shape of
    its kind; `shape` of the only shape of its color; `position` of a shape named as `_scene` names it (by
    color or kind where that is unique; "shape" when it is alone) when the whole shape lies in one half of
    the image, GAP clear of the midline."""
    return [(kind, question, answer) for kind, question, answer, _ in _questions(record)]


def _questions(record):
    """`all_questions`, each with what it asks about: (kind,), (kind, shape index) or, for a position, (kind,
    shape index, axis). Questions with the same subject differ only in how they name the shape."""
    shapes = record["shapes"]
    width, height = record["image_size"]
    n = len(shapes)
    shape_counts = Counter(s["shape"] for s in shapes)
    color_counts = Counter(s["color"] for s in shapes)
    out = [("count", COUNT_QUESTION, str(n), ("count",))]
    for i, s in enumerate(shapes):
        if n == 1 or shape_counts[s["shape"]] == 1:
            out.append(("color", COLOR_QUESTION.format("shape" if n == 1 else s["shape"]), s["color"], ("color", i)))
        if color_counts[s["color"]] == 1:
            out.append(("shape", SHAPE_QUESTION.format(s["color"]), s["shape"], ("shape", i)))
        refs = [f"{s['color']} shape"] if color_counts[s["color"]] == 1 else []
        if n == 1:
            refs.append("shape")
        elif shape_counts[s["shape"]] == 1:
            refs.append(s["shape"])
        x0, y0, x1, y1 = s["bbox"]
        for axis, first, last, side, (low, high) in (
            ("x", x0, x1, width, ("left", "right")),
            ("y", y0, y1, height, ("top", "bottom")),
        ):
            half = side // 2
            answer = low if last <= half - 1 - GAP else high if first >= side - half + GAP else None
            if answer is not None:
                question = POSITION_QUESTIONS[axis]
                out += [("position", question.format(ref), answer, ("position", i, axis)) for ref in refs]
    return out


def ask_more(record, questions: int, rng, kinds=KINDS) -> dict:
    """`record` with up to `questions - 1` more question-and-answer turns about its image after its own: from
    `all_questions` of `kinds`, never two about the same thing (the same shape's color twice, named by color
    and by kind, say: the second could copy the first's answer), the kinds taken in turn, in an order `rng`
    draws, so that the turns spread over them. More to learn from per image encoded. The record's own
    `question`, `answer` and `kind` stay those of its first turn."""
    candidates = _questions(record)
    asked = {subject for _, question, _, subject in candidates if question == record["question"]}
    by_subject = defaultdict(list)
    for kind, question, answer, subject in candidates:
        if kind in kinds and subject not in asked:
            by_subject[subject].append((question, answer))
    by_kind = defaultdict(list)  # one question per subject, its naming drawn at random
    for subject, options in by_subject.items():
        by_kind[subject[0]].append(options[int(rng.integers(len(options)))])
    order = [k for k in kinds if by_kind[k]]
    rng.shuffle(order)
    extra = []
    while len(extra) < questions - 1 and any(by_kind[k] for k in order):
        for kind in order:
            if by_kind[kind] and len(extra) < questions - 1:
                extra.append(by_kind[kind].pop(int(rng.integers(len(by_kind[kind])))))
    messages = list(record["messages"])
    for question, answer in extra:
        messages += [
            {"role": "user", "content": [{"type": "text", "text": f"{question} {ANSWER_HINT}"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    return {**record, "messages": messages}


MIRRORED_ANSWER = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def mirrored_position_records(records, base_dir, out_dir) -> list[dict]:
    """The position questions of `records` (images under `base_dir`) again, each image mirrored across the
    axis its question asks about (left-right for "left or right", top-bottom for "top or bottom") and written
    to `out_dir/images/`, its answer and drawn geometry moved with it. The generator's distribution is the
    same under mirroring, so a model that reads where the shape is answers these as well as the originals;
    one that answers from anything that does not move (the colors, the shapes, the sizes) gives the
    originals' answers, and scores 1 - its original accuracy here."""
    from PIL import ImageOps

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    mirrored = []
    for index, record in enumerate(r for r in records if r["kind"] == "position"):
        path = record["messages"][0]["content"][0]["path"]
        horizontal = record["answer"] in ("left", "right")
        with Image.open(Path(base_dir) / path) as image:
            image = ImageOps.mirror(image) if horizontal else ImageOps.flip(image)
        name = f"images/mirrored_{index:05d}.png"
        image.save(out_dir / name)
        width, height = record["image_size"]
        shapes = []
        for s in record["shapes"]:
            (x0, y0, x1, y1), (cx, cy) = s["bbox"], s["center"]
            if horizontal:
                moved = {"bbox": [width - 1 - x1, y0, width - 1 - x0, y1], "center": [width - 1 - cx, cy]}
            else:
                moved = {"bbox": [x0, height - 1 - y1, x1, height - 1 - y0], "center": [cx, height - 1 - cy]}
                if "apex" in s:
                    moved["apex"] = "down" if s["apex"] == "up" else "up"
            shapes.append({**s, **moved})
        messages = json.loads(json.dumps(record["messages"]))
        messages[0]["content"][0]["path"] = name
        answer = MIRRORED_ANSWER[record["answer"]]
        messages[1]["content"] = [{"type": "text", "text": answer}]
        mirrored.append({**record, "messages": messages[:2], "answer": answer, "shapes": shapes})
    return mirrored


# ---------------------------------------------------------------------------------------------- dataset


def read_jsonl(path) -> list[dict]:
    """The records of a jsonl file (image paths in them are relative to its folder)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")


def _prepare(out_dir, force):
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"{out_dir} is not empty (use force=True / --force to overwrite)")
        # only what a previous run wrote; anything else in the folder stays
        images = out_dir / "images"
        if images.is_dir():
            for path in images.iterdir():
                if path.is_file() and _OWN_IMAGE.fullmatch(path.name):
                    path.unlink()
    (out_dir / "images").mkdir(parents=True, exist_ok=True)


def make_shapes_dataset(
    out_dir,
    *,
    train: int = 2000,
    test: int = 200,
    seed: int = 0,
    image_size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
    side_multiple: int = SIDE_MULTIPLE,
    kinds: tuple[str, ...] = KINDS,
    max_shapes: int = MAX_SHAPES,
    target_fraction: tuple[float, float] = TARGET_FRACTION,
    questions: int = 1,
    force: bool = False,
) -> dict:
    """Write the dataset into `out_dir` (see the module docstring) and return its summary.

    `image_size` is an int (every image that square) or (min, max) of each side; sides are the multiples of
    `side_multiple` in that range (any length in it when there is none). `kinds` are the question kinds, in
    equal numbers per split; `max_shapes` (1 to 3) the most shapes in an image (1: one shape, the easiest
    task: "What color is the shape?", ...); `target_fraction` the range of the asked-about shape's side as a
    fraction of the image's short side (never under `MIN_TARGET_SIZE`; only one shape fits beyond 0.5);
    `questions` the question-and-answer turns of each train record, up to (`ask_more`: the record's own
    question first, then others about the same image; the images and the test split are the same for any
    value). Raises FileExistsError when `out_dir` is a file or a non-empty folder (unless
    `force`: then the files of a previous run are replaced and anything else is kept) and ValueError for bad
    arguments.

    The summary: `records` and `counts` (per kind) of each split, `answers` (the closed answer set per
    kind), `chance` (per kind and overall: the majority-class rate on the test split, at least
    1/len(answer set)) and `blind` (per kind and overall: a text-only model's accuracy on the test split,
    the majority answer per question text as learned from the train split; the bar to beat to show the
    model looks at the image), and `params`.
    """
    for name, value in (("train", train), ("test", test)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown question kinds {unknown or list(kinds)} (expected some of {', '.join(KINDS)})")
    lo, hi = target_fraction
    if not 0 < lo <= hi < 1 or (hi > 0.5 and max_shapes > 1):
        raise ValueError(
            f"target_fraction must be 0 < lo <= hi < 1 (hi <= 0.5 with several shapes), got {target_fraction!r}"
        )
    if not isinstance(questions, int) or questions < 1:
        raise ValueError(f"questions must be a positive int, got {questions!r}")
    if max_shapes not in range(1, MAX_SHAPES + 1) or ("count" in kinds and max_shapes < 2):
        raise ValueError(f"max_shapes must be 1 to {MAX_SHAPES} (at least 2 with count questions), got {max_shapes!r}")
    sides = _image_sides(image_size, side_multiple)
    out_dir = Path(out_dir)
    _prepare(out_dir, force)
    started = time.perf_counter()
    kinds = tuple(kinds)
    train_records, train_digests = _generate_split(
        out_dir, "train", train, seed, sides, kinds, set(), max_shapes, tuple(target_fraction)
    )
    test_records, _ = _generate_split(
        out_dir, "test", test, seed, sides, kinds, train_digests, max_shapes, tuple(target_fraction)
    )
    if questions > 1:
        rng = np.random.default_rng([seed, SPLIT_STREAMS["more questions"]])
        train_records = [ask_more(record, questions, rng, kinds) for record in train_records]
    _write_jsonl(out_dir / "train.jsonl", train_records)
    _write_jsonl(out_dir / "test.jsonl", test_records)
    params = {
        "generator": __name__,
        "format_version": FORMAT_VERSION,
        "train": train,
        "test": test,
        "seed": seed,
        "image_size": list(image_size) if not isinstance(image_size, int) else image_size,
        "image_sides": sides,
        "side_multiple": side_multiple,
        "kinds": list(kinds),
        "max_shapes": max_shapes,
        "target_fraction": list(target_fraction),
        "questions": questions,
        "min_shape_size": MIN_SHAPE_SIZE,
        "min_target_size": MIN_TARGET_SIZE,
        "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
        "color_jitter": COLOR_JITTER,
        "backgrounds": list(BACKGROUNDS),
        "answer_hint": ANSWER_HINT,
    }
    summary = summarize(train_records, test_records, kinds)
    summary["params"] = params
    summary["seconds"] = round(time.perf_counter() - started, 3)
    meta = {"params": params, "summary": {k: v for k, v in summary.items() if k not in ("params", "seconds")}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return summary


def summarize(train_records, test_records, kinds=KINDS) -> dict:
    """Counts per kind, answer sets, and the chance and blind baselines on the test split."""
    by_kind = defaultdict(list)
    for record in test_records:
        by_kind[record["kind"]].append(record)
    return {
        "records": {"train": len(train_records), "test": len(test_records)},
        "counts": {
            split: {k: sum(r["kind"] == k for r in records) for k in kinds}
            for split, records in (("train", train_records), ("test", test_records))
        },
        "answers": {k: list(ANSWERS[k]) for k in kinds},
        "chance": {
            "overall": chance_accuracy(test_records),
            "per_kind": {k: chance_accuracy(by_kind[k]) for k in kinds},
        },
        "blind": {
            "overall": blind_accuracy(test_records, train_records),
            "per_kind": {k: blind_accuracy(by_kind[k], train_records) for k in kinds},
        },
    }


# ------------------------------------------------------------------------------------------- evaluation


def chance_accuracy(records) -> float:
    """The majority-class baseline: per kind, the rate of its most common answer (at least 1 over the size
    of its closed answer set), averaged over the records (0.0 for none)."""
    by_kind = defaultdict(Counter)
    for record in records:
        by_kind[record["kind"]][record["answer"]] += 1
    if not by_kind:
        return 0.0
    total = sum(sum(c.values()) for c in by_kind.values())
    correct = 0.0
    for kind, answers in by_kind.items():
        n = sum(answers.values())
        floor = 1 / len(ANSWERS[kind]) if kind in ANSWERS else 0.0
        correct += n * max(answers.most_common(1)[0][1] / n, floor)
    return correct / total


def blind_accuracy(records, train_records=None) -> float:
    """The accuracy of a text-only model that answers each question text with its most common answer in
    `train_records` (in `records` themselves when None: an optimistic bound), the kind's most common
    answer for a question text it never saw. 0.0 for no records."""
    if not records:
        return 0.0
    reference = records if train_records is None else train_records
    per_question, per_kind = defaultdict(Counter), defaultdict(Counter)
    for record in reference:
        per_question[_question_of(record)][record["answer"]] += 1
        per_kind[record["kind"]][record["answer"]] += 1
    correct = 0
    for record in records:
        votes = per_question.get(_question_of(record)) or per_kind.get(record["kind"])
        # ties go to the answer first in sorted order, so the number is deterministic
        guess = min(votes.items(), key=lambda item: (-item[1], item[0]))[0] if votes else None
        correct += guess == record["answer"]
    return correct / len(records)


def _question_of(record):
    if "question" in record:
        return record["question"]
    for message in record["messages"]:
        if message["role"] == "user":
            return " ".join(c["text"] for c in message["content"] if c.get("type") == "text")
    return ""


def normalize_answer(text) -> str:
    """Lower case, punctuation and surrounding whitespace removed, inner whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def is_correct(prediction, answer) -> bool:
    """Exact match after `normalize_answer`, or the answer as the first word of a longer prediction
    ("Red.", "red circle"); a number word counts as its digit ("two" for "2")."""
    words = normalize_answer(prediction).split()
    answer = normalize_answer(answer)
    if not words:
        return answer == ""
    first = _NUMBER_WORDS.get(words[0], words[0])
    return " ".join(words) == answer or first == answer


def score(predictions, records) -> dict:
    """Exact-match accuracy of `predictions` (strings, one per record, in order; or a dict from record
    index to string, a missing one counting as wrong) overall and per kind:
    {"accuracy", "correct", "total", "per_kind": {kind: {"accuracy", "correct", "total"}}}."""
    records = list(records)
    if isinstance(predictions, dict):
        predictions = [predictions.get(i) for i in range(len(records))]
    else:
        predictions = list(predictions)
        if len(predictions) != len(records):
            raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    correct, total = Counter(), Counter()
    for prediction, record in zip(predictions, records):
        kind = record["kind"]
        total[kind] += 1
        correct[kind] += prediction is not None and is_correct(prediction, record["answer"])
    n, c = sum(total.values()), sum(correct.values())
    return {
        "accuracy": c / n if n else 0.0,
        "correct": c,
        "total": n,
        "per_kind": {k: {"accuracy": correct[k] / total[k], "correct": correct[k], "total": total[k]} for k in total},
    }


def flat_score(result: dict) -> dict:
    """`score`'s result as one flat mapping: `accuracy` and `acc_KIND` for every kind."""
    return {"accuracy": result["accuracy"], **{f"acc_{k}": v["accuracy"] for k, v in result["per_kind"].items()}}


def smallest_target_side(records, min_pixels, max_pixels) -> float:
    """The smallest side, in pixels of the base scale the model sees, of the shape each record asks about,
    after an image processor's resize with `min_pixels` / `max_pixels` (its `smart_resize`). Under one
    merged token (32) the model has no token that the shape fills: keep it above, e.g. with `min_pixels`."""
    from image_processing_navil import smart_resize

    smallest = float("inf")
    for record in records:
        width, height = record["image_size"]
        resized_h, resized_w = smart_resize(height, width, min_pixels, max_pixels)
        factor = min(resized_h / height, resized_w / width)
        smallest = min(smallest, record["shapes"][0]["size"] * factor)
    return smallest


# ------------------------------------------------------------------------------------------ command line

EXIT_OK, EXIT_USAGE = 0, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _count(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser():
    parser = _Parser(
        prog="python -m navil_hf.tasks.shapes",
        description="Write the synthetic shapes VQA dataset (images/, train.jsonl, test.jsonl, meta.json) "
        "and print its summary.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must be empty or new)")
    parser.add_argument("--train", type=_count, default=2000, metavar="N", help="train records (default 2000)")
    parser.add_argument("--test", type=_count, default=200, metavar="N", help="test records (default 200)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=list(DEFAULT_IMAGE_SIZE),
        metavar=("MIN", "MAX"),
        help=f"range of each image side in pixels, multiples of {SIDE_MULTIPLE} (default "
        f"{DEFAULT_IMAGE_SIZE[0]} {DEFAULT_IMAGE_SIZE[1]}, at least {MIN_IMAGE_SIDE})",
    )
    parser.add_argument("--questions", type=int, default=1, metavar="Q",
                        help="question-and-answer turns per train image, up to (default 1)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def format_summary(summary, out_dir) -> str:
    records = summary["records"]
    lines = [f"wrote {records['train']} train + {records['test']} test records to {out_dir}"]
    lines.append(f"{'kind':<10}{'train':>7}{'test':>6}{'chance':>8}{'blind':>7}  answers")
    for kind, answers in summary["answers"].items():
        lines.append(
            f"{kind:<10}{summary['counts']['train'][kind]:>7}{summary['counts']['test'][kind]:>6}"
            f"{summary['chance']['per_kind'][kind]:>8.3f}{summary['blind']['per_kind'][kind]:>7.3f}  "
            + ", ".join(answers)
        )
    lines.append(
        f"{'overall':<10}{records['train']:>7}{records['test']:>6}"
        f"{summary['chance']['overall']:>8.3f}{summary['blind']['overall']:>7.3f}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = make_shapes_dataset(
            args.out_dir,
            train=args.train,
            test=args.test,
            seed=args.seed,
            image_size=tuple(args.image_size),
            questions=args.questions,
            force=args.force,
        )
    except (FileExistsError, ValueError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary, args.out_dir))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
