"""The CIRR evaluation-server files on the real rc2 annotations (val and test1 captions and image splits, read where
the shared data folder keeps them; placeholder images rendered under the listed names), written by `cir.evaluate`
and `cir.iterative.eval_iterative` with a tiny untrained retriever; and the bad CIRR / FashionIQ input that must
stop before any work."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cir import evaluate
from cir.data import load_cirr, load_fashioniq
from cir.retriever import build_shapes_retriever
from core.encoders import build_dual_encoder
from core.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
# The shared data folder sits beside the project's root; SHARED_DATA_DIR points elsewhere (another checkout).
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", ROOT.parent / "shared" / "data"))
REAL_CIRR = SHARED_DATA / "cirr"
TEST1_PAIRS = 4148  # the rc2 test1 release
ROW = "pretrain+ptha"
# An untrained tower and Q-Former as small as the code allows: the files' format is checked, not their quality.
TINY_TOWER = {"embed_dim": 32, "image_size": 16,
              "vision": {"layers": 1, "width": 32, "patch_size": 8, "head_width": 16, "mlp_ratio": 2.0},
              "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0}}
TINY_QFORMER = {"qformer": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 64, "cross_attention_frequency": 1, "max_position_embeddings": 48,
                            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
                "num_query_tokens": 2, "embed_dim": 32, "max_text_length": 40}


def _real_file(rel: str) -> Path:
    path = REAL_CIRR / rel
    if not path.is_file():
        pytest.skip(f"the real CIRR annotations are not here ({path} is absent)")
    return path


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory) -> Path:
    """A CIRR root whose captions/ and image_splits/ are links to the real annotation folders, and whose img_raw/
    holds a distinct 8x8 placeholder image under every val and test1 name."""
    for split in ("val", "test1"):
        _real_file(f"captions/cap.rc2.{split}.json")
        _real_file(f"image_splits/split.rc2.{split}.json")
    root = tmp_path_factory.mktemp("real-cirr") / "cirr"
    root.mkdir()
    for folder in ("captions", "image_splits"):
        (root / folder).symlink_to(REAL_CIRR / folder, target_is_directory=True)
    rng = np.random.default_rng(0)
    for split in ("val", "test1"):
        for rel in json.loads((REAL_CIRR / "image_splits" / f"split.rc2.{split}.json").read_text()).values():
            path = root / "img_raw" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def tiny_retriever(cirr_root, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tower = tmp_path_factory.mktemp("tower") / "dense"
    tower.mkdir()
    build_dual_encoder(TINY_TOWER).save(tower)
    texts = [r["caption"] for s in ("val", "test1")
             for r in json.loads((cirr_root / "captions" / f"cap.rc2.{s}.json").read_text())]
    folder = tmp_path_factory.mktemp("retriever") / "checkpoint-best"
    build_shapes_retriever(tower, texts, TINY_QFORMER).save_pretrained(folder)
    return folder


def _captions(split: str) -> dict[str, dict]:
    return {str(r["pairid"]): r for r in json.loads((REAL_CIRR / "captions" / f"cap.rc2.{split}.json").read_text())}


def _server_files(folder: Path) -> dict[str, dict]:
    """Every rc2 server file anywhere under `folder`, by metric (how the shared check finds them)."""
    found = {}
    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("version") == "rc2":
            assert data["metric"] not in found, f"two {data['metric']} files under {folder}"
            found[data["metric"]] = data
    return found


def _check_protocol(files: dict[str, dict], split: str) -> None:
    caps = _captions(split)
    gallery = set(json.loads((REAL_CIRR / "image_splits" / f"split.rc2.{split}.json").read_text()))
    assert set(files) == {"recall", "recall_subset"}
    for metric, k in (("recall", 50), ("recall_subset", 3)):
        listed = {p: v for p, v in files[metric].items() if p not in ("version", "metric")}
        assert set(listed) == set(caps), f"{metric}: {len(listed)} pairids, expected {len(caps)}"
        for pairid, names in listed.items():
            row = caps[pairid]
            assert len(names) == len(set(names)) == k and set(names) <= gallery
            assert row["reference"] not in names  # CIRR's protocol drops the reference from both rankings
            if metric == "recall_subset":
                assert set(names) <= set(row["img_set"]["members"]) - {row["reference"]}


def _metrics_from_files(files: dict[str, dict], split: str) -> dict[str, float]:
    """R@K and Rs@K recomputed from the written rankings alone (the server's computation)."""
    caps = _captions(split)
    out = {}
    for prefix, metric, ks in (("R@", "recall", (1, 5, 10, 50)), ("Rs@", "recall_subset", (1, 2, 3))):
        for k in ks:
            hits = [caps[p]["target_hard"] in files[metric][p][:k] for p in caps]
            out[f"{prefix}{k}"] = 100.0 * sum(hits) / len(hits)
    return out


def test_test1_server_files_as_the_shared_check_calls_it(cirr_root, tiny_retriever, tmp_path, capsys):
    """`cir.evaluate --cirr_root DIR --split test1 --rows '{"pretrain+ptha": ...}' --output_dir OUT`: the metrics are
    skipped with one line saying why, and both files cover every test1 pairid by the protocol."""
    assert len(_captions("test1")) == TEST1_PAIRS
    out = tmp_path / "out"
    rows = evaluate.main(["--cirr_root", str(cirr_root), "--split", "test1", "--rows", json.dumps({ROW: str(tiny_retriever)}),
                          "--output_dir", str(out), "--threads", "1"])
    said = [line for line in capsys.readouterr().out.splitlines() if "metrics skipped" in line]
    assert len(said) == 1 and "target_hard" in said[0]
    assert rows == {}
    files = _server_files(out)
    _check_protocol(files, "test1")
    assert (out / "recall_submission_test1.json").is_file() and (out / "recall_subset_submission_test1.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == {} and metrics["submission"]["row"] == ROW and metrics["n_queries"] == TEST1_PAIRS
    assert not list(out.glob(".*.tmp"))


def test_val_files_beside_the_metrics_give_the_same_metrics(cirr_root, tiny_retriever, tmp_path):
    out = tmp_path / "out"
    rows = evaluate.main(["--cirr_root", str(cirr_root), "--split", "val", "--rows", json.dumps({ROW: str(tiny_retriever)}),
                          "--output_dir", str(out), "--threads", "1"])
    files = _server_files(out)
    _check_protocol(files, "val")
    direct = {k: v for k, v in rows[ROW].items() if not k.startswith("Avg")}
    assert _metrics_from_files(files, "val") == pytest.approx(direct, abs=1e-9)
    assert json.loads((out / "metrics.json").read_text())["rows"][ROW] == rows[ROW]


def test_test1_needs_the_submission_row_among_the_rows(cirr_root, tiny_retriever, tmp_path):
    with pytest.raises(InputError, match="submission_row.*hides its targets"):
        evaluate.main(["--cirr_root", str(cirr_root), "--split", "test1", "--rows",
                       json.dumps({"other": str(tiny_retriever)}), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # refused before any work


def _iterative_experiment(cirr_root: Path, model: Path, exp: Path) -> Path:
    """An experiment folder with round 0 only (the upstream model): what eval_iterative reads before training."""
    from cir.iterative.config import TrainIterativeConfig
    from core.config import save_config

    save_config(TrainIterativeConfig(data_dir=str(cirr_root), model_path=str(model), wandb=False), exp / "config.yaml")
    return exp


def test_eval_iterative_writes_each_rounds_server_files(cirr_root, tiny_retriever, tmp_path, capsys):
    from cir.iterative import eval_iterative

    exp = _iterative_experiment(cirr_root, tiny_retriever, tmp_path / "exp")
    rows = eval_iterative.main(["--experiment_dir", str(exp), "--eval_dataset", "test1", "--num_workers", "0"])
    assert rows == {"round0": {}}
    assert sum("metrics skipped" in line for line in capsys.readouterr().out.splitlines()) == 1
    _check_protocol(_server_files(exp), "test1")
    assert (exp / "recall_submission_test1_round0.json").is_file()
    assert json.loads((exp / "evaluation_results.json").read_text())["submission"]["round0"] == {
        "recall": "recall_submission_test1_round0.json", "recall_subset": "recall_subset_submission_test1_round0.json"}

    val = eval_iterative.main(["--experiment_dir", str(exp), "--eval_dataset", "val", "--num_workers", "0",
                               "--output_file", str(tmp_path / "val" / "evaluation_results.json")])
    files = _server_files(tmp_path / "val")
    _check_protocol(files, "val")
    assert _metrics_from_files(files, "val") == pytest.approx(
        {k: v for k, v in val["round0"].items() if k not in ("Avg", "Avg 95% CI")}, abs=1e-9)
    low, high = val["round0"]["Avg 95% CI"]
    assert low <= val["round0"]["Avg"] <= high


# ---------------------------------------------------------------------------------------------- bad input
def _copy_root_with_captions(cirr_root: Path, tmp_path: Path, split: str, rows: list[dict]) -> Path:
    root = tmp_path / "cirr"
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").symlink_to(cirr_root / "image_splits", target_is_directory=True)
    (root / "img_raw").symlink_to(cirr_root / "img_raw", target_is_directory=True)
    (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(rows))
    return root


def test_repeated_pairid_is_refused_naming_file_and_row(cirr_root, tmp_path):
    rows = list(_captions("val").values())[:4]
    rows[3] = {**rows[3], "pairid": rows[1]["pairid"]}
    root = _copy_root_with_captions(cirr_root, tmp_path, "val", rows)
    with pytest.raises(InputError, match=r"cap\.rc2\.val\.json: \[3\]\.pairid: pairid .* repeats row \[1\]"):
        load_cirr(root, "val")


def test_a_split_missing_some_targets_is_refused(cirr_root, tmp_path):
    rows = list(_captions("val").values())[:4]
    rows[2] = {k: v for k, v in rows[2].items() if k != "target_hard"}
    root = _copy_root_with_captions(cirr_root, tmp_path, "val", rows)
    with pytest.raises(InputError, match=r"cap\.rc2\.val\.json: \[2\]\.target_hard: missing in 1 of 4 rows"):
        load_cirr(root, "val", require_targets=False)


def test_training_on_the_test_split_is_refused_before_work(cirr_root, tiny_retriever, tmp_path):
    from cir import train
    from cir.iterative import train_iterative

    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"cap\.rc2\.test1\.json: \[0\]\.target_hard: .*no targets"):
        train.main(["--cirr_root", str(cirr_root), "--train_split", "test1", "--val_split", "val",
                    "--output_dir", str(out), "--init_from", str(tiny_retriever)])
    with pytest.raises(InputError, match=r"cap\.rc2\.test1\.json: \[0\]\.target_hard: .*no targets"):
        train.main(["--cirr_root", str(cirr_root), "--train_split", "val", "--val_split", "test1",
                    "--output_dir", str(out), "--init_from", str(tiny_retriever)])
    exp = tmp_path / "exp"
    with pytest.raises(InputError, match=r"cap\.rc2\.test1\.json: \[0\]\.target_hard: .*no targets"):
        # the foundation model is only named: the data is refused before anything loads it
        train_iterative.main(["--data_dir", str(cirr_root), "--train_split", "test1", "--model_path",
                              str(tiny_retriever), "--foundation_model_path", str(tiny_retriever),
                              "--experiment_dir", str(exp), "--wandb", "false"])
    assert not out.exists() and not exp.exists()


def test_fashioniq_with_the_wrong_image_extension_says_so(tmp_path):
    root = tmp_path / "fashionIQ_dataset"
    for folder in ("captions", "image_splits", "images"):
        (root / folder).mkdir(parents=True)
    names = ["B000A", "B000B"]
    for name in names:
        Image.new("RGB", (8, 8)).save(root / "images" / f"{name}.jpg")
    (root / "image_splits" / "split.dress.val.json").write_text(json.dumps(names))
    (root / "captions" / "cap.dress.val.json").write_text(json.dumps(
        [{"candidate": "B000A", "target": "B000B", "captions": ["is red", "is longer"]}]))
    with pytest.raises(InputError, match=r"B000A\.png: B000A: image file not found .*B000A\.jpg exists: set "
                                         r"image_ext to '\.jpg'"):
        load_fashioniq(root, "dress", "val")
    assert load_fashioniq(root, "dress", "val", image_ext=".jpg").images["B000B"].name == "B000B.jpg"
