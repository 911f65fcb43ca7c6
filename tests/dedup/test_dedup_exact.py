"""Exact pass: text normalisation, digests and first-row-kept groups."""

from __future__ import annotations

import numpy as np
import pytest

from datasel_ray.dedup.exact import exact_groups, normalise_text, row_digest


def _turns(question: str, answer: str = "Red.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_normalised_text_ignores_case_whitespace_and_image_placement():
    a = normalise_text(_turns("<image>\nWhat colour is  the circle?"))
    b = normalise_text(_turns("what COLOUR is the circle?\n<image>"))
    assert a == b == "human:what colour is the circle?\x1egpt:red."
    assert normalise_text(_turns("What colour is the square?")) != a
    assert normalise_text(_turns("What colour is the circle?", "Blue.")) != a
    # the role is part of the text: the same words spoken by the other side differ
    assert normalise_text([{"from": "gpt", "value": "x"}]) != normalise_text([{"from": "human", "value": "x"}])


def test_digest_depends_on_image_bytes_and_text():
    text = normalise_text(_turns("q"))
    base = row_digest([b"\x89PNG-1"], text)
    assert len(base) == 16
    assert row_digest([b"\x89PNG-1"], text) == base
    assert row_digest([b"\x89PNG-2"], text) != base
    assert row_digest([], text) != base
    assert row_digest([b""], text) != row_digest([], text)  # an empty file is not a text-only row
    assert row_digest([b"\x89PNG-1"], normalise_text(_turns("q2"))) != base
    # several images: their order counts, and no split of the bytes between images collides
    two = row_digest([b"\x89PNG-1", b"\x89PNG-2"], text)
    assert two != row_digest([b"\x89PNG-2", b"\x89PNG-1"], text) and two != base
    assert row_digest([b"ab", b"c"], text) != row_digest([b"a", b"bc"], text)


def test_exact_groups_keep_the_lowest_row_id():
    digests = np.array([b"a" * 16, b"b" * 16, b"a" * 16, b"c" * 16, b"a" * 16, b"b" * 16], dtype="S16")
    ids = np.array([50, 10, 7, 3, 90, 11], dtype=np.int64)
    dropped, rep = exact_groups(digests, ids)
    np.testing.assert_array_equal(dropped, [True, False, False, False, True, True])
    np.testing.assert_array_equal(rep, [7, 10, 7, 3, 7, 10])


def test_exact_groups_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="same length"):
        exact_groups(np.array([b"a" * 16], dtype="S16"), np.array([1, 2]))
