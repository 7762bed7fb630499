"""Unit tests of the iterative loop's parts: the text filter, manifests, same-reference batching and the
contrastive labels with appended negatives (more targets than queries)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cir.iterative import manifest
from cir.iterative.data import Triplet
from cir.iterative.text_filter import TextFilter
from cir.iterative.trainer import batch_targets, same_reference_batches
from cir.losses import query_target_contrastive
from core.errors import InputError


def test_text_filter_rejects_and_counts():
    f = TextFilter(max_words=6)
    original = "Make the red circle blue."
    assert f.check("", original) == "empty"
    assert f.check("  ..  ", original) == "empty"
    assert f.check("one two three four five six seven", original) == "too_long"
    assert f.check("make the RED circle blue", original) == "identical"
    assert f.check("I'm sorry, I cannot help.", original) == "refusal"
    assert f.check("There is no difference", original) == "refusal"
    assert f.check("make the circle green", original) is None
    assert f.summary() == {"kept": 1, "rejected": 6, "rejected_empty": 2, "rejected_too_long": 1,
                           "rejected_identical": 1, "rejected_refusal": 2}


def test_cached_file_is_reused_only_when_its_manifest_matches(tmp_path):
    path = tmp_path / "hard_negatives_iter_1.json"
    m = {"round": 1, "model": "abc", "config": "123"}
    path.write_text(json.dumps({"manifest": m, "data": {"x": 1}}))
    assert manifest.read_cached(path, m) == {"x": 1}
    assert manifest.read_cached(path, {**m, "model": "abd"}) is None       # another checkpoint
    assert manifest.read_cached(path, {**m, "config": "124"}) is None      # another config
    path.write_text(json.dumps({"data": {"x": 1}}))                         # right name, no manifest
    assert manifest.read_cached(path, m) is None
    path.write_text("{torn")
    assert manifest.read_cached(path, m) is None


def test_folder_hash_follows_content_not_name(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "model.pt").write_bytes(b"weights")
        (d / "meta.json").write_text(json.dumps({"d": str(d)}))  # bookkeeping: not part of the hash
    assert manifest.hash_folder(a) == manifest.hash_folder(b)
    (b / "model.pt").write_bytes(b"weights2")
    assert manifest.hash_folder(a) != manifest.hash_folder(b)


def _t(i, ref, target, negatives=()):
    return Triplet(str(i), ref, f"text {i}", target, (), tuple(negatives))


def test_same_reference_batches_keep_groups_together():
    triplets = [_t(i, f"ref{i % 7}", f"tgt{i}") for i in range(40)]
    batches = same_reference_batches(triplets, batch_size=8, rng=np.random.default_rng(0))
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert all(len(b) <= 8 for b in batches)
    where = {}
    for k, b in enumerate(batches):
        for i in b:
            where.setdefault(triplets[i].reference, set()).add(k)
    assert all(len(v) == 1 for v in where.values())  # groups of <= 8 are never split


def test_appended_negatives_keep_labels_right():
    """More targets than queries: column i stays query i's positive; appended hard negatives only add negatives,
    an appended image that is already a column is not duplicated, and a duplicate target is not a negative."""
    batch = [_t(0, "r0", "a", ["h0", "b"]), _t(1, "r0", "b", ["h1"]), _t(2, "r2", "a", [])]
    targets = batch_targets(batch, negatives_per_query=2)
    assert targets == ["a", "b", "a", "h0", "h1"]
    torch.manual_seed(0)
    emb = {n: F.normalize(torch.randn(16), dim=0) for n in ("a", "b", "h0", "h1")}
    q = torch.stack([emb["a"], emb["b"], emb["a"]])
    t = torch.stack([emb[n] for n in targets])
    loss = query_target_contrastive(q, t, 0.1, target_ids=targets)
    # by hand: query 0's negatives are b, h0, h1 (column 2 is the same image a: masked), and so on
    logits = q @ t.T / 0.1
    manual = []
    for i in range(3):
        keep = [j for j in range(5) if j == i or targets[j] != targets[i]]
        manual.append(-(logits[i, i] - torch.logsumexp(logits[i, keep], 0)))
    assert torch.allclose(loss, torch.stack(manual).mean(), atol=1e-5)
    # a perfect hard negative (equal to the positive) must raise the loss: it is counted as a negative
    t_bad = t.clone()
    t_bad[3] = emb["a"]
    assert query_target_contrastive(q, t_bad, 0.1, target_ids=targets) > loss


def test_bad_options_fail_before_any_work(tmp_path):
    from cir.iterative import train_iterative as ti

    model = tmp_path / "model"
    model.mkdir()
    base = ["--data_dir", str(tmp_path), "--model_path", str(model), "--foundation_model_path", str(model),
            "--experiment_dir", str(tmp_path / "exp")]
    cases = [(["--model_backbone", "clip"], "model_backbone"),
             (["--model_path", str(tmp_path / "nope")], "model_path"),
             (["--foundation_model_backbone", "gpt4"], "foundation_model_backbone"),
             (["--hard_negative_k", "0"], "hard_negative_k"),
             (["--resume_from_iteration", "9"], "resume_from_iteration"),
             (["--no_such_option", "1"], "no_such_option")]
    for extra, field in cases:
        with pytest.raises(InputError) as err:
            ti.main(base + extra)
        assert err.value.field == field
    with pytest.raises(InputError, match="split.rc2.train.json"):  # no CIRR files: the loader names the file
        ti.main(base)
    assert not (tmp_path / "exp").exists()  # nothing written


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    """Half-written temporaries (core.io's `.{name}.*.tmp`) are removed; a `.{name}.old` folder left by a kill between
    atomic_dir's two renames is the complete previous version and is put back when `{name}` is missing."""
    from cir.iterative import train_iterative as ti

    exp = tmp_path / "exp"
    (exp / "training_iter_2" / ".checkpoint-last.ab12.tmp").mkdir(parents=True)
    (exp / ".hard_negatives_iter_2.json.cd34.tmp").write_text('{"manif')
    (exp / ".checkpoint_iter_1.old").mkdir()
    (exp / ".checkpoint_iter_1.old" / "model.pt").write_bytes(b"round 1")
    (exp / "checkpoint_iter_3").mkdir()
    (exp / ".checkpoint_iter_3.old").mkdir()
    (exp / "hard_negatives_iter_1.json").write_text("{}")
    assert ti.clean_stale_temporaries(exp) == 3
    assert (exp / "checkpoint_iter_1" / "model.pt").read_bytes() == b"round 1"
    assert sorted(p.name for p in exp.iterdir()) == ["checkpoint_iter_1", "checkpoint_iter_3", "hard_negatives_iter_1.json",
                                                     "training_iter_2"]
    assert not list((exp / "training_iter_2").iterdir())
