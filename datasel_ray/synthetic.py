"""Deterministic generator of a LLaVA-format multimodal instruction pool (pure Python + PIL + numpy).

The pool is small enough for a laptop and shaped like LLaVA-665k, so every phase of the pipeline can be
exercised offline, and every answer is a deterministic function of the image or the question, so a tiny
reference model can learn the tasks.

Tasks and image folders (``TASK_FOLDERS``; folder names match LLaVA-665k sources, so image-path prefix
rules work; pass ``TASK_FOLDERS`` as the ingest ``task_map`` to recover the synthetic task names):

=============  ==============  ========================================================================
task           folder          content
=============  ==============  ========================================================================
caption        ``coco/``       1-4 shapes in distinct cells of a 3x3 grid; the answer lists every shape
                               in reading order with size, colour, kind and cell, then the background:
                               "a small red circle at the top-left and a large blue diamond in the
                               centre on a striped mint background"
color_qa       ``gqa/``        2-5 shapes; "What colour is the large square at the bottom-right?" -> "red"
counting       ``vg/``         3-8 shapes, some matching a filter (any non-empty subset of size, colour,
                               kind); "How many small red circles are there?" -> "2"
ocr            ``ocr_vqa/``    a noun or "<adjective> <noun>" (``OCR_ADJECTIVES`` x ``OCR_NOUNS``, one
                               word a line) in PIL's default font, several sizes and inks -> the text
position       ``textvqa/``    1-4 shapes; "Where is the small green triangle?" -> "top-left" (the cell)
multi_turn     ``multiturn/``  2-3 human/gpt pairs about one scene (shape count, colour of a located
                               shape, what is in a cell, background, where a named shape is)
text_chat      (no image)      arithmetic (operands up to 999), word reversal, upper-casing -> exact answer
=============  ==============  ========================================================================

Images are ``image_size`` x ``image_size`` RGB PNGs named ``<folder>/<row index:06d>.png``; row ids are
``sample-<row index:06d>``. Image paths in rows are relative to ``out_dir``, which is the image root.
Shapes (``SHAPES`` x ``SIZES`` x ``COLOURS``) are drawn without anti-aliasing in exact ``COLOURS`` values,
at most one per grid cell (``POSITIONS`` names the cells), on a ``BACKGROUNDS`` colour that is plain or
has horizontal / vertical / diagonal stripes (per-sample period, width and offset) in
:func:`stripe_colour`; the top-left pixel is always the plain background colour. Only the first human turn
of an image row holds ``"<image>\\n"``; text-only rows have no ``image`` key.

Ordinary rows are genuinely distinct, as in real pools: when base samples are planned, one whose (task,
conversation text) was already used is redrawn (up to ``UNIQUE_TRIES`` times), so outside near-duplicate
groups no two clean rows share conversation text, and their images differ in layout, attributes and
background. Near-duplicate group members are then the only rows that are much more alike than chance.

Injections (all chosen by one seeded ``numpy.random.Generator``; rows are shuffled into pool order):

- near-duplicate groups (``duplicate_rate`` of the good rows, groups of ``duplicate_group_size`` members,
  image tasks only): one base sample copied k times; member 0 keeps the original image, the others get a
  1-2 px shift, a small brightness change and small pixel noise, each saved as its own PNG; each member's
  questions use a different template (paraphrase); answers are identical.
- noisy rows (``noise_rate`` of the good rows outside duplicate groups): every answer replaced by an
  answer of a sample of a different task (never equal to the correct answer).
- bad rows (``bad_rate`` of all rows, kinds in rotation, at least one of each kind when
  ``num_samples >= 100`` and ``bad_rate > 0``); ``bad_kind`` values are the quarantine reason codes of
  :class:`datasel_ray.schema.Reason`: ``image_missing``, ``image_corrupt``, ``no_assistant_turn``,
  ``empty_text``, ``wrong_type``, ``too_long`` (65 human/gpt pairs = 130 turns, or > 32768 characters),
  ``image_path_escape``, ``missing_field`` and, for jsonl only, ``invalid_json`` (a truncated line).

Ground truth (``ground_truth.jsonl``, never in the pool rows): one line per pool row in pool order,
``{"index", "id", "task", "dup_group", "noisy", "bad_kind"}``; ``dup_group`` is -1 outside groups,
``bad_kind`` null for good rows; ``task`` is the task the row was generated as (also for bad rows).

Pool formats: ``pool.json`` (one JSON list), ``pool.jsonl`` (one record a line), ``pool.parquet`` with
string columns ``id``, ``image`` (null for text-only rows) and ``conversations`` (the JSON text of the
conversations value, null when the field is missing; a ``wrong_type`` row holds JSON of the wrong type).
With ``include_task_field=True`` a ``task`` field (parquet: column) is written too.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datasel_ray.pools.planning import check_group_size, group_sizes, in_pool_order
from datasel_ray.roles import IMAGE_PLACEHOLDER
from datasel_ray.schema import Reason

TASK_FOLDERS: dict[str, str] = {
    "coco": "caption",
    "gqa": "color_qa",
    "vg": "counting",
    "ocr_vqa": "ocr",
    "textvqa": "position",
    "multiturn": "multi_turn",
}
TEXT_TASK = "text_chat"
IMAGE_TASKS: tuple[str, ...] = tuple(TASK_FOLDERS.values())
TASKS: tuple[str, ...] = (*IMAGE_TASKS, TEXT_TASK)
FOLDER_OF_TASK: dict[str, str] = {task: folder for folder, task in TASK_FOLDERS.items()}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "black": (10, 10, 10),
    "pink": (235, 80, 165),
    "brown": (125, 75, 30),
    "cyan": (20, 185, 205),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (190, 190, 190),
    "beige": (240, 225, 190),
    "mint": (205, 240, 215),
    "lavender": (225, 212, 245),
    "sky": (205, 225, 250),
    "cream": (250, 246, 220),
    "peach": (250, 218, 200),
}
PATTERNS: tuple[str, ...] = ("plain", "striped")  # striped: stripes a shade darker than the background
STRIPE_SHADE = 22  # stripe colour = background colour minus this, per channel (never a palette colour)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
# POSITIONS[row][col]: the name of a grid cell
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top-left", "top", "top-right"),
    ("left", "centre", "right"),
    ("bottom-left", "bottom", "bottom-right"),
)
OCR_ADJECTIVES: tuple[str, ...] = (
    "quiet", "brave", "happy", "lucky", "sleepy", "windy", "sunny", "rapid", "gentle", "silent", "hidden",
    "frozen", "golden", "silver", "wild", "calm", "early", "late", "tiny", "giant", "old", "young", "soft",
    "sharp", "warm", "cold", "bright", "dark", "lazy", "busy", "proud", "noble", "rusty", "shiny", "sweet",
    "salty", "fuzzy", "dusty", "misty", "royal",
)
OCR_NOUNS: tuple[str, ...] = (
    "cat", "dog", "tree", "moon", "book", "fish", "lamp", "rain", "door", "milk", "cake", "boat", "king",
    "wolf", "sun", "leaf", "ship", "road", "hat", "pen", "bird", "rose", "apple", "bread", "chair", "cloud",
    "river", "stone", "tiger", "horse", "piano", "clock", "train", "house", "bridge", "garden", "island",
    "candle", "forest", "window", "rabbit", "castle", "turtle", "button", "dragon", "pepper", "anchor",
    "lemon", "tulip", "comet", "falcon", "kettle", "pillow", "ladder", "mirror", "basket", "violin",
    "lantern", "robot", "cactus",
)
OCR_WORDS: tuple[str, ...] = OCR_ADJECTIVES + OCR_NOUNS  # an ocr answer is "<adjective> <noun>" or "<noun>"
OCR_INK: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "navy": (20, 20, 110), "maroon": (110, 20, 20), "pine": (20, 90, 30),
    "plum": (90, 30, 90), "slate": (50, 60, 70),
}
OCR_FONT_SIZES: tuple[int, ...] = (9, 10, 11, 12)

IMAGE_TOKEN = IMAGE_PLACEHOLDER
GRID = 3  # scenes are laid out on a GRID x GRID grid of cells, one shape per cell
TOO_LONG_PAIRS = 65  # > default max_turns (64) whether turns are counted as messages or as pairs
TOO_LONG_CHARS = 33000  # > default max_chars (32768)

BAD_KINDS: tuple[str, ...] = (
    Reason.IMAGE_MISSING, Reason.IMAGE_CORRUPT, Reason.NO_ASSISTANT_TURN, Reason.EMPTY_TEXT,
    Reason.WRONG_TYPE, Reason.TOO_LONG, Reason.IMAGE_PATH_ESCAPE, Reason.MISSING_FIELD,
)
JSONL_ONLY_BAD_KINDS: tuple[str, ...] = (Reason.INVALID_JSON,)
_IMAGE_BAD_KINDS = frozenset({Reason.IMAGE_MISSING, Reason.IMAGE_CORRUPT, Reason.IMAGE_PATH_ESCAPE})
_ESCAPE_PATHS = ("../../etc/passwd", "/etc/passwd", "../outside/000000.png")

PoolFormat = Literal["json", "jsonl", "parquet"]
POOL_FILE = {"json": "pool.json", "jsonl": "pool.jsonl", "parquet": "pool.parquet"}
GROUND_TRUTH_FILE = "ground_truth.jsonl"


@dataclass
class SynthConfig:
    """What to generate. Rates are fractions; counts are rounded."""

    num_samples: int = 500  # total rows written, bad rows included
    seed: int = 0
    format: PoolFormat = "json"
    duplicate_rate: float = 0.10  # fraction of good rows that belong to near-duplicate groups
    duplicate_group_size: tuple[int, int] = (3, 6)  # members per group (min, max)
    noise_rate: float = 0.05  # fraction of good rows whose answers are unrelated to the image/question
    bad_rate: float = 0.04  # fraction of rows that are bad rows
    image_size: int = 64
    include_task_field: bool = False  # write an explicit "task" field into each row

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if self.format not in POOL_FILE:
            raise ValueError(f"Unknown format {self.format!r}. Choose from: {', '.join(POOL_FILE)}.")
        for name in ("duplicate_rate", "noise_rate", "bad_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        check_group_size(self.duplicate_group_size)
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")


@dataclass
class PoolInfo:
    """Where :func:`generate_pool` wrote the pool and how many rows it holds."""

    pool_path: Path
    image_root: Path
    ground_truth_path: Path
    num_rows: int
    num_bad: int


# --------------------------------------------------------------------------- pictures


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # key of COLOURS
    row: int  # grid cell
    col: int
    jitter: tuple[float, float, float]  # (dx, dy, size) fractions in [0, 1) placing the shape in its cell
    size: str = "large"  # one of SIZES

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    @property
    def name(self) -> str:
        return f"{self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Stripes:
    """Background stripes: ``width`` of every ``period`` pixels, starting ``offset`` pixels in.

    ``offset`` is in ``[1, period - width]``, so the top-left pixel is always plain background.
    """

    direction: str  # "horizontal", "vertical" or "diagonal"
    period: int
    width: int
    offset: int

    def mask(self, size: int) -> np.ndarray:
        ys, xs = np.mgrid[0:size, 0:size]
        along = {"horizontal": ys, "vertical": xs, "diagonal": xs + ys}[self.direction]
        return (along - self.offset) % self.period < self.width


@dataclass(frozen=True)
class Scene:
    """Coloured shapes on a plain or striped background."""

    background: str
    shapes: tuple[Shape, ...]
    stripes: Stripes | None = None

    @property
    def pattern(self) -> str:
        return "plain" if self.stripes is None else "striped"

    def render(self, size: int) -> Image.Image:
        image = _background_image(self.background, self.stripes, size)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            _draw_shape(draw, shape, size)
        return image


@dataclass(frozen=True)
class Word:
    """A word (or a two-word phrase, one word a line) written with PIL's default font."""

    text: str
    background: str
    ink: str
    offset: tuple[float, float]  # fractions of the free space left of / above the text
    font_size: int = 10
    stripes: Stripes | None = None

    def render(self, size: int) -> Image.Image:
        image = _background_image(self.background, self.stripes, size)
        draw = ImageDraw.Draw(image)
        font = _default_font(self.font_size)
        text = self.text.replace(" ", "\n")
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
        free_x = max(0, size - (right - left) - 4)
        free_y = max(0, size - (bottom - top) - 4)
        x = 2 - left + int(self.offset[0] * free_x)
        y = 2 - top + int(self.offset[1] * free_y)
        draw.multiline_text((x, y), text, fill=OCR_INK[self.ink], font=font)
        return image


@dataclass(frozen=True)
class Perturbation:
    """Light near-duplicate perturbation: a shift, a brightness change and pixel noise."""

    shift: tuple[int, int]
    brightness: int  # magnitude; applied towards mid-grey so that it is not lost to clipping
    noise_seed: int
    noise_amplitude: int = 4

    def apply(self, image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.int16)
        pixels = np.roll(pixels, shift=self.shift, axis=(0, 1))
        brightness = -self.brightness if pixels.mean() > 127 else self.brightness
        noise = np.random.default_rng(self.noise_seed).integers(
            -self.noise_amplitude, self.noise_amplitude + 1, size=pixels.shape, dtype=np.int16)
        pixels = np.clip(pixels + brightness + noise, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="RGB")


_FONTS: dict[int, ImageFont.ImageFont | ImageFont.FreeTypeFont] = {}


def _default_font(size: int = 10) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: one bitmap size
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def stripe_colour(background: str) -> tuple[int, int, int]:
    """The colour of the stripes on a striped ``background``."""
    return tuple(max(0, c - STRIPE_SHADE) for c in BACKGROUNDS[background])  # type: ignore[return-value]


def _background_image(background: str, stripes: Stripes | None, size: int) -> Image.Image:
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[...] = BACKGROUNDS[background]
    if stripes is not None:
        pixels[stripes.mask(size)] = stripe_colour(background)
    return Image.fromarray(pixels, mode="RGB")


def shape_box(shape: Shape, size: int) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (inclusive) of ``shape`` in a ``size`` x ``size`` image.

    Small shapes span 40-52% of a cell, large ones 76-90%; boxes stay at least one pixel inside their cell.
    """
    cell = size // GRID
    low, span = (0.40, 0.12) if shape.size == "small" else (0.76, 0.14)
    side = min(cell - 2, int(cell * (low + span * shape.jitter[2])))
    slack = cell - side - 2
    x0 = shape.col * cell + 1 + int(shape.jitter[0] * slack)
    y0 = shape.row * cell + 1 + int(shape.jitter[1] * slack)
    return x0, y0, x0 + side - 1, y0 + side - 1


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, size: int) -> None:
    x0, y0, x1, y1 = shape_box(shape, size)
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        mx, my = (x0 + x1) // 2, (y0 + y1) // 2
        draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=fill)


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Turn:
    """One human/gpt pair; the question is ``templates[template].format(**slots)``."""

    templates: tuple[str, ...]
    slots: tuple[tuple[str, str], ...]
    answer: str
    template: int = 0

    @property
    def question(self) -> str:
        return self.templates[self.template % len(self.templates)].format(**dict(self.slots))

    def paraphrased(self, step: int) -> "Turn":
        return replace(self, template=(self.template + step) % len(self.templates))


@dataclass(frozen=True)
class Sample:
    task: str
    turns: tuple[Turn, ...]
    picture: Scene | Word | None = None
    perturbation: Perturbation | None = None

    def conversations(self) -> list[dict]:
        messages = []
        for position, turn in enumerate(self.turns):
            prefix = f"{IMAGE_TOKEN}\n" if position == 0 and self.picture is not None else ""
            messages.append({"from": "human", "value": prefix + turn.question})
            messages.append({"from": "gpt", "value": turn.answer})
        return messages

    def text_key(self) -> str:
        """The task and conversation text; no two base samples of a pool share it."""
        return json.dumps([self.task, self.conversations()])

    def render(self, size: int) -> Image.Image:
        assert self.picture is not None
        image = self.picture.render(size)
        return self.perturbation.apply(image) if self.perturbation else image


def _turn(rng: np.random.Generator, templates: tuple[str, ...], answer: str, **slots: str) -> Turn:
    return Turn(templates, tuple(sorted(slots.items())), answer, int(rng.integers(len(templates))))


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _jitter(rng: np.random.Generator) -> tuple[float, float, float]:
    return tuple(float(v) for v in rng.random(3))  # type: ignore[return-value]


def _random_cells(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    flat = sorted(int(c) for c in rng.permutation(GRID * GRID)[:count])  # reading order
    return [(c // GRID, c % GRID) for c in flat]


def _stripes(rng: np.random.Generator) -> Stripes | None:
    if rng.random() < 0.5:
        return None
    period = int(rng.integers(5, 13))
    width = int(rng.integers(1, period // 2 + 1))
    return Stripes(_pick(rng, ("horizontal", "vertical", "diagonal")), period, width,
                   int(rng.integers(1, period - width + 1)))


def _random_shape(rng: np.random.Generator, row: int, col: int) -> Shape:
    return Shape(_pick(rng, SHAPES), _pick(rng, tuple(COLOURS)), row, col, _jitter(rng), _pick(rng, SIZES))


def _random_scene(rng: np.random.Generator, count: int) -> Scene:
    """``count`` random shapes in distinct cells (reading order) on a random background."""
    shapes = tuple(_random_shape(rng, row, col) for row, col in _random_cells(rng, count))
    return Scene(_pick(rng, tuple(BACKGROUNDS)), shapes, _stripes(rng))


def _where(position: str) -> str:
    """``"top-left"`` -> ``"at the top-left"``; ``"left"`` -> ``"on the left"``; ``"centre"`` -> ``"in the centre"``."""
    if position == "centre":
        return "in the centre"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def _background_phrase(scene: Scene) -> str:
    return f"a {scene.background} background" if scene.stripes is None else f"a striped {scene.background} background"


def _describe(shapes) -> str:
    """Every shape in reading order: ``"a small red circle at the top-left and a large blue square in the centre"``."""
    names = [f"a {s.name} {_where(s.position)}" for s in sorted(shapes, key=lambda s: (s.row, s.col))]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _unique_by(shapes, key) -> list[Shape]:
    counts: dict = {}
    for shape in shapes:
        counts[key(shape)] = counts.get(key(shape), 0) + 1
    return [shape for shape in shapes if counts[key(shape)] == 1]


CAPTION_TEMPLATES = (
    "Describe the image briefly.",
    "Give a short caption for this picture.",
    "What is shown in the image?",
    "Write a one-line description of the image.",
)
COLOUR_TEMPLATES = (
    "What colour is the {shape} {where}?",
    "Which colour does the {shape} {where} have?",
    "Tell me the colour of the {shape} {where}.",
)
COUNT_TEMPLATES = (
    "How many {what} are there?",
    "Count the {what} in the image.",
    "What is the number of {what} in the picture?",
)
OCR_TEMPLATES = (
    "What word is written in the image?",
    "Read the text in the picture.",
    "Which word does the image show?",
    "Transcribe the text in the image.",
)
POSITION_TEMPLATES = (
    "Where is the {shape}? Answer with a grid position such as top-left or centre.",
    "In which part of the image is the {shape}?",
    "Which grid cell holds the {shape}?",
)
SHAPE_COUNT_TEMPLATES = ("How many shapes are in the image?", "How many shapes can you see?")
CELL_TEMPLATES = ("What is {where}?", "Which shape is {where}? Give its size, colour and kind.")
BACKGROUND_TEMPLATES = ("What colour is the background?", "Which colour is the background?")


def make_caption(rng: np.random.Generator) -> Sample:
    scene = _random_scene(rng, int(rng.integers(1, 5)))
    answer = f"{_describe(scene.shapes)} on {_background_phrase(scene)}"
    return Sample("caption", (_turn(rng, CAPTION_TEMPLATES, answer),), scene)


def make_color_qa(rng: np.random.Generator) -> Sample:
    scene = _random_scene(rng, int(rng.integers(2, 6)))
    target = scene.shapes[int(rng.integers(len(scene.shapes)))]
    turn = _turn(rng, COLOUR_TEMPLATES, target.colour, shape=f"{target.size} {target.kind}",
                 where=_where(target.position))
    return Sample("color_qa", (turn,), scene)


def _count_phrase(size: str | None, colour: str | None, kind: str | None) -> str:
    words = [w for w in (size, colour) if w] + [f"{kind}s" if kind else "shapes"]
    return " ".join(words)


def make_counting(rng: np.random.Generator) -> Sample:
    """Some shapes matching a filter (any non-empty subset of size, colour, kind), the rest random."""
    cells = _random_cells(rng, int(rng.integers(3, 9)))
    attributes = [a for a in ("size", "colour", "kind") if rng.random() < 0.6] or ["colour", "kind"]
    wanted = {"size": _pick(rng, SIZES), "colour": _pick(rng, tuple(COLOURS)), "kind": _pick(rng, SHAPES)}
    count = int(rng.integers(1, min(6, len(cells)) + 1))
    matching = set(int(i) for i in rng.permutation(len(cells))[:count])
    shapes = []
    for i, (row, col) in enumerate(cells):
        shape = _random_shape(rng, row, col)
        if i in matching:
            shape = replace(shape, **{a: wanted[a] for a in attributes})
        shapes.append(shape)
    filter_ = {a: wanted[a] for a in attributes}
    answer = sum(all(getattr(s, a) == v for a, v in filter_.items()) for s in shapes)
    scene = Scene(_pick(rng, tuple(BACKGROUNDS)), tuple(shapes), _stripes(rng))
    what = _count_phrase(filter_.get("size"), filter_.get("colour"), filter_.get("kind"))
    return Sample("counting", (_turn(rng, COUNT_TEMPLATES, str(answer), what=what),), scene)


def make_ocr(rng: np.random.Generator) -> Sample:
    noun = _pick(rng, OCR_NOUNS)
    text = noun if rng.random() < 0.25 else f"{_pick(rng, OCR_ADJECTIVES)} {noun}"
    background = _pick(rng, tuple(BACKGROUNDS))
    word = Word(text, background, _pick(rng, tuple(OCR_INK)), (float(rng.random()), float(rng.random())),
                int(_pick(rng, OCR_FONT_SIZES)), _stripes(rng))
    return Sample("ocr", (_turn(rng, OCR_TEMPLATES, word.text),), word)


def make_position(rng: np.random.Generator) -> Sample:
    candidates: list[Shape] = []
    while not candidates:  # the asked shape must be the only one with its name
        scene = _random_scene(rng, int(rng.integers(1, 5)))
        candidates = _unique_by(scene.shapes, lambda s: s.name)
    target = candidates[int(rng.integers(len(candidates)))]
    return Sample("position", (_turn(rng, POSITION_TEMPLATES, target.position, shape=target.name),), scene)


def make_multi_turn(rng: np.random.Generator) -> Sample:
    scene = _random_scene(rng, int(rng.integers(2, 6)))
    asked = scene.shapes[int(rng.integers(len(scene.shapes)))]
    cell = scene.shapes[int(rng.integers(len(scene.shapes)))]
    named = _unique_by(scene.shapes, lambda s: s.name)
    located = named[int(rng.integers(len(named)))] if named else None
    candidates = [
        _turn(rng, SHAPE_COUNT_TEMPLATES, str(len(scene.shapes))),
        _turn(rng, COLOUR_TEMPLATES, asked.colour, shape=f"{asked.size} {asked.kind}", where=_where(asked.position)),
        _turn(rng, CELL_TEMPLATES, f"a {cell.name}", where=_where(cell.position)),
        _turn(rng, BACKGROUND_TEMPLATES, scene.background),
    ]
    if located is not None:
        candidates.append(_turn(rng, POSITION_TEMPLATES, located.position, shape=located.name))
    chosen = rng.permutation(len(candidates))[: int(rng.integers(2, 4))]
    return Sample("multi_turn", tuple(candidates[int(i)] for i in chosen), scene)


def make_text_chat(rng: np.random.Generator) -> Sample:
    kind = int(rng.integers(5))
    a, b = int(rng.integers(0, 1000)), int(rng.integers(0, 1000))
    word = _pick(rng, OCR_WORDS)
    if kind == 0:
        turn = _turn(rng, ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."), str(a + b),
                     a=str(a), b=str(b))
    elif kind == 1:
        a, b = max(a, b), min(a, b)
        turn = _turn(rng, ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."),
                     str(a - b), a=str(a), b=str(b))
    elif kind == 2:
        a, b = a % 100, b % 20
        turn = _turn(rng, ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}."),
                     str(a * b), a=str(a), b=str(b))
    elif kind == 3:
        turn = _turn(rng, ("Reverse the word '{w}'.", "Spell '{w}' backwards."), word[::-1], w=word)
    else:
        turn = _turn(rng, ("Write '{w}' in capital letters.", "Convert '{w}' to upper case."), word.upper(),
                     w=word)
    return Sample(TEXT_TASK, (turn,))


SAMPLE_MAKERS = {
    "caption": make_caption,
    "color_qa": make_color_qa,
    "counting": make_counting,
    "ocr": make_ocr,
    "position": make_position,
    "multi_turn": make_multi_turn,
    TEXT_TASK: make_text_chat,
}
UNIQUE_TRIES = 200  # attempts at a base sample with unused conversation text before a repeat is accepted


# --------------------------------------------------------------------------- plan


@dataclass
class PlannedRow:
    sample: Sample
    dup_group: int = -1
    noisy: bool = False
    bad_kind: str | None = None
    bad_variant: int = 0


def _bad_row_count(config: SynthConfig, kinds: tuple[str, ...]) -> int:
    count = int(round(config.bad_rate * config.num_samples))
    if config.bad_rate > 0 and config.num_samples >= 100:
        count = max(count, len(kinds))
    return min(count, config.num_samples)


def _perturbation(rng: np.random.Generator) -> Perturbation:
    shift = (0, 0)
    while shift == (0, 0):
        shift = (int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
    return Perturbation(shift, int(rng.integers(3, 11)), int(rng.integers(2**31)))


def _paraphrases(base: Sample, size: int) -> list[Sample]:
    return [replace(base, turns=tuple(turn.paraphrased(member) for turn in base.turns)) for member in range(size)]


def _unique_sample(rng: np.random.Generator, task: str, used: set[str], size: int = 1) -> Sample:
    """A base sample of ``task`` none of whose ``size`` paraphrases has conversation text in ``used``.

    Marks the texts as used. After ``UNIQUE_TRIES`` misses (a task's text space nearly exhausted) the last
    candidate is taken anyway.
    """
    for _ in range(UNIQUE_TRIES):
        base = SAMPLE_MAKERS[task](rng)
        keys = {member.text_key() for member in _paraphrases(base, size)}
        if not keys & used:
            break
    used.update(keys)
    return base


def _duplicate_group(rng: np.random.Generator, task: str, size: int, group: int, used: set[str]) -> list[PlannedRow]:
    base = _unique_sample(rng, task, used, size)
    members = []
    for member, sample in enumerate(_paraphrases(base, size)):
        perturbation = None if member == 0 else _perturbation(rng)
        members.append(PlannedRow(replace(sample, perturbation=perturbation), dup_group=group))
    return members


def _make_noisy(rng: np.random.Generator, sample: Sample, answers_by_task: dict[str, list[str]]) -> Sample:
    donor_tasks = [task for task in TASKS if task != sample.task and answers_by_task.get(task)]
    turns = []
    for turn in sample.turns:
        answer = turn.answer
        while answer == turn.answer:
            answer = _pick(rng, answers_by_task[_pick(rng, donor_tasks)])
        turns.append(replace(turn, answer=answer))
    return replace(sample, turns=tuple(turns))


def _fallback_answers(rng: np.random.Generator) -> dict[str, list[str]]:
    return {task: [turn.answer for turn in SAMPLE_MAKERS[task](rng).turns] for task in TASKS}


def plan_rows(config: SynthConfig) -> list[PlannedRow]:
    """All rows in pool order, with their injections decided. Deterministic in ``config``.

    Outside near-duplicate groups no two good rows share (task, conversation text) while the task's text space
    allows it (see :func:`_unique_sample`); group members share everything but the question template and the
    image perturbation.
    """
    rng = np.random.default_rng(config.seed)
    kinds = BAD_KINDS + (JSONL_ONLY_BAD_KINDS if config.format == "jsonl" else ())
    num_bad = _bad_row_count(config, kinds)
    num_good = config.num_samples - num_bad

    used: set[str] = set()
    low, high = config.duplicate_group_size
    sizes = group_sizes(rng, int(round(config.duplicate_rate * num_good)), low, high, draw="clip")
    rows: list[PlannedRow] = []
    for group, size in enumerate(sizes):
        rows.extend(_duplicate_group(rng, IMAGE_TASKS[group % len(IMAGE_TASKS)], size, group, used))

    singles = [PlannedRow(_unique_sample(rng, TASKS[i % len(TASKS)], used)) for i in range(num_good - len(rows))]
    answers_by_task: dict[str, list[str]] = {}
    for row in rows + singles:
        answers_by_task.setdefault(row.sample.task, []).extend(t.answer for t in row.sample.turns)
    for task, answers in _fallback_answers(rng).items():
        answers_by_task.setdefault(task, answers)
    num_noisy = min(len(singles), int(round(config.noise_rate * num_good)))
    for i in rng.permutation(len(singles))[:num_noisy]:
        row = singles[int(i)]
        row.sample, row.noisy = _make_noisy(rng, row.sample, answers_by_task), True
    rows.extend(singles)

    for i in range(num_bad):
        kind = kinds[i % len(kinds)]
        variant = i // len(kinds)
        needs_image = kind in _IMAGE_BAD_KINDS or (kind == Reason.WRONG_TYPE and _wrong_type_variant(
            variant, config.format) == "image_is_number")
        task_pool = IMAGE_TASKS if needs_image else TASKS
        rows.append(PlannedRow(SAMPLE_MAKERS[_pick(rng, task_pool)](rng), bad_kind=kind, bad_variant=variant))

    return in_pool_order(rng, rows)


# --------------------------------------------------------------------------- bad rows


def _wrong_type_variant(variant: int, pool_format: str) -> str:
    options = ["conversations_is_string", "turn_value_is_int", "image_is_number"]
    if pool_format == "parquet":
        options.remove("image_is_number")  # the parquet image column is a string column
    return options[variant % len(options)]


def _too_long_conversations(sample: Sample, variant: int) -> list[dict]:
    messages = sample.conversations()
    if variant % 2 == 0:
        for i in range(TOO_LONG_PAIRS - len(sample.turns)):
            messages.append({"from": "human", "value": f"Say the number {i}."})
            messages.append({"from": "gpt", "value": str(i)})
    else:
        messages[-1] = {"from": "gpt", "value": " ".join(["long"] * (TOO_LONG_CHARS // 5 + 1))}
    return messages


def _corrupt_image_bytes(sample: Sample, variant: int, size: int) -> bytes:
    if variant % 2 == 0:
        return b"this is not an image\x00\xff" * 8
    buffer = io.BytesIO()
    sample.render(size).save(buffer, format="PNG")
    png = buffer.getvalue()
    return png[: len(png) // 2]


def _break_record(record: dict, row: PlannedRow, out_dir: Path, config: SynthConfig) -> dict:
    """Return ``record`` broken as ``row.bad_kind`` says; writes the corrupt image file if needed."""
    kind, variant, sample = row.bad_kind, row.bad_variant, row.sample
    if kind == Reason.IMAGE_CORRUPT:
        (out_dir / record["image"]).write_bytes(_corrupt_image_bytes(sample, variant, config.image_size))
    elif kind == Reason.IMAGE_PATH_ESCAPE:
        record["image"] = _ESCAPE_PATHS[variant % len(_ESCAPE_PATHS)]
    elif kind == Reason.NO_ASSISTANT_TURN:
        record["conversations"] = [m for m in record["conversations"] if m["from"] == "human"]
    elif kind == Reason.EMPTY_TEXT:
        record["conversations"][-1]["value"] = "" if variant % 2 == 0 else "   \n "
    elif kind == Reason.WRONG_TYPE:
        how = _wrong_type_variant(variant, config.format)
        if how == "conversations_is_string":
            record["conversations"] = " ".join(m["value"] for m in record["conversations"])
        elif how == "turn_value_is_int":
            record["conversations"][-1]["value"] = 42
        else:
            record["image"] = len(record["image"])  # a list of paths is a valid multi-image row
    elif kind == Reason.TOO_LONG:
        record["conversations"] = _too_long_conversations(sample, variant)
    elif kind == Reason.MISSING_FIELD:
        del record["conversations"]
    # IMAGE_MISSING: the path stays and the file is never written. INVALID_JSON: see _jsonl_line.
    return record


# --------------------------------------------------------------------------- writing


def _sample_id(index: int) -> str:
    return f"sample-{index:06d}"


def _record(index: int, row: PlannedRow, include_task: bool) -> dict:
    record: dict = {"id": _sample_id(index)}
    if row.sample.picture is not None:
        record["image"] = f"{FOLDER_OF_TASK[row.sample.task]}/{index:06d}.png"
    record["conversations"] = row.sample.conversations()
    if include_task:
        record["task"] = row.sample.task
    return record


def _jsonl_line(record: dict, row: PlannedRow) -> str:
    text = json.dumps(record)
    if row.bad_kind == Reason.INVALID_JSON:
        text = text[: max(1, len(text) // 2)]  # cut mid-record: never valid JSON
    return text


def _ground_truth(index: int, row: PlannedRow) -> dict:
    return {"index": index, "id": _sample_id(index), "task": row.sample.task, "dup_group": row.dup_group,
            "noisy": row.noisy, "bad_kind": row.bad_kind}


def _write_parquet(path: Path, records: list[dict], include_task: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "id": [r.get("id") for r in records],
        "image": [r.get("image") for r in records],
        "conversations": [json.dumps(r["conversations"]) if "conversations" in r else None for r in records],
    }
    if include_task:
        columns["task"] = [r.get("task") for r in records]
    table = pa.table({name: pa.array(values, type=pa.string()) for name, values in columns.items()})
    pq.write_table(table, path)


def _write_pool(path: Path, records: list[dict], rows: list[PlannedRow], config: SynthConfig) -> None:
    if config.format == "json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif config.format == "jsonl":
        lines = [_jsonl_line(record, row) for record, row in zip(records, rows)]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        _write_parquet(path, records, config.include_task_field)


def _remove_stale_outputs(out_dir: Path) -> None:
    """Remove pool files of every format, so a directory ingest of ``out_dir`` sees only this pool."""
    for name in (*POOL_FILE.values(), GROUND_TRUTH_FILE):
        (out_dir / name).unlink(missing_ok=True)


def generate_pool(out_dir: str | Path, config: SynthConfig) -> PoolInfo:
    """Write the pool, its images and ``ground_truth.jsonl`` under ``out_dir``; identical bytes per seed.

    Re-running into the same ``out_dir`` overwrites the images it names and removes earlier ``pool.*``
    files; other files already there are left alone.
    """
    config.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in TASK_FOLDERS:
        (out_dir / folder).mkdir(exist_ok=True)

    _remove_stale_outputs(out_dir)

    rows = plan_rows(config)
    records, truths = [], []
    for index, row in enumerate(rows):
        record = _record(index, row, config.include_task_field)
        if row.sample.picture is not None and row.bad_kind not in _IMAGE_BAD_KINDS:
            row.sample.render(config.image_size).save(out_dir / record["image"], format="PNG")
        if row.bad_kind == Reason.IMAGE_MISSING:
            (out_dir / record["image"]).unlink(missing_ok=True)  # left by an earlier run into out_dir
        elif row.bad_kind is not None:
            record = _break_record(record, row, out_dir, config)
        records.append(record)
        truths.append(_ground_truth(index, row))

    pool_path = out_dir / POOL_FILE[config.format]
    _write_pool(pool_path, records, rows, config)
    ground_truth_path = out_dir / GROUND_TRUTH_FILE
    ground_truth_path.write_text("".join(json.dumps(t) + "\n" for t in truths), encoding="utf-8")
    num_bad = sum(row.bad_kind is not None for row in rows)
    return PoolInfo(pool_path, out_dir, ground_truth_path, len(rows), num_bad)


def load_ground_truth(path: str | Path) -> list[dict]:
    """Ground-truth rows of a generated pool, in pool order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_pool(pool_path: str | Path) -> list[dict | str]:
    """Records of a generated pool in pool order, for tests and demos (not the ingest reader).

    A jsonl line that is not valid JSON comes back as its raw text; parquet ``conversations`` are decoded
    from JSON and null columns are dropped from the record.
    """
    pool_path = Path(pool_path)
    if pool_path.suffix == ".json":
        return json.loads(pool_path.read_text(encoding="utf-8"))
    if pool_path.suffix == ".jsonl":
        out: list[dict | str] = []
        for line in pool_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(line)
        return out
    import pyarrow.parquet as pq

    records: list[dict | str] = []
    for row in pq.read_table(pool_path).to_pylist():
        record = {key: value for key, value in row.items() if value is not None}
        if "conversations" in record:
            record["conversations"] = json.loads(record["conversations"])
        records.append(record)
    return records
