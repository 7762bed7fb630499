"""MIR metrics on hand-computed ranks, and the record store's strictness and resumability."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import InputError
from mir.metrics import cumulative_hits, mean_log_rank, recall_per_round, summarise
from mir.records import RecordStore, rank_matrix


def test_cumulative_hits_as_chatir_computes_them():
    # target 0 found at round 1 then lost; target 1 found at round 2; target 2 never; target 3 at round 0.
    ranks = np.array([[50, 3, 40], [20, 15, 9], [99, 99, 99], [0, 30, 30]])
    assert cumulative_hits(ranks, 10) == [25.0, 50.0, 75.0]
    assert recall_per_round(ranks, 10) == [25.0, 25.0, 25.0]
    assert mean_log_rank(np.array([[0], [np.e - 1]])) == [pytest.approx(0.5)]
    row = summarise(ranks)
    assert row["N"] == 4 and all(b >= a for a, b in zip(row["Hits@10"], row["Hits@10"][1:]))
    low, high = row["Hits@10 last round 95% CI"]  # three of four found by the last round
    assert 0 <= low < 75.0 < high <= 100.0
    assert summarise(np.zeros((5, 2)))["Hits@10 last round 95% CI"] == [100.0, 100.0]


def test_record_store_drops_partial_line_and_missing_round_is_error(tmp_path):
    path = tmp_path / "records.jsonl"
    store = RecordStore(path)
    store.append([{"target": "a", "round": 0, "query": "q", "rank": 4}, {"target": "b", "round": 0, "query": "q", "rank": 12}])
    store.append([{"target": "a", "round": 1, "query": "q", "rank": 2}])
    with open(path, "a") as f:
        f.write('{"target": "b", "round": 1, "que')  # killed mid-write
    again = RecordStore(path)
    assert len(again.rows) == 3 and again.next_round("b") == 1 and again.next_round("a") == 2
    assert all(json.loads(line) for line in path.read_text().splitlines())
    with pytest.raises(InputError, match="b round 1"):
        rank_matrix(again.rows, ["a", "b"], rounds=1)
    assert rank_matrix(again.rows, ["a"], rounds=1).tolist() == [[4, 2]]
