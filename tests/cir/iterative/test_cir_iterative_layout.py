"""The experiment folder's names as the seed's tree gives them: a hard-negative file is numbered by the model that
mined it, so the first round's mining (with the round-0 model) is hard_negatives_iter_0.json, while augmented samples
and checkpoints carry the round they make."""
from __future__ import annotations

import json

from cir.iterative import train_iterative as ti


def test_the_first_rounds_mining_is_iter_0(tmp_path):
    assert ti.hard_negatives_file(tmp_path, 1).name == "hard_negatives_iter_0.json"
    assert ti.hard_negatives_file(tmp_path, 3).name == "hard_negatives_iter_2.json"
    assert ti.checkpoint_dir(tmp_path, 1).name == "checkpoint_iter_1"


def test_a_rounds_row_reports_the_mining_it_trained_with(tmp_path):
    def write(name, stats):
        (tmp_path / name).write_text(json.dumps({"manifest": {}, "data": {"stats": stats}}))

    write("hard_negatives_iter_0.json", {"queries": 80, "missed_top1": 60, "missed_top1_%": 75.0})
    write("hard_negatives_iter_1.json", {"queries": 80, "missed_top1": 40, "missed_top1_%": 50.0})
    write("augmented_samples_iter_1.json", {"kept": 50, "rejected": 10})
    assert ti.round_stats(tmp_path, 1) == {"mined_queries": 80, "missed_top1": 60, "missed_top1_%": 75.0,
                                           "aug_kept": 50, "aug_rejected": 10}
    assert ti.round_stats(tmp_path, 2)["missed_top1"] == 40
    assert ti.round_stats(tmp_path, 0) == {}
