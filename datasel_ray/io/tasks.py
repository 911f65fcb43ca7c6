"""Task labels: an explicit field, else image-path prefix rules, else a default.

Built-in rules cover the sources of LLaVA-665k (``coco/``, ``gqa/``, ``ocr_vqa/``, ``textvqa/``, ``vg/``; a
sample without an image is ``sharegpt``). A user map (dict or YAML file of ``prefix: task``) is tried first;
the longest matching prefix wins.
"""

from __future__ import annotations

from pathlib import Path

import yaml

LLAVA_665K_PREFIXES = {
    "coco/": "coco",
    "gqa/": "gqa",
    "ocr_vqa/": "ocr_vqa",
    "textvqa/": "textvqa",
    "vg/": "vg",
}
TEXT_ONLY_TASK = "sharegpt"
TEXT_ONLY_KEY = "<text-only>"


class TaskResolver:
    """Maps a record to its task name. ``resolve`` returns None when nothing matches and no default is set."""

    def __init__(self, task_map: dict[str, str] | str | None = None, default_task: str | None = "other",
                 task_field: str = "task"):
        user = load_task_map(task_map)
        self.text_only_task = user.pop(TEXT_ONLY_KEY, TEXT_ONLY_TASK)
        self.rules = sorted({**LLAVA_665K_PREFIXES, **user}.items(), key=lambda kv: -len(kv[0]))
        self.user_rules = sorted(user.items(), key=lambda kv: -len(kv[0]))
        self.default_task = default_task
        self.task_field = task_field

    def resolve(self, record: dict, image: str | None) -> str | None:
        explicit = record.get(self.task_field)
        if isinstance(explicit, str) and explicit.strip():
            return explicit.strip()
        if not image:
            return self.text_only_task
        normalized = image.lstrip("./")
        for rules in (self.user_rules, self.rules):
            for prefix, task in rules:
                if normalized.startswith(prefix):
                    return task
        return self.default_task


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
