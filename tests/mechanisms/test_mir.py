"""The MIR loop's score, asserted so that it fails when hits stop being cumulative: a target found at round r
(rank < 10) stays found at every later round even when a later query loses it, as ChatIR counts Hits@10. The
records are written in the loop's own store for the tiny world's test targets and read back by the report."""
from __future__ import annotations

import json

import numpy as np

from core.io import atomic_write_json
from mir.records import RecordStore
from mir.report import build_rows

ROUNDS = 4


def test_a_target_found_once_stays_found(shapes_world, tmp_path):
    targets = [d["img"] for d in json.loads((shapes_world / "chatir/dialogues_test.json").read_text())][:40]
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 40, size=(len(targets), ROUNDS + 1))
    ranks[0] = [30, 2, 25, 25, 25]  # found at round 1, lost again by the refined queries
    ranks[1] = [0, 12, 15, 11, 40]  # found at round 0 only
    store = RecordStore(tmp_path / "prediction" / "records.jsonl")
    store.append({"target": t, "round": r, "query": f"query {r}", "rank": int(ranks[i, r]),
                  "query_tokens_truncated": False} for i, t in enumerate(targets) for r in range(ROUNDS + 1))
    atomic_write_json(tmp_path / "prediction" / "run.json", {"targets": targets, "rounds": ROUNDS})
    hits = build_rows(tmp_path, ["prediction"])[0]["prediction"]["Hits@10"]

    found_by = np.minimum.accumulate(ranks, axis=1) < 10  # found at this round or before
    assert hits == [100.0 * found_by[:, r].mean() for r in range(ROUNDS + 1)]
    assert all(later >= earlier for earlier, later in zip(hits, hits[1:]))
    per_round = [100.0 * (ranks[:, r] < 10).mean() for r in range(ROUNDS + 1)]
    assert hits != per_round and hits[-1] > per_round[-1]  # the lost targets still count


def test_seconds_per_target_sums_each_targets_share_of_every_round(tmp_path):
    from mir.report import seconds_per_target

    records = [{"target": t, "round": r, "seconds_generate": 0.25, "seconds_user": 0.5, "seconds_retrieve": 0.25,
                "rank": 3, "seed": 7} for t in ("a", "b") for r in range(3)]
    records[0]["seconds_caption"] = 1.0  # round 0 of the faithful loop also captions the target
    assert seconds_per_target(records, 2) == (2 * 3 * 1.0 + 1.0) / 2  # the rank and seed fields are not seconds
