"""Task labels: an explicit field, else a recipe (index ranges, image-path prefix, prompt rules), else a default.

Two recipes (``pool.task_recipe``):

* ``prefix`` (default): image-path prefix rules for the sources of LLaVA-665k (``coco/``, ``gqa/``,
  ``ocr_vqa/``, ``textvqa/``, ``vg/``; a sample without an image is ``sharegpt``). Every COCO-image source
  (LLaVA-Instruct, VQAv2, OKVQA, A-OKVQA, RefCOCO) lands in ``coco``.
* ``llava_665k``: the 12 sources of LLaVA-1.5's instruction mix. On ``llava_v1_5_mix665k.json`` itself
  (recognised by :func:`llava_665k_mismatch`: one JSON file of 665,298 rows whose first id and whose block
  boundary rows are those of the release) a row's task is its index block, as in DataTailor's reference
  (``datatailor_selector.py``: ``mix_st``/``mix_ed``), :data:`LLAVA_665K_BLOCKS`. On any other pool built from
  the same sources, :func:`llava_source_task` separates them by image prefix plus LLaVA-1.5's fixed
  response-format prompts (paper, Table 7). What it cannot separate it merges: ``llava_instruct``
  (conversation, detail description and complex reasoning: COCO images, free-form prompts) and ``vqav2_okvqa``
  (VQAv2 and OKVQA: COCO images, both "Answer the question using a single word or phrase.").

A user map (dict or YAML file of ``prefix: task``) is tried before either recipe's rules; the longest matching
prefix wins. The key ``<text-only>`` names the task of rows without an image.
"""

from __future__ import annotations

from bisect import bisect_right
from pathlib import Path

import yaml

from datasel_ray.roles import HUMAN_ROLES
from datasel_ray.schema import TaskFrom

TASK_RECIPES = ("prefix", "llava_665k")

LLAVA_665K_PREFIXES = {
    "coco/": "coco",
    "gqa/": "gqa",
    "ocr_vqa/": "ocr_vqa",
    "textvqa/": "textvqa",
    "vg/": "vg",
}
TEXT_ONLY_TASK = "sharegpt"
TEXT_ONLY_KEY = "<text-only>"

LLAVA_665K_ROWS = 665_298
LLAVA_665K_FIRST_ID = "000000033471"
# (first row, task, image source) of each contiguous source block of llava_v1_5_mix665k.json, in file order;
# the starts are DataTailor's ``mix_st``; the names follow from the block sizes (METHODS.md, DataTailor).
LLAVA_665K_BLOCKS: tuple[tuple[int, str, str | None], ...] = (
    (0, "llava_conversation", "coco/"),
    (57_669, "llava_detail", "coco/"),
    (80_909, "llava_complex_reasoning", "coco/"),
    (157_712, "vqav2", "coco/"),
    (240_495, "okvqa", "coco/"),
    (249_493, "aokvqa", "coco/"),
    (315_653, "refcoco", "coco/"),
    (364_100, "vg", "vg/"),
    (450_517, "gqa", "gqa/"),
    (522_657, "ocr_vqa", "ocr_vqa/"),
    (602_657, "textcaps", "textvqa/"),
    (624_610, "sharegpt", None),
)
_BLOCK_STARTS = [b[0] for b in LLAVA_665K_BLOCKS]

# LLaVA-1.5 response-format prompts (paper, Table 7) and the region prompts of its RefCOCO / VG data.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
OPTION_LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
REGION_PROMPTS = ("Please provide a short description for this region",
                  "Please provide the bounding box coordinate of the region this sentence describes")
_IMAGE_SOURCES = ("coco/", "gqa/", "ocr_vqa/", "textvqa/", "vg/")
# Task names llava_source_task can return for an image row; text-only rows are TEXT_ONLY_TASK.
LLAVA_SOURCE_TASKS = ("llava_instruct", "vqav2_okvqa", "aokvqa", "refcoco", "vg", "gqa", "ocr_vqa", "textcaps",
                      "textvqa")


def strip_dot_prefix(path: str) -> str:
    """``path`` without leading ``./`` segments (``././coco/x`` → ``coco/x``); ``../x`` and ``.x`` unchanged."""
    while path.startswith("./"):
        path = path[2:]
    return path


def llava_665k_block_task(record_index: int) -> str:
    """The task of row ``record_index`` (0-based) of ``llava_v1_5_mix665k.json`` by its source block."""
    if not 0 <= record_index < LLAVA_665K_ROWS:
        raise ValueError(f"record_index must be in [0, {LLAVA_665K_ROWS}) for llava_v1_5_mix665k.json, "
                         f"got {record_index}")
    return LLAVA_665K_BLOCKS[bisect_right(_BLOCK_STARTS, record_index) - 1][1]


def _first_human_text(conversations) -> str:
    if not isinstance(conversations, list):
        return ""
    for turn in conversations:
        if isinstance(turn, dict) and str(turn.get("from", "")).lower() in HUMAN_ROLES:
            value = turn.get("value")
            return value if isinstance(value, str) else ""
    return ""


def llava_source_task(image: str | None, conversations) -> str | None:
    """The LLaVA-665k source of one row from its image path and its first human turn, or None for an image
    outside the five source folders.

    ``conversations``: the record's ``[{"from", "value"}, ...]`` list. No image → ``sharegpt``; ``vg/``,
    ``gqa/``, ``ocr_vqa/`` by folder; ``textvqa/`` with the one-sentence caption prompt → ``textcaps``, else
    ``textvqa``; ``coco/`` by prompt: a region prompt → ``refcoco``, the option-letter prompt → ``aokvqa``,
    the short-answer prompt → ``vqav2_okvqa``, none → ``llava_instruct``.
    """
    if not image:
        return TEXT_ONLY_TASK
    path = strip_dot_prefix(image)
    source = next((p for p in _IMAGE_SOURCES if path.startswith(p)), None)
    if source is None:
        return None
    text = _first_human_text(conversations)
    if source == "textvqa/":
        return "textcaps" if CAPTION_PROMPT in text else "textvqa"
    if source != "coco/":
        return source.rstrip("/")
    if any(p in text for p in REGION_PROMPTS):
        return "refcoco"
    if OPTION_LETTER_PROMPT in text:
        return "aokvqa"
    if SHORT_ANSWER_PROMPT in text:
        return "vqav2_okvqa"
    return "llava_instruct"


class TaskResolver:
    """Maps a record to its task name. ``resolve`` returns None when nothing matches and no default is set.

    Order: the record's task field, the pool's source label (when the caller gives one), the user map (prefix rules; ``<text-only>`` for rows without an image), the
    LLaVA-665k index blocks when enabled, the recipe's rules, ``default_task``.

    ``recipe``: one of :data:`TASK_RECIPES`. ``index_blocks``: with ``recipe="llava_665k"``, resolve by
    :func:`llava_665k_block_task` (only for ``llava_v1_5_mix665k.json`` itself, see :func:`llava_665k_mismatch`).
    """

    def __init__(self, task_map: dict[str, str] | str | None = None, default_task: str | None = "other",
                 task_field: str = "task", recipe: str = "prefix", index_blocks: bool = False):
        if recipe not in TASK_RECIPES:
            raise ValueError(f"Unknown pool.task_recipe '{recipe}'. Choose from: {', '.join(TASK_RECIPES)}")
        if index_blocks and recipe != "llava_665k":
            raise ValueError(f"index_blocks needs pool.task_recipe='llava_665k', got {recipe!r}")
        user = load_task_map(task_map)
        self.user_text_only = TEXT_ONLY_KEY in user
        self.text_only_task = user.pop(TEXT_ONLY_KEY, TEXT_ONLY_TASK)
        self.rules = sorted({**LLAVA_665K_PREFIXES, **user}.items(), key=lambda kv: -len(kv[0]))
        self.user_rules = sorted(user.items(), key=lambda kv: -len(kv[0]))
        self.default_task = default_task
        self.task_field = task_field
        self.recipe = recipe
        self.index_blocks = index_blocks

    @classmethod
    def for_pool(cls, pool, index_blocks: bool = False) -> "TaskResolver":
        """The resolver a :class:`datasel_ray.config.PoolConfig` describes."""
        return cls(pool.task_map, pool.default_task, pool.task_field, pool.task_recipe, index_blocks)

    def resolve(self, record: dict, image: str | None, record_index: int | None = None) -> str | None:
        """``record``: the parsed pool record; ``image``: its image path (None when text-only);
        ``record_index``: its position in the pool file (used by the LLaVA-665k index blocks only)."""
        return self.resolve_how(record, image, record_index)[0]

    def resolve_how(self, record: dict, image: str | None, record_index: int | None = None,
                    has_image: bool | None = None, source_label: str | None = None) -> tuple[str | None, str]:
        """The task and how it was decided (a :class:`~datasel_ray.schema.TaskFrom` value).

        ``image``: the first image's path as written ("" or None when it has none); ``has_image``: whether the
        sample has an image at all (default: ``bool(image)``; an image embedded as bytes without a path has one
        but no path for the prefix rules: it gets the index block or ``default_task``); ``source_label``: the
        pool's own source label of the row (:func:`datasel_ray.io.shapes.source_label`), the task when present
        after the task field and before every rule.
        """
        has_image = bool(image) if has_image is None else has_image
        explicit = record.get(self.task_field)
        if isinstance(explicit, str) and explicit.strip():
            return explicit.strip(), TaskFrom.FIELD
        if source_label:
            return source_label, TaskFrom.SOURCE_LABEL
        normalized = strip_dot_prefix(image) if image else ""
        if normalized:
            for prefix, task in self.user_rules:
                if normalized.startswith(prefix):
                    return task, TaskFrom.MAP
        elif not has_image and self.user_text_only:
            return self.text_only_task, TaskFrom.MAP
        if self.index_blocks and record_index is not None:
            return llava_665k_block_task(record_index), TaskFrom.INDEX_BLOCK
        if not has_image:
            return self.text_only_task, TaskFrom.RULE
        if not normalized:
            return self.default_task, TaskFrom.DEFAULT
        if self.recipe == "llava_665k":
            task = llava_source_task(normalized, record.get("conversations"))
            return (self.default_task, TaskFrom.DEFAULT) if task is None else (task, TaskFrom.RULE)
        for prefix, task in self.rules:
            if normalized.startswith(prefix):
                return task, TaskFrom.MAP if any(prefix == p for p, _ in self.user_rules) else TaskFrom.RULE
        return self.default_task, TaskFrom.DEFAULT


def llava_665k_mismatch(files: list, blocks: list) -> str | None:
    """None when the pool is ``llava_v1_5_mix665k.json``, else why not (one line).

    ``files``: the :class:`~datasel_ray.io.pool.PoolFile` list; ``blocks``: its planned
    :class:`~datasel_ray.io.pool.BlockSpec` list. The pool must be one JSON file of 665,298 records, record 0
    must carry id ``000000033471``, and the first and last record of each source block must carry an ``id``
    and an image in that block's folder (none for ShareGPT). Reads only the read blocks holding those 24 rows.
    """
    from datasel_ray.io.pool import read_block

    if len(files) != 1 or files[0].format != "json":
        return f"the pool is {len(files)} file(s) ({', '.join(sorted({f.format for f in files}))}), not one JSON file"
    total = sum(b.num_records for b in blocks)
    if total != LLAVA_665K_ROWS:
        return f"the pool has {total:,} rows, not {LLAVA_665K_ROWS:,}"
    ends = [b[0] for b in LLAVA_665K_BLOCKS[1:]] + [LLAVA_665K_ROWS]
    wanted: dict[int, str | None] = {}
    for (start, _, source), end in zip(LLAVA_665K_BLOCKS, ends):
        wanted[start] = wanted[end - 1] = source
    found: dict[int, object] = {}
    for spec in blocks:
        inside = [i for i in wanted if spec.first_record <= i < spec.first_record + spec.num_records]
        if inside:
            found.update({r.record_index: r.value for r in read_block(spec) if r.record_index in inside})
    first = found.get(0)
    if not isinstance(first, dict) or str(first.get("id")) != LLAVA_665K_FIRST_ID:
        got = first.get("id") if isinstance(first, dict) else first
        return f"record 0 has id {got!r}, not {LLAVA_665K_FIRST_ID!r}"
    for index, source in sorted(wanted.items()):
        record = found.get(index)
        if not isinstance(record, dict) or record.get("id") in (None, ""):
            return f"record {index} has no id"
        image = record.get("image")
        path = strip_dot_prefix(image) if isinstance(image, str) else ""
        if (source is None and path) or (source is not None and not path.startswith(source)):
            return f"record {index} has image {image!r}, expected {'none' if source is None else source + '...'}"
    return None


def load_task_map(task_map: dict[str, str] | str | None) -> dict[str, str]:
    """A ``prefix -> task`` dict from a dict, a YAML file path, or None."""
    if task_map is None:
        return {}
    if isinstance(task_map, str):
        path = Path(task_map)
        if not path.is_file():
            raise ValueError(f"pool.task_map: file not found: {task_map}")
        loaded = yaml.safe_load(path.read_text()) or {}
    else:
        loaded = task_map
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()):
        raise ValueError("pool.task_map must map image-path prefixes (strings) to task names (strings)")
    return dict(loaded)
