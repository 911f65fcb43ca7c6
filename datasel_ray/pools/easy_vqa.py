"""A real-data pool: easy-VQA (package ``easy-vqa`` 1.0, MIT) in LLaVA format, with injected near-duplicates
and label noise, and its test split as the held-out evaluation set.

easy-VQA holds 64 x 64 RGB images of one shape (circle / rectangle / triangle) in one of 8 colours on a white
background, with template questions: open colour questions (``"what color is the circle?"`` -> ``"blue"``), open
shape questions (``"what shape is present?"`` -> ``"circle"``) and yes/no questions (``"is there not a red
shape?"`` -> ``"no"``); 4,000 train images with 38,575 questions, 1,000 test images with 9,673 questions.

Pool (:func:`generate_pool`): ``num_samples`` rows, one (image, question, answer) each, drawn without replacement
from the train split by one seeded ``numpy.random.Generator``; rows are shuffled into pool order.

- tasks (``TASK_FOLDERS``): ``color`` (open colour questions), ``shape`` (open shape questions), ``yes_no``;
  a row's image is written as ``<task>/<row index:06d>.png``, so the image-path prefix names the task (pass
  ``TASK_FOLDERS`` as the ingest ``task_map``);
- near-duplicate groups (``duplicate_rate`` of the rows, groups of ``duplicate_group_size`` members): one drawn
  row copied k times; member 0 keeps the original image and question, member j > 0 gets the image with
  Gaussian pixel noise (std ``noise_std`` grey levels, clipped to 0-255) and the question rewritten by the
  template j places after its own in its paraphrase family (:data:`PARAPHRASES`, 4 templates, cyclic: members
  0 and 4 share the question text); answers are identical;
- label noise (``noise_rate`` of the rows outside duplicate groups): the answer replaced by another answer of
  the same question type (another colour, another shape, yes <-> no), never the correct one.

Ground truth (``ground_truth.jsonl``, the format of :mod:`datasel_ray.synthetic` that
:mod:`datasel_ray.evaluation` reads): one line per pool row in pool order, ``{"index", "id", "task", "dup_group",
"noisy", "bad_kind", "image_id", "answer"}``; ``dup_group`` -1 outside groups, ``bad_kind`` always null (this
pool has no malformed rows), ``image_id`` the easy-VQA train image, ``answer`` the correct answer.

Held-out set (:func:`heldout_samples`, and ``heldout.jsonl`` + ``heldout/`` written next to the pool): questions
of the test split, whose images the pool never uses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasel_ray.pools.planning import check_group_size, group_sizes, in_pool_order
from datasel_ray.synthetic import GROUND_TRUTH_FILE, PoolInfo

COLOURS: tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
TASK_FOLDERS: dict[str, str] = {"color": "color", "shape": "shape", "yes_no": "yes_no"}
POOL_FILE = "pool.json"
HELDOUT_FILE = "heldout.jsonl"
HELDOUT_DIR = "heldout"

# Each family lists templates of the same question; ``{x}`` is the slot easy-VQA fills ("red shape", "circle",
# "red"). The first templates of every family are easy-VQA's own; the later ones are added paraphrases.
PARAPHRASES: tuple[tuple[str, ...], ...] = (
    ("what color is the shape?", "what is the color of the shape?", "what colour is the shape?",
     "which color is the shape?"),
    ("what color is the {x}?", "what is the color of the {x}?", "what colour is the {x}?", "which color is the {x}?"),
    ("what shape is in the image?", "what shape does the image contain?", "what shape is present?",
     "which shape is shown?"),
    ("what is the {x} shape?", "which shape is {x}?", "what kind of shape is the {x} one?", "name the {x} shape."),
    ("is there a {x}?", "is there a {x} in the image?", "does the image contain a {x}?", "is a {x} present?"),
    ("is there not a {x}?", "is there not a {x} in the image?", "does the image not contain a {x}?",
     "is no {x} present?"),
)


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{x}"), "(?P<x>.+?)") + "$")


_FAMILY_PATTERNS = [[(_template_regex(t), t) for t in family] for family in PARAPHRASES]


def paraphrase(question: str, step: int) -> str:
    """The question rewritten by the template ``step`` places after its own in its family (cyclic; step 0
    returns it unchanged). Raises ValueError for a question no family matches."""
    for f, family in enumerate(_FAMILY_PATTERNS):
        for t, (pattern, _) in enumerate(family):
            match = pattern.match(question)
            if match:
                target = PARAPHRASES[f][(t + step) % len(family)]
                return target.format(x=match.group("x")) if "{x}" in target else target
    raise ValueError(f"no paraphrase family matches the easy-VQA question {question!r}")


def question_task(answer: str) -> str:
    """``color`` / ``shape`` / ``yes_no`` from an easy-VQA answer."""
    if answer in COLOURS:
        return "color"
    if answer in SHAPES:
        return "shape"
    if answer in ("yes", "no"):
        return "yes_no"
    raise ValueError(f"unknown easy-VQA answer {answer!r}; expected a colour, a shape, yes or no")


def questions(split: str) -> list[tuple[str, str, int]]:
    """(question, answer, image id) of easy-VQA ``split`` (``train`` / ``test``), in the package's order."""
    import easy_vqa

    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    texts, answers, image_ids = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    return list(zip(texts, answers, (int(i) for i in image_ids)))


def image_paths(split: str) -> dict[int, str]:
    """easy-VQA ``split``: image id -> PNG path (64 x 64 RGB) inside the installed package."""
    import easy_vqa

    return easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()


def image_attributes(split: str) -> dict[int, tuple[str, str]]:
    """Image id -> (colour, shape), from each image's own answers to its open questions."""
    colour: dict[int, str] = {}
    shape: dict[int, str] = {}
    for _, answer, image in questions(split):
        if answer in COLOURS:
            colour[image] = answer
        elif answer in SHAPES:
            shape[image] = answer
    return {i: (colour[i], shape[i]) for i in sorted(colour) if i in shape}


def load_image(split: str, image_id: int, paths: dict[int, str] | None = None):
    """The easy-VQA image as a PIL RGB image."""
    from PIL import Image

    paths = image_paths(split) if paths is None else paths
    with Image.open(paths[image_id]) as im:
        return im.convert("RGB")


def conversation(question: str, answer: str) -> list[dict]:
    """LLaVA-form turns of one question: ``<image>\\n`` at the start of the human turn."""
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


@dataclass
class EasyVQAPoolConfig:
    """What to write. Rates are fractions of ``num_samples``; counts are rounded."""

    num_samples: int = 2000
    seed: int = 0
    duplicate_rate: float = 0.10
    duplicate_group_size: tuple[int, int] = (3, 6)
    noise_rate: float = 0.05
    noise_std: float = 4.0
    tasks: tuple[str, ...] = field(default_factory=lambda: tuple(TASK_FOLDERS))
    heldout_samples: int = 300

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        for name in ("duplicate_rate", "noise_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        check_group_size(self.duplicate_group_size)
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        unknown = [t for t in self.tasks if t not in TASK_FOLDERS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks: unknown {unknown or 'empty'}. Choose from: {', '.join(TASK_FOLDERS)}")
        if self.heldout_samples < 0:
            raise ValueError(f"heldout_samples must be >= 0, got {self.heldout_samples}")


@dataclass
class PlannedRow:
    question: str
    answer: str
    true_answer: str
    image_id: int
    task: str
    dup_group: int = -1
    member: int = 0
    noisy: bool = False


def _wrong_answer(rng: np.random.Generator, answer: str) -> str:
    options = {"color": COLOURS, "shape": SHAPES, "yes_no": ("yes", "no")}[question_task(answer)]
    return str(rng.choice([o for o in options if o != answer]))


def plan_rows(config: EasyVQAPoolConfig) -> list[PlannedRow]:
    """The pool's rows in pool order (no files written); see the module docstring."""
    config.validate()
    rng = np.random.default_rng(config.seed)
    items = [q for q in questions("train") if question_task(q[1]) in config.tasks]
    sizes = group_sizes(rng, int(round(config.duplicate_rate * config.num_samples)), *config.duplicate_group_size,
                        draw="fit")
    n_unique = config.num_samples - sum(sizes) + len(sizes)
    if n_unique > len(items):
        raise ValueError(f"num_samples {config.num_samples} needs {n_unique} distinct train questions, "
                         f"easy-VQA has {len(items)} for tasks {config.tasks}")
    picks = rng.choice(len(items), size=n_unique, replace=False)
    rows: list[PlannedRow] = []
    for k, pick in enumerate(picks[: len(sizes)]):
        question, answer, image_id = items[int(pick)]
        for j in range(sizes[k]):
            rows.append(PlannedRow(paraphrase(question, j), answer, answer, image_id, question_task(answer),
                                   dup_group=k, member=j))
    singles = [PlannedRow(q, a, a, i, question_task(a))
               for q, a, i in (items[int(p)] for p in picks[len(sizes):])]
    n_noisy = min(len(singles), int(round(config.noise_rate * config.num_samples)))
    for index in rng.choice(len(singles), size=n_noisy, replace=False):
        row = singles[int(index)]
        row.answer = _wrong_answer(rng, row.true_answer)
        row.noisy = True
    rows.extend(singles)
    return in_pool_order(rng, rows)


def _noisy_image(image, rng: np.random.Generator, std: float):
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float32)
    noisy = np.clip(np.rint(pixels + rng.normal(0.0, std, size=pixels.shape)), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, mode="RGB")


def _sample_id(index: int) -> str:
    return f"easyvqa-{index:06d}"


def heldout_samples(num_samples: int, seed: int = 0) -> list[dict]:
    """``num_samples`` test-split questions (seeded, without replacement) as in-memory samples
    ``{"conversations", "image": PIL RGB, "task", "image_id"}``."""
    items = questions("test")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(items), size=min(num_samples, len(items)), replace=False)
    paths = image_paths("test")
    out = []
    for pick in picks:
        question, answer, image_id = items[int(pick)]
        out.append({"conversations": conversation(question, answer), "image": load_image("test", image_id, paths),
                    "task": question_task(answer), "image_id": image_id})
    return out


def generate_pool(out_dir: str | Path, config: EasyVQAPoolConfig) -> PoolInfo:
    """Write ``pool.json`` (LLaVA format), its images, ``ground_truth.jsonl`` and the held-out set under
    ``out_dir`` (the image root); identical bytes per seed. Returns the synthetic pool's :class:`PoolInfo`."""
    rows = plan_rows(config)
    out_dir = Path(out_dir)
    for folder in (*TASK_FOLDERS.values(), HELDOUT_DIR):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    noise_rng = np.random.default_rng([config.seed, 1])
    paths = image_paths("train")
    records, truths = [], []
    for index, row in enumerate(rows):
        image = load_image("train", row.image_id, paths)
        if row.member > 0:
            image = _noisy_image(image, noise_rng, config.noise_std)
        rel = f"{TASK_FOLDERS[row.task]}/{index:06d}.png"
        image.save(out_dir / rel, format="PNG")
        records.append({"id": _sample_id(index), "image": rel, "conversations": conversation(row.question, row.answer)})
        truths.append({"index": index, "id": _sample_id(index), "task": row.task, "dup_group": row.dup_group,
                       "noisy": row.noisy, "bad_kind": None, "image_id": row.image_id, "answer": row.true_answer})
    pool_path = out_dir / POOL_FILE
    pool_path.write_text(json.dumps(records), encoding="utf-8")
    ground_truth_path = out_dir / GROUND_TRUTH_FILE
    ground_truth_path.write_text("".join(json.dumps(t) + "\n" for t in truths), encoding="utf-8")
    lines = []
    for k, sample in enumerate(heldout_samples(config.heldout_samples, seed=config.seed)):
        rel = f"{HELDOUT_DIR}/{k:06d}.png"
        sample["image"].save(out_dir / rel, format="PNG")
        lines.append(json.dumps({"id": f"heldout-{k:06d}", "image": rel, "conversations": sample["conversations"],
                                 "task": sample["task"]}))
    (out_dir / HELDOUT_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return PoolInfo(pool_path, out_dir, ground_truth_path, len(rows), 0)
