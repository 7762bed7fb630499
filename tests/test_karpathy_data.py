"""The Karpathy-split loader on fixtures written in the exact layouts of dataset_flickr30k.json and
dataset_coco.json (COCO adds `filepath`, `cocoid` and the `restval` split that joins train)."""
import json

import pytest
from PIL import Image

from core.data import caption_queries, load_karpathy, load_karpathy_splits
from core.errors import InputError


def _sentence(raw, imgid, sentid):
    return {"tokens": raw.lower().rstrip(".").split(), "raw": raw, "imgid": imgid, "sentid": sentid}


def _write_flickr(root, splits=("train", "train", "val", "test")):
    (root / "flickr30k-images").mkdir(parents=True)
    images = []
    for imgid, split in enumerate(splits):
        filename = f"{1000092795 + imgid}.jpg"
        Image.new("RGB", (8, 8), (imgid * 40, 0, 0)).save(root / "flickr30k-images" / filename)
        sents = [_sentence(f"A man number {imgid} rides a bike {k}.", imgid, imgid * 5 + k) for k in range(5)]
        images.append({"sentids": [s["sentid"] for s in sents], "imgid": imgid, "sentences": sents,
                       "split": split, "filename": filename})
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def _write_coco(root):
    images = []
    for imgid, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"), ("test", "val2014")]):
        (root / folder).mkdir(parents=True, exist_ok=True)
        filename = f"COCO_{folder}_{imgid:012d}.jpg"
        Image.new("RGB", (8, 8)).save(root / folder / filename)
        sents = [_sentence(f"A cat on a sofa {k}.", imgid, 770337 + imgid * 5 + k) for k in range(5)]
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sents], "filename": filename,
                       "imgid": imgid, "split": split, "sentences": sents, "cocoid": 391895 + imgid})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_flickr30k_fixture(tmp_path):
    path = _write_flickr(tmp_path)
    train = load_karpathy(path, tmp_path / "flickr30k-images", "train")
    assert [r.imgid for r in train] == [0, 1]
    assert train[0].captions[0] == "A man number 0 rides a bike 0."
    queries = caption_queries(load_karpathy(path, tmp_path / "flickr30k-images", "test"))
    assert len(queries) == 5 and {q.imgid for q in queries} == {3} and queries[0].sentid == 15


def test_coco_fixture_restval_joins_train_and_filepath_is_used(tmp_path):
    path = _write_coco(tmp_path)
    train = load_karpathy(path, tmp_path, "train")
    assert [r.split for r in train] == ["train", "restval"]
    assert train[1].path == tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"


def test_several_splits_from_one_parse_equal_each_split_alone(tmp_path):
    path = _write_coco(tmp_path)
    both = load_karpathy_splits(path, tmp_path, ["train", "test"])
    assert both == {split: load_karpathy(path, tmp_path, split) for split in ("train", "test")}


def test_missing_image_file_names_file_and_field(tmp_path):
    path = _write_flickr(tmp_path)
    (tmp_path / "flickr30k-images" / "1000092796.jpg").unlink()
    with pytest.raises(InputError, match=r"1000092796\.jpg: images\[1\]\.filename: image file not found"):
        load_karpathy(path, tmp_path / "flickr30k-images", "train")


def test_json_without_images(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(InputError, match=r"captions\.json: images: required field is missing"):
        load_karpathy(path, tmp_path, "train")


def test_empty_split(tmp_path):
    path = _write_flickr(tmp_path, splits=("train", "val"))
    with pytest.raises(InputError, match=r"images\[\]\.split: split 'test' is empty; splits present: train, val"):
        load_karpathy(path, tmp_path / "flickr30k-images", "test")


def test_entry_without_captions_field(tmp_path):
    path = _write_flickr(tmp_path)
    data = json.loads(path.read_text())
    del data["images"][2]["sentences"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"images\[2\]\.sentences: required field is missing"):
        load_karpathy(path, tmp_path / "flickr30k-images", "val")


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_the_images_array_is_read_in_chunks_exactly_as_json_parses_it(tmp_path, monkeypatch, chunk):
    from core import io

    path = _write_coco(tmp_path)
    data = json.loads(path.read_text())
    data.update({"info": {"year": 2014, "ratio": 12345.5e-3, "tags": [None, True, "a]}"]}, "count": 1234567})
    path.write_text(json.dumps({"info": data.pop("info"), **data}, indent=1))  # keys before and after the array
    monkeypatch.setattr(io._JSONWindow, "CHUNK", chunk)
    assert list(io.read_json_array(path, "images")) == data["images"]


@pytest.mark.parametrize("text, match", [('{"images": [{"a": 1}, {"b": }]}', r"x\.json: not valid JSON near character 28"),
                                         ('{"images": {"a": 1}}', r"x\.json: images: must be a list"),
                                         ('{"images": [1, 2]', r"x\.json: not valid JSON")])
def test_a_broken_images_array_names_the_file_and_where(tmp_path, text, match):
    from core.io import read_json_array

    (tmp_path / "x.json").write_text(text)
    with pytest.raises(InputError, match=match):
        list(read_json_array(tmp_path / "x.json", "images"))
