"""The report's partner analysis on a hand-made CHAIR result."""

from __future__ import annotations

import pytest

from mmalign.lab.report import partner_share


def test_partner_share_and_its_chance_baseline() -> None:
    """Image a holds {star, circle}: star's partner moon is missing; absent shapes = 6 of 8, so chance = 1/6.

    Image b holds {moon, star}: no partner is missing, chance 0. Hallucinations: a → moon (partner), heart (not);
    b → cross (not). Share = 1/3; chance = (1/6 + 1/6 + 0) / 3 = 1/9.
    """
    shapes = ["circle", "square", "triangle", "star", "heart", "cross", "diamond", "moon"]
    partner = {"star": "moon", "moon": "star", "heart": "cross", "cross": "heart"}
    truth = {"a": {"star", "circle"}, "b": {"moon", "star"}}
    chair = {
        "per_caption": [
            {"image_id": "a", "hallucinated": ["moon", "heart"]},
            {"image_id": "b", "hallucinated": ["cross"]},
        ]
    }
    got = partner_share(chair, truth, partner, shapes)
    assert got["hallucinated"] == 3 and got["planted_partner"] == 1
    assert got["share"] == pytest.approx(1 / 3)
    assert got["chance_share"] == pytest.approx(1 / 9)
