"""Conversation roles and the image placeholder: the one definition used by ingest, the scorer, the task rules,
the synthetic pools and the chat template.

Pools name the two speakers in several ways (LLaVA ``human`` / ``gpt``, chat ``user`` / ``assistant``); inside the
project a turn is ``{"from": "human" | "gpt" | "system", "value": text}`` (LLaVA form, :func:`canonical_role`) and
the chat template speaks ``user`` / ``assistant`` / ``system`` (:func:`chat_role`). An image stands in the text as
:data:`IMAGE_PLACEHOLDER`, one per image, in the order of the sample's image list.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"

HUMAN = "human"
ASSISTANT = "gpt"
SYSTEM = "system"

HUMAN_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant"})
SYSTEM_ROLES = frozenset({"system"})
KNOWN_ROLES = HUMAN_ROLES | ASSISTANT_ROLES | SYSTEM_ROLES

_CHAT = {HUMAN: "user", ASSISTANT: "assistant", SYSTEM: "system"}


def canonical_role(role: str) -> str | None:
    """``human`` / ``gpt`` / ``system`` for any spelling of a known role (case-insensitive), else None."""
    role = str(role).lower()
    if role in ASSISTANT_ROLES:
        return ASSISTANT
    if role in HUMAN_ROLES:
        return HUMAN
    if role in SYSTEM_ROLES:
        return SYSTEM
    return None


def chat_role(role: str) -> str | None:
    """The chat-template role (``user`` / ``assistant`` / ``system``) of any known spelling, else None."""
    canonical = canonical_role(role)
    return None if canonical is None else _CHAT[canonical]


def count_placeholders(turns: list[dict]) -> int:
    """Number of :data:`IMAGE_PLACEHOLDER` in the ``value`` of every turn."""
    return sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in turns)


def normalize_placeholders(conversations: list[dict], n_images: int) -> list[dict]:
    """Turns (``{"from", "value"}``, canonical roles) with exactly ``n_images`` placeholders.

    - no image: every placeholder is removed (a text-only sample carries no image tokens);
    - the row already writes ``n_images`` placeholders: kept where they stand (their order is the image order);
      for one image, only when it stands in the first human turn (LLaVA's rule, kept as it was);
    - otherwise (none written, or, for a single image, more than one): every placeholder is removed and
      ``n_images`` of them, one per line, are put at the front of the first human turn (LLaVA's convention).

    A multi-image row whose placeholder count differs from its image count is refused at ingest before this
    (``placeholder_mismatch``), so the last case only ever adds what was missing.
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    first_human = next((i for i, t in enumerate(conversations) if t["from"] == HUMAN), 0)
    if n_images and count_placeholders(conversations) == n_images and (
            n_images > 1 or IMAGE_PLACEHOLDER in conversations[first_human]["value"]):
        return [dict(t) for t in conversations]
    out = [{**t, "value": t["value"].replace(IMAGE_PLACEHOLDER, "").strip() if IMAGE_PLACEHOLDER in t["value"]
            else t["value"]} for t in conversations]
    if n_images:
        out[first_human]["value"] = f"{IMAGE_PLACEHOLDER}\n" * n_images + out[first_human]["value"]
    return out
