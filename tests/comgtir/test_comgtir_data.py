"""Retriever data from real-format fixtures (COCO Karpathy JSON with `filepath` and `restval`, Flickr30K layout),
and the bad-input errors of the data step; the real-data retriever code path on a local tiny T5 + tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.errors import InputError
from core.io import read_jsonl
from retriever.generative import prepare_dataset
from rqvae.codes import build_codes, write_codes


def write_coco_fixture(root):
    """A 5-image dataset_coco.json in Karpathy's exact layout, images under `filepath/`."""
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "images" / folder / name)
        sentences = [{"tokens": ["a", "photo", str(i)], "raw": f"A photo number {i} {j}.", "imgid": i,
                      "sentid": 10 * i + j} for j in range(2)]
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": name, "imgid": i,
                       "split": split, "sentences": sentences, "cocoid": 1000 + i})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root / "dataset_coco.json"


def test_prepare_dataset_on_a_coco_fixture(tmp_path):
    data_json = write_coco_fixture(tmp_path)
    codes = np.array([[0, 1], [1, 1], [2, 0], [3, 3], [0, 2]])
    write_codes(tmp_path / "codes.json", build_codes(list(range(5)), ["train", "train", "val", "test", "test"], codes, 4, True))
    pseudo = tmp_path / "pseudo.jsonl"
    pseudo.write_text("".join(json.dumps({"imgid": i, "split": s, "query": f"pseudo {i}"}) + "\n"
                              for i, s in [(0, "train"), (1, "restval"), (3, "test"), (4, "test")]))
    out = prepare_dataset.main(["--data_json", str(data_json), "--image_root", str(tmp_path / "images"),
                                "--codes", str(tmp_path / "codes.json"), "--pseudo_queries", str(pseudo),
                                "--output_dir", str(tmp_path / "data")])
    train = read_jsonl(out / "train.jsonl")
    assert {r["imgid"] for r in train if r["source"] == "caption"} == {0, 1}  # restval joins train
    # a restval image's pseudo queries (as files written before restval was named train say) are training rows
    assert {r["imgid"] for r in train if r["source"] == "pseudo"} == {0, 1, 3, 4}
    assert all(r["code"][:-1] == codes[r["imgid"]].tolist() for r in train)
    assert [r["imgid"] for r in read_jsonl(out / "val.jsonl")] == [2, 2]


def test_prepare_dataset_refuses_an_image_without_identifier(tmp_path):
    data_json = write_coco_fixture(tmp_path)
    write_codes(tmp_path / "codes.json", build_codes([0, 2], ["train", "val"], np.array([[0, 1], [1, 0]]), 4, False))
    with pytest.raises(InputError, match="images.1"):
        prepare_dataset.main(["--data_json", str(data_json), "--image_root", str(tmp_path / "images"),
                              "--codes", str(tmp_path / "codes.json"), "--output_dir", str(tmp_path / "data")])
    assert not (tmp_path / "data").exists()  # nothing half-written


def test_pretrained_t5_path_grows_the_vocabulary(tmp_path):
    """The real-data path (`tokenizer: <name>`, `model: {pretrained: <name>}`) on a tiny T5 saved locally."""
    from transformers import T5Config, T5ForConditionalGeneration

    from retriever.generative.model import build_t5
    from retriever.generative.vocab import CodeVocab, build_tokenizer, train_word_tokenizer

    base = train_word_tokenizer(["a dog runs on the grass", "two people"])
    base.save_pretrained(str(tmp_path / "t5"))
    T5ForConditionalGeneration(T5Config(vocab_size=len(base), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                        num_heads=2, decoder_start_token_id=0)).save_pretrained(str(tmp_path / "t5"))
    tok = build_tokenizer(str(tmp_path / "t5"), None, levels=2, codebook_size=4, suffix_size=2)
    vocab = CodeVocab(tok, 2, 4, 2)
    t5 = build_t5({"pretrained": str(tmp_path / "t5")}, len(tok), vocab.pad_id, vocab.eos_id)
    assert t5.get_input_embeddings().num_embeddings == len(tok) == len(base) + 2 * 4 + 2


def captioner_args(root, data_json) -> list[str]:
    return ["--source", "captioner", "--data_json", str(data_json), "--image_root", str(root / "images"),
            "--n_per_image", "2", "--batch_size", "2", "--num_workers", "0", "--output", str(root / "pseudo.jsonl")]


def test_captioner_pseudo_queries_on_a_tiny_blip(tiny_blip, tmp_path):
    """The real-data path: BLIP's captioner loaded by path, the images read through the loader, two per batch."""
    from tools import generate_pseudo_query

    data_json = write_coco_fixture(tmp_path)
    out = generate_pseudo_query.main(["--captioner", str(tiny_blip / "captioner"),
                                      *captioner_args(tmp_path, data_json)])
    rows = read_jsonl(out)
    assert [r["imgid"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # every image of every split, in order
    assert [r["split"] for r in rows[::2]] == ["train", "train", "val", "test", "test"]  # restval is training data
    assert all(isinstance(r["query"], str) for r in rows)


@pytest.mark.parametrize("verify", ["false", "true"])
def test_a_corrupt_image_is_an_error_naming_it(tiny_blip, tmp_path, verify):
    from tools import generate_pseudo_query

    data_json = write_coco_fixture(tmp_path)
    (tmp_path / "images" / "val2014" / "COCO_val2014_000000000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="COCO_val2014_000000000002.jpg"):
        generate_pseudo_query.main(["--captioner", str(tiny_blip / "captioner"), "--verify_images", verify,
                                    *captioner_args(tmp_path, data_json)])
    assert not (tmp_path / "pseudo.jsonl").exists()  # nothing half-written
