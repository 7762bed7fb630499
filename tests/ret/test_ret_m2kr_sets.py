"""One evaluation config per ReT-M2KR test set, and the table they fill."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import parse_config
from core.errors import InputError
from retriever.ret import m2kr_table
from retriever.ret.evaluate import EvalConfig

ROOT = Path(__file__).resolve().parents[2]
SETS = ("wit", "iglue", "kvqa", "oven", "llava", "infoseek", "evqa", "okvqa")


@pytest.mark.parametrize("name", SETS)
def test_each_test_set_has_a_valid_config_and_script(name):
    cfg = parse_config(EvalConfig, ["--config", str(ROOT / f"configs/ret/m2kr_test/{name}.yaml")])
    assert cfg.checkpoint == "aimagelab/ReT-CLIP-ViT-L-14" and cfg.index_dir == ""
    assert Path(cfg.queries_file).name.startswith(name) and Path(cfg.passages_file).name == f"{name}_passages_test.jsonl"
    assert cfg.output_dir.endswith(f"/{name}") and cfg.use_instruction is None  # the checkpoint's own setting
    assert (ROOT / f"scripts/ret/m2kr/{name}.sh").is_file()
    assert {c[0] for c in m2kr_table.COLUMNS} == set(SETS)


def test_table_fills_the_measured_columns(tmp_path):
    (tmp_path / "okvqa").mkdir()
    (tmp_path / "okvqa/metrics.json").write_text(json.dumps({"split": "test", "ret": {"R@5": 20.2, "PR@5": 66.25}}))
    (tmp_path / "wit").mkdir()
    (tmp_path / "wit/metrics.json").write_text(json.dumps({"ret": {"R@10": 73.4}}))
    values = m2kr_table.main(["--eval_dir", str(tmp_path)])
    assert values["OKVQA Recall@5"] == pytest.approx(0.202) and values["OKVQA Pseudo Recall@5"] == pytest.approx(0.6625)
    assert values["WIT Recall@10"] == pytest.approx(0.734) and values["IGLUE Recall@1"] is None
    line = (tmp_path / "table.md").read_text().splitlines()[2]
    assert line.startswith("| ReT | 0.734 | — |") and line.endswith("| 0.202 | 0.662 |")


def test_table_refuses_a_metrics_file_without_pseudo_recall(tmp_path):
    (tmp_path / "evqa").mkdir()
    (tmp_path / "evqa/metrics.json").write_text(json.dumps({"ret": {"R@5": 44.5}}))
    with pytest.raises(InputError, match=r"evqa/metrics\.json: ret\.PR@5: missing"):
        m2kr_table.main(["--eval_dir", str(tmp_path)])
