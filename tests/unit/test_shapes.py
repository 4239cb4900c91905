"""The shapes a batch's numbers take for people: here, its split over a pool of keys."""

from __future__ import annotations

from jobs.shapes import attachment_split


def test_a_split_names_the_busiest_attachment_first() -> None:
    split = attachment_split({"INFERENCE": (145, 165_800), "INFERENCE_2": (455, 520_100)})
    assert split == "INFERENCE_2 455 calls, 520,100 tokens; INFERENCE 145 calls, 165,800 tokens"
    # Ties go by name, so the line is the same at every refresh.
    assert (
        attachment_split({"B": (1, 10), "A": (1, 20)})
        == "A 1 calls, 20 tokens; B 1 calls, 10 tokens"
    )


def test_one_attachment_or_none_has_no_split() -> None:
    assert attachment_split({}) is None
    assert attachment_split({"INFERENCE": (600, 685_900)}) is None
