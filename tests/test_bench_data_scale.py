"""Smoke run of bench/data_scale.py on a 64-image fixture: the fixture is in COCO's Karpathy layout and cached,
and the bench writes its JSON, CSV and plot with a number in every cell (no timing is asserted)."""
from __future__ import annotations

import csv
import json

from bench import data_scale

TINY = {
    "embed_dim": 32,
    "image_size": 224,
    "vision": {"layers": 1, "width": 32, "patch_size": 32, "head_width": 16, "mlp_ratio": 2.0},
    "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}


def test_fixture_is_coco_layout_and_cached(tmp_path):
    cfg = data_scale.BenchConfig(n_eval=4, captions_per_image=2)
    root, info = data_scale.make_fixture(cfg, 12, tmp_path)
    data = json.loads((root / data_scale.DATA_JSON).read_text())
    assert {e["split"] for e in data["images"]} == {"train", "restval", "val", "test"}
    for e in data["images"]:
        assert e["filename"] == f"COCO_{e['filepath']}_{e['imgid']:012d}.jpg"
        assert (e["filepath"] == "train2014") == (e["split"] == "train")
        assert (root / e["filepath"] / e["filename"]).is_file() and len(e["sentences"]) == 2
    stamp = (root / data_scale.DATA_JSON).stat().st_mtime_ns
    again, info2 = data_scale.make_fixture(cfg, 12, tmp_path)
    assert again == root and info2["reused"] and not info["reused"]
    assert (root / data_scale.DATA_JSON).stat().st_mtime_ns == stamp


def test_bench_writes_its_files(tmp_path):
    out = tmp_path / "results"
    data_scale.main(["--sizes", "[64]", "--n_eval", "8", "--train_steps", "3", "--batch_size", "8",
                     "--encode_batch_size", "16", "--num_workers", "1", "--model", json.dumps(TINY),
                     "--work_dir", str(tmp_path / "work"), "--out_dir", str(out)])
    report = json.loads((out / "data_scale.json").read_text())
    assert [m["returncode"] for m in report["measurements"]] == [0, 0, 0]
    (row,) = list(csv.DictReader((out / "data_scale.csv").open()))
    assert all(row[k] for k in ("encode_rss_mb", "encode_img_s", "train_rss_mb", "train_img_s", "decode_img_s"))
    assert (out / "data_scale.png").stat().st_size > 0


def test_steady_rate_leaves_out_start_up_and_the_final_validation():
    # 10 steps of 4 images: the first step takes 5 s (workers start), then 1 s a step; the bar's close line comes
    # after a 30-s validation. The steady rate is 4 images/s; a caption bar of another name is ignored.
    lines = ["@@training dense|0|10|0.000@@"] + [f"@@training dense|{n}|10|{4.0 + n:.3f}@@" for n in range(1, 11)]
    lines += ["@@val images|1|1|2.000@@", "@@training dense|10|10|44.000@@"]
    points = data_scale.bar_points("\r".join(lines), "training dense")
    rate, method = data_scale.steady_rate(points, lambda steps: 4 * steps, include_last=False)
    assert rate == 4.0 and "steady" in method
    with_close, _ = data_scale.steady_rate(points, lambda steps: 4 * steps, include_last=True)
    assert with_close < 1.5  # counting the close line would fold the validation into the rate
