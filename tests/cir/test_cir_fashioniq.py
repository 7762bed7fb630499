"""FashionIQ through the same training and evaluation code as CIRR: a tiny FashionIQ fixture in the exact layout
(built from the Shapes world's CIR triplets, two categories), `cir.train` for a few epochs selected on FashionIQ val,
`cir.evaluate` writing per-category R@10/R@50, their means and Avg; PTHA's reverse texts in the FashionIQ layout;
bad input named by file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cir import evaluate, train
from cir.data import load_cir_split, load_cirr, merge_splits
from cir.features import token_bank
from cir.retriever import ComposedRetriever
from core.config import parse_config
from core.errors import InputError

CATEGORIES = ("dress", "shirt")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cir"
SMALL = {"qformer": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
                     "cross_attention_frequency": 1, "max_position_embeddings": 48,
                     "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
         "num_query_tokens": 4, "embed_dim": 64, "max_text_length": 40}


def _two_captions(caption: str) -> list[str]:
    """FashionIQ gives two relative captions per pair: a two-edit Shapes text splits at "; ", else a filler."""
    first, _, second = caption.partition("; ")
    return [first, second or "the rest stays the same"]


def _write_category_split(root: Path, category: str, split: str, rows: list[dict], names: list[str]) -> None:
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"cap.{category}.{split}.json").write_text(json.dumps(rows))
    (root / "image_splits" / f"split.{category}.{split}.json").write_text(json.dumps(names))


def _category(set_id: int) -> str:
    return CATEGORIES[int(set_id) % 2]


@pytest.fixture(scope="module")
def fashioniq_root(shapes_world, tmp_path_factory) -> Path:
    """FashionIQ layout from the Shapes CIR triplets: each near-duplicate set goes to one of two categories by its
    id; FashionIQ train = the Shapes train triplets, FashionIQ val = the Shapes val and test triplets (90 queries,
    90 images per category: enough for a stable model selection, and chance R@10 is low)."""
    root = tmp_path_factory.mktemp("fashioniq") / "fashionIQ_dataset"
    cirr = shapes_world / "cirr"
    for split, sources in (("train", ("train",)), ("val", ("val", "test"))):
        groups = [g for s in sources for g in json.loads((cirr / "image_sets" / f"sets.rc2.{s}.json").read_text())]
        triplets = [t for s in sources for t in load_cirr(cirr, s).triplets]
        for category in CATEGORIES:
            names = [n for g in groups if _category(g["id"]) == category for n in g["members"]]
            rows = [{"candidate": t.reference, "target": t.target, "captions": _two_captions(t.caption)}
                    for t in triplets if _category(t.set_id) == category]
            _write_category_split(root, category, split, rows, names)
    images = root / "images"
    images.mkdir()
    for s in ("train", "val", "test"):
        for path in (cirr / "img_raw" / s).glob("*.png"):
            shutil.copyfile(path, images / path.name)
    return root


def _train_args(root: Path, dense_checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "fashioniq", "--categories", ",".join(CATEGORIES), "--cirr_root", str(root),
            "--dense_checkpoint", str(dense_checkpoint), "--output_dir", str(out), "--model", json.dumps(SMALL),
            "--threads", "1", *extra]


@pytest.fixture(scope="module")
def trained(fashioniq_root, dense_checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fiq_run") / "fiq"
    metrics = train.main(_train_args(fashioniq_root, dense_checkpoint, out, "--epochs", "20", "--batch_size", "16",
                                     "--lr", "1e-3", "--warmup_steps", "5", "--temperature", "0.07"))
    return out, metrics


def test_fashioniq_real_config_parses():
    cfg = parse_config(train.TrainConfig, ["--config", str(CONFIGS / "fashioniq_train.yaml")])
    assert cfg.dataset == "fashioniq" and cfg.categories == ["dress", "shirt", "toptee"] and cfg.pretrained


def test_fashioniq_fixture_is_the_real_layout(fashioniq_root):
    parts = load_cir_split("fashioniq", fashioniq_root, "val", CATEGORIES)
    assert [p.meta["category"] for p in parts] == list(CATEGORIES)
    for p in parts:  # each category against its own gallery; every query's images are in it
        assert all(t.reference in p.images and t.target in p.images and t.members == () for t in p.triplets)
    assert not set(parts[0].images) & set(parts[1].images)
    merged = merge_splits(load_cir_split("fashioniq", fashioniq_root, "train", CATEGORIES))
    assert len({t.pairid for t in merged.triplets}) == len(merged.triplets)  # "dress/0", "shirt/0", ...
    assert train.batch_targets(merged.triplets[:4], True, True)[1] == [t.target for t in merged.triplets[:4]]


def test_fashioniq_train_and_evaluate(trained, fashioniq_root, tmp_path):
    out, metrics = trained
    assert metrics["n_train"] > 0 and set(metrics["val"]) >= {"dress/R@10", "shirt/R@50", "mean/R@10", "Avg"}
    summary = tmp_path / "results.json"
    rows = evaluate.main(["--dataset", "fashioniq", "--categories", ",".join(CATEGORIES), "--cirr_root",
                          str(fashioniq_root), "--split", "val", "--rows", json.dumps({"fiq": str(out / "checkpoint-best")}),
                          "--output_dir", str(tmp_path / "eval"), "--summary", str(summary), "--threads", "1"])
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    row = written["rows"]["fiq"]
    keys = {f"{c}/R@{k}" for c in CATEGORIES for k in (10, 50)} | {"mean/R@10", "mean/R@50", "Avg"}
    assert set(row) == keys and all(0 <= v <= 100 for v in row.values())
    assert row == rows["fiq"] and row["Avg"] == pytest.approx((row["mean/R@10"] + row["mean/R@50"]) / 2)
    # the checkpoint kept is the best on val: evaluate reproduces what training recorded
    assert row["Avg"] == pytest.approx(metrics["val"]["Avg"], abs=1e-6)
    assert json.loads(summary.read_text())["cir-fashioniq"]["fiq"] == row
    # beats chance clearly (90 images per category: chance R@10 11.1, R@50 55.6, Avg 33.3; an untrained model
    # scored 13.3 / 56.7 / 35.0, three seeds of this training 32-34 / 85-87 / 59-60)
    per = written["per_category"]
    chance = {k: 100 * sum(min(1.0, k / per[c]["n_gallery"]) for c in CATEGORIES) / len(CATEGORIES) for k in (10, 50)}
    assert row["mean/R@10"] > 2 * chance[10] and row["Avg"] > (chance[10] + chance[50]) / 2 + 15, (row, chance)


def test_fashioniq_ptha_reads_reverse_texts(trained, fashioniq_root, tmp_path):
    """PTHA's reverse texts in the FashionIQ layout: row i of cap.{category}.train_reverse.json reverses row i."""
    out, _ = trained
    rev = tmp_path / "reverse"
    for category in CATEGORIES:
        rows = json.loads((fashioniq_root / "captions" / f"cap.{category}.train.json").read_text())
        names = json.loads((fashioniq_root / "image_splits" / f"split.{category}.train.json").read_text())
        _write_category_split(rev, category, "train_reverse", [
            {"candidate": r["target"], "target": r["candidate"], "captions": ["undo: " + r["captions"][0], ""]}
            for r in rows], names)
    cfg = train.TrainConfig(dataset="fashioniq", categories=list(CATEGORIES), cirr_root=str(fashioniq_root),
                            reverse_root=str(rev), objective="ptha")
    image_root = str(fashioniq_root / "images")
    data = merge_splits(load_cir_split("fashioniq", fashioniq_root, "train", CATEGORIES))
    reverse = train._reverse_texts(cfg, data, image_root)
    assert reverse["shirt/0"].startswith("Undo")
    model = ComposedRetriever.from_pretrained(out / "checkpoint-best", device=torch.device("cpu"))
    bank = token_bank(model.image_encoder, data.images)
    loss, parts = train.step_loss(model, data.triplets[:8], bank, reverse, cfg)
    assert set(parts) == {"q2t", "t2t", "p2p"} and torch.isfinite(loss)


def test_fashioniq_bad_input(fashioniq_root, dense_checkpoint, tmp_path):
    args = _train_args(fashioniq_root, dense_checkpoint, tmp_path / "bad", "--epochs", "1")
    with pytest.raises(InputError, match=r"cap\.shoes\.train\.json: category"):
        train.main(args + ["--categories", "dress,shoes"])
    with pytest.raises(InputError, match="dataset"):
        train.main(args + ["--dataset", "fashion"])
    # a category whose val split lists no image: named by its file, before any training
    bad = tmp_path / "fiq"
    shutil.copytree(fashioniq_root / "captions", bad / "captions")
    shutil.copytree(fashioniq_root / "image_splits", bad / "image_splits")
    (bad / "image_splits" / "split.shirt.val.json").write_text("[]")
    args = _train_args(bad, dense_checkpoint, tmp_path / "bad", "--image_root", str(fashioniq_root / "images"))
    with pytest.raises(InputError, match=r"split\.shirt\.val\.json"):
        train.main(args)
    with pytest.raises(InputError, match=r"split\.shirt\.val\.json"):
        evaluate.main(["--dataset", "fashioniq", "--cirr_root", str(bad), "--categories", "dress,shirt",
                       "--image_root", str(fashioniq_root / "images"), "--split", "val",
                       "--rows", json.dumps({"x": str(dense_checkpoint)}), "--output_dir", str(tmp_path / "e")])
    assert not (tmp_path / "bad" / "config.yaml").exists()
