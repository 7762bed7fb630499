"""The Shapes M2KR task's files, and the M2KR loader on fixtures written in the real layouts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import InputError
from core.io import read_jsonl
from core.shapes.make import load_scenes
from core.shapes.tasks import m2kr
from retriever.ret.data import load_m2kr, load_passages, load_queries, shapes_paths


def test_shapes_task_is_multimodal(shapes_world):
    scenes = {r.imgid: r for r in load_scenes(shapes_world)}
    for split in ("train", "test"):
        queries_path, passages_path = shapes_paths(shapes_world, split)
        data = load_m2kr(queries_path, passages_path, shapes_world)  # checks images and positive ids
        assert data.queries and len(data.passages) > len(data.queries)
        rows = read_jsonl(queries_path)
        passages = {p["passage_id"]: p for p in read_jsonl(passages_path)}
        for row in rows:
            pos = passages[row["pos_item_ids"][0]]
            # the same scene, but the query shows its own rendering of it
            assert pos["img_id"] == row["img_id"] and pos["img_path"] != row["img_path"]
            assert scenes[int(row["img_id"])].split == split
            # neither modality alone identifies the document
            same_image = [p for p in passages.values() if p["img_path"] == pos["img_path"]]
            assert len(same_image) == row["n_image_matches"] >= 2
            assert row["n_text_matches"] >= 2
            # the answer is in the positive passage only
            assert row["gold_answer"] in pos["passage_content"]
            assert row["gold_answer"] not in row["question"]


def test_shapes_task_is_deterministic(shapes_world, tmp_path):
    from core.shapes.make import task_rng

    scenes = load_scenes(shapes_world)
    out = tmp_path / "again"
    out.mkdir()
    (out / "world_config.json").write_text((shapes_world / "world_config.json").read_text())
    m2kr.write(scenes, out, task_rng(0, f"task:{m2kr.NAME}"))
    for split in ("train", "val", "test"):
        for name in (m2kr.queries_file(split), m2kr.passages_file(split)):
            assert (out / name).read_bytes() == (shapes_world / name).read_bytes()
    assert (out / "m2kr/images/test_00000.png").read_bytes() == (shapes_world / "m2kr/images/test_00000.png").read_bytes()


def _m2kr_fixture(root: Path) -> tuple[Path, Path]:
    """Rows in the exact M2KR (PreFLMR) layout, with ReT-M2KR's passage images."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    for name in ("q1.jpg", "p1.jpg"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "images" / name)
    queries = [
        {"question_id": "OKVQA_1", "img_id": "1", "img_path": "images/q1.jpg", "question": "What sport is this?",
         "instruction": "Using the provided image, obtain documents that address the subsequent question: ",
         "pos_item_ids": ["p-1"], "pos_item_contents": ["Tennis is a racket sport."], "answers": ["tennis"],
         "gold_answer": "tennis", "related_item_ids": ["p-1", "p-2"]},
        {"question_id": "OKVQA_2", "img_id": "2", "img_path": None, "question": "Who wrote Hamlet?",
         "instruction": "", "pos_item_ids": ["p-2"], "pos_item_contents": ["..."], "answers": ["Shakespeare"],
         "gold_answer": "Shakespeare"},
    ]
    passages = [
        {"passage_id": "p-1", "passage_content": "Tennis is a racket sport.", "img_path": "images/p1.jpg", "language": "en"},
        {"passage_id": "p-2", "passage_content": "Hamlet is a tragedy by William Shakespeare.", "img_path": None},
    ]
    q, p = root / "okvqa_test.jsonl", root / "okvqa_passages_test.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in queries))
    p.write_text("".join(json.dumps(r) + "\n" for r in passages))
    return q, p


def test_m2kr_loader_reads_the_real_layout(tmp_path):
    q, p = _m2kr_fixture(tmp_path)
    data = load_m2kr(q, p, tmp_path)
    assert [x.passage_id for x in data.passages] == ["p-1", "p-2"]
    assert data.passages[0].image == str(tmp_path / "images/p1.jpg") and data.passages[1].image is None
    first, second = data.queries
    assert first.positives == ("p-1",) and first.image == str(tmp_path / "images/q1.jpg")
    assert first.text() == "Using the provided image, obtain documents that address the subsequent question: What sport is this?"
    assert first.text(use_instruction=False) == "What sport is this?"
    assert second.image is None and second.text() == "Who wrote Hamlet?"


def test_m2kr_loader_reads_the_ret_m2kr_spelling(tmp_path):
    q, p = _m2kr_fixture(tmp_path)
    q.write_text(json.dumps({"data_id": "x1", "question": "What sport is this?", "instruction": "Find:",
                             "image_path": "images/q1.jpg", "passage_id": "p-1", "answer": ["tennis"]}) + "\n")
    p.write_text(json.dumps({"passage_id": "p-1", "passage_text": "Tennis.", "passage_image_path": "images/p1.jpg"}) + "\n")
    data = load_m2kr(q, p, tmp_path)
    assert data.queries[0].question_id == "x1" and data.queries[0].positives == ("p-1",)
    assert data.passages[0].text == "Tennis." and data.passages[0].image.endswith("p1.jpg")


def test_m2kr_missing_query_image_is_one_clear_error(tmp_path):
    q, p = _m2kr_fixture(tmp_path)
    (tmp_path / "images/q1.jpg").unlink()
    with pytest.raises(InputError) as err:
        load_queries(q, tmp_path, {"p-1", "p-2"})
    assert err.value.path == str(q) and "line 1" in err.value.field and "img_path" in err.value.field


def test_m2kr_positive_missing_from_corpus_is_a_counted_miss_or_with_strict_one_clear_error(tmp_path, capsys):
    q, p = _m2kr_fixture(tmp_path)
    p.write_text(json.dumps({"passage_id": "p-1", "passage_content": "Tennis.", "img_path": None}) + "\n")
    split = load_m2kr(q, p, tmp_path)
    assert len(split.queries) == 2 and split.missing_positives == 1
    assert "1 of 2 queries have no positive passage in the corpus" in capsys.readouterr().out
    with pytest.raises(InputError) as err:
        load_m2kr(q, p, tmp_path, strict=True)
    assert err.value.path == str(q) and "pos_item_ids" in err.value.field and "'p-2'" in err.value.message
    assert load_passages(p, tmp_path)[0].passage_id == "p-1"


def test_m2kr_repeated_passage_id_is_one_clear_error(tmp_path):
    q, p = _m2kr_fixture(tmp_path)
    row = {"passage_id": "p-1", "passage_content": "Tennis.", "img_path": None}
    p.write_text(json.dumps(row) + "\n" + json.dumps({**row, "passage_content": "Again."}) + "\n")
    with pytest.raises(InputError) as err:
        load_m2kr(q, p, tmp_path)
    assert err.value.path == str(p) and "line 2" in err.value.field and "duplicate passage id 'p-1'" in str(err.value)


def test_m2kr_missing_passage_image_is_one_clear_error(tmp_path):
    q, p = _m2kr_fixture(tmp_path)
    (tmp_path / "images/p1.jpg").unlink()
    with pytest.raises(InputError) as err:
        load_m2kr(q, p, tmp_path)
    assert err.value.path == str(p) and "img_path" in err.value.field and "p1.jpg" in err.value.message
