"""Generated scenes: a few coloured shapes on a 3x3 grid, or one or two coloured words, drawn at 96x96 pixels.

The world is deliberately small (five colours, four shapes, two sizes, three columns, a couple of dozen
words) so that a model with a few hundred thousand parameters can learn it in minutes; every attribute a
question asks about is visible at the tiny tower's 4-pixel patch resolution.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
import hashlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

IMAGE_SIZE = 96
CELL = IMAGE_SIZE // 3
BACKGROUND = (240, 240, 240)
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 8, "large": 13}  # radius in pixels; a large shape still fits its 32-pixel cell
COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")
WORDS = (
    "cat", "dog", "sun", "box", "car", "hat", "pen", "cup", "map", "key", "bus", "egg",
    "fox", "owl", "bee", "cow", "pig", "jam", "ink", "toy", "zoo", "sky", "ice", "van",
)
# Every shape's fill carries a pattern of its own with the period of the tower's 4-pixel patches, aligned to
# their grid (rows, columns, diagonals; the circle plain), so that each patch of a shape shows which shape it
# is as it shows its colour; without them a tiny tower tells shapes from their outlines only.
PATTERNS = {"circle": None, "square": lambda x, y: y % 4 == 0, "triangle": lambda x, y: x % 4 == 0,
            "star": lambda x, y: (x + y) % 4 == 0}
PATTERN_SHADE = 0.55  # the pattern's pixels: the fill colour darkened to this fraction
WORD_ROWS = ("top", "bottom")
MAX_OBJECTS = 3
HELD_OUT_EVERY = 8


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    row: int
    col: int
    dx: int
    dy: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Word:
    text: str
    color: str
    row: int  # index into WORD_ROWS
    dx: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...] = ()
    words: tuple[Word, ...] = ()

    @property
    def kind(self) -> str:
        return "words" if self.words else "shapes"

    def key(self) -> tuple:
        """Identical keys render identical images."""
        return (self.objects, self.words)

    @property
    def held_out(self) -> bool:
        """One scene in `HELD_OUT_EVERY`, chosen by a hash of its key, is for evaluation only: training data (the
        shipped bases' corpus and every demo run's stage data) never holds one, evaluation sets hold nothing else,
        so no seed of either can leak a test image into training."""
        digest = hashlib.sha256(repr(self.key()).encode()).digest()
        return int.from_bytes(digest[:4], "little") % HELD_OUT_EVERY == 0


def sample_shapes(rng: random.Random, count: int | None = None) -> Scene:
    count = count or rng.randint(1, MAX_OBJECTS)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], count)
    combos = rng.sample([(c, s) for c in COLORS for s in SHAPES], count)
    objects = []
    for (row, col), (color, shape) in zip(cells, combos):
        size = rng.choice(tuple(SIZES))
        slack = CELL // 2 - SIZES[size] - 1
        objects.append(Shape(color, shape, size, row, col, rng.randint(-slack, slack), rng.randint(-slack, slack)))
    return Scene(objects=tuple(objects))


def sample_words(rng: random.Random, count: int | None = None) -> Scene:
    count = count or rng.randint(1, 2)
    texts = rng.sample(WORDS, count)
    colors = rng.sample(tuple(COLORS), count)
    rows = rng.sample(range(len(WORD_ROWS)), count)
    return Scene(words=tuple(Word(t, c, r, rng.randint(-20, 20)) for t, c, r in zip(texts, colors, rows)))


def sample_scene(rng: random.Random, word_fraction: float = 0.25) -> Scene:
    return sample_words(rng) if rng.random() < word_fraction else sample_shapes(rng)


def sample_training_scene(rng: random.Random, word_fraction: float = 0.25) -> Scene:
    while True:
        scene = sample_scene(rng, word_fraction)
        if not scene.held_out:
            return scene


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    # Pillow's bundled default font, so the rendering is the same wherever this Pillow version is installed.
    return ImageFont.load_default(size=22)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    import math

    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    points = []
    for i in range(10):  # star: alternate outer and inner radius
        angle = -math.pi / 2 + i * math.pi / 5
        radius = r if i % 2 == 0 else r * 0.45
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _center(obj: Shape) -> tuple[int, int]:
    return obj.col * CELL + CELL // 2 + obj.dx, obj.row * CELL + CELL // 2 + obj.dy


def _word_origin(word: Word) -> tuple[int, int, tuple[int, int, int, int]]:
    left, top, right, bottom = _font().getbbox(word.text)
    x = (IMAGE_SIZE - (right - left)) // 2 + word.dx - left
    y = (24 if word.row == 0 else 72) - (top + bottom) // 2
    return x, y, (x + left, y + top, x + right, y + bottom)


def regions(scene: Scene) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(phrase, pixel box) for every object and word: the region-level pairs of the vision tower's training."""
    out = []
    for obj in scene.objects:
        (cx, cy), r = _center(obj), SIZES[obj.size]
        out.append((f"a {obj.size} {obj.color} {obj.shape}", (cx - r, cy - r, cx + r, cy + r)))
    for word in scene.words:
        out.append((f'the word "{word.text}" in {word.color}', _word_origin(word)[2]))
    return out


@lru_cache(maxsize=None)
def _pattern_mask(shape: str) -> Image.Image:
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    if PATTERNS[shape] is not None:
        mask.putdata([255 * PATTERNS[shape](i % IMAGE_SIZE, i // IMAGE_SIZE) for i in range(IMAGE_SIZE * IMAGE_SIZE)])
    return mask


def _shape_mask(obj: Shape) -> Image.Image:
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    (cx, cy), r = _center(obj), SIZES[obj.size]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif obj.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=255)
    return mask


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    for obj in scene.objects:
        mask = _shape_mask(obj)
        fill = COLORS[obj.color]
        image.paste(fill, mask=mask)
        shade = tuple(int(channel * PATTERN_SHADE) for channel in fill)
        image.paste(shade, mask=ImageChops.multiply(mask, _pattern_mask(obj.shape)))
    draw = ImageDraw.Draw(image)
    for word in scene.words:
        x, y, _ = _word_origin(word)
        draw.text((x, y), word.text, fill=COLORS[word.color], font=_font())
    return image


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """One sentence listing everything in the scene, in reading order or, given `rng`, in a random order.

    In a random order, naming an object's shape after its colour, or its place after both, takes finding
    that object in the image: stage I then trains the lookup that questions about one object need, where
    reading order could be followed without it."""
    if scene.words:
        items = sorted(scene.words, key=lambda w: w.row)
        parts = [f'the word "{w.text}" in {w.color} at the {WORD_ROWS[w.row]}' for w in items]
    else:
        ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
        parts = [f"a {o.size} {o.color} {o.shape} at the {ROWS[o.row]} {COLUMNS[o.col]}" for o in ordered]
    if rng is not None:
        rng.shuffle(parts)
    return "There is " + _join(parts) + "."


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


PATCH_GRID = 24  # the tower's 4-pixel patches on the 96-pixel image: the official 24x24 grid


def patch_labels(scene: Scene) -> dict[str, np.ndarray]:
    """What each of the 24x24 patches shows, as class indices (0 = nothing): "color" (1 + index in COLORS),
    "shape" (1 + index in SHAPES), "size" (1 + index in SIZES) for patches at least half covered by a shape, and
    "word" (1 + index in WORDS) plus its colour for every patch in a word's box (a word is read from its whole
    box, not from single strokes). The vision tower's per-patch training targets."""
    side = IMAGE_SIZE // PATCH_GRID
    labels = {name: np.zeros((PATCH_GRID, PATCH_GRID), dtype=np.int64) for name in ("color", "shape", "size", "word")}
    colors, sizes = list(COLORS), list(SIZES)
    for obj in scene.objects:
        coverage = np.asarray(_shape_mask(obj), dtype=np.float32).reshape(PATCH_GRID, side, PATCH_GRID, side).mean(axis=(1, 3))
        inside = coverage >= 127.5
        labels["color"][inside] = 1 + colors.index(obj.color)
        labels["shape"][inside] = 1 + SHAPES.index(obj.shape)
        labels["size"][inside] = 1 + sizes.index(obj.size)
    for word in scene.words:
        x0, y0, x1, y1 = _word_origin(word)[2]
        rows = slice(max(0, y0 // side), min(PATCH_GRID, -(-y1 // side)))
        cols = slice(max(0, x0 // side), min(PATCH_GRID, -(-x1 // side)))
        labels["word"][rows, cols] = 1 + WORDS.index(word.text)
        labels["color"][rows, cols] = 1 + colors.index(word.color)
    return labels
