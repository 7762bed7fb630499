"""The Shapes refiner reads the world's captions and modification texts and writes captions back."""
from __future__ import annotations

import json

from mir.refiner import ShapesRefiner, apply_clause, parse_caption, split_clauses


def test_refiner_applies_feedback_clauses():
    r = ShapesRefiner()
    s = r.start("an image with three shapes including a red disc")
    assert s.n_objects == 3 and s.objects[0].shape == "circle" and s.objects[0].colour == "red"
    s, missed = r.refine(s, "make the circle blue and add a small green star in the top left corner")
    assert missed == 0
    assert s.text() == "an image with three shapes including a small green star in the top left and a blue circle"
    s, _ = r.refine(s, "move the blue circle to the centre of the bottom row; turn the circle into a square")
    assert "a blue square in the bottom middle" in s.text()
    s, _ = r.refine(s, "remove the star")
    assert "star" not in s.text()
    s, missed = r.refine(s, "it looks nice")
    assert missed == 1 and s.text().endswith(", it looks nice")  # kept verbatim, never dropped
    assert parse_caption(s.text()).objects[0].shape == "square"  # its own output reads back


def test_refiner_parses_the_worlds_modification_texts(shapes_world):
    texts = [c["caption"] for c in json.loads((shapes_world / "cirr" / "captions" / "cap.rc2.train.json").read_text())]
    clauses = [c for t in texts for c in split_clauses(t)]
    start = parse_caption("a red circle among other shapes")
    parsed = sum(apply_clause(parse_caption(start.text()), c) for c in clauses)
    assert parsed / len(clauses) > 0.97
