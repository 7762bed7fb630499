"""tools.seed_table: each run's headline figure with its interval, the mean only where every run has the row."""
import json

import pytest

from core.errors import InputError
from tools.seed_table import seed_table


def _run(folder, results):
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_rows_side_by_side_with_intervals_and_means(tmp_path):
    a = _run(tmp_path / "seed0", {"cir": {"pretrain": {"R@10": 50.0, "Avg": 40.0, "Avg 95% CI": [37.0, 43.0]}},
                                  "mir": {"genir": {"Hits@10": [10.0, 30.0], "Hits@10 last round 95% CI": [25.0, 35.0]}}})
    b = _run(tmp_path / "seed1", {"cir": {"pretrain": {"Avg": 44.0}, "ptha": {"Avg": 41.0}},
                                  "mir": {"genir": {"Hits@10": [12.0, 34.0]}}})
    table = seed_table([a, b])
    assert "| pretrain | Avg | 40.0 (37.0–43.0) | 44.0 | 42.0 |" in table
    assert "| ptha | Avg | — | 41.0 | — |" in table
    assert "| genir | Hits@10 | 30.0 (25.0–35.0) | 34.0 | 32.0 |" in table  # the last round's hits


def test_a_folder_without_results_is_named(tmp_path):
    with pytest.raises(InputError, match="results.json"):
        seed_table([tmp_path])
