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
             (["--no_such_option", "1"], "no_such_option"),
             (["--model_backbone", "qwen2_vl", "--model_adapter", str(tmp_path / "no_adapter")], "model_adapter"),
             (["--model_backbone", "qwen2_vl", "--model_adapter", str(model)], "model_adapter"),  # no peft files
             (["--model_backbone", "qwen2_vl", "--lora_r", "0"], "lora_r"),
             (["--model_backbone", "qwen2_vl", "--max_pixels", "-1"], "max_pixels")]
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


def _embeddings(names, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: F.normalize(torch.randn(dim, generator=g), dim=0) for n in names}


def test_share_loss_in_one_process_is_the_cited_loss():
    """One process, one share: the trainer's loss is cir.losses.query_target_contrastive (L_q2t of PTHA), appended
    hard negatives and a duplicated target included."""
    from cir.iterative.trainer import share_contrastive, step_share

    batch = [_t(0, "r0", "a", ["h0", "b"]), _t(1, "r0", "b", ["h1"]), _t(2, "r2", "a", [])]
    queries, targets, share = step_share(batch, negatives_per_query=2)
    assert [q.pairid for q in queries] == ["0", "1", "2"] and targets == ["a", "b", "a", "h0", "h1"]
    emb = _embeddings(["a", "b", "h0", "h1", "q0", "q1", "q2"])
    q = torch.stack([emb["q0"], emb["q1"], emb["q2"]])
    t = torch.stack([emb[n] for n in targets])
    assert torch.allclose(share_contrastive(q, t, 0.1, share), query_target_contrastive(q, t, 0.1, target_ids=targets),
                          atol=1e-6)


@pytest.mark.parametrize("size", [1, 3, 6])
def test_two_ranks_shares_add_up_to_the_global_batch(size, monkeypatch):
    """Two ranks without processes: each rank's padded share, targets gathered in rank order (the padding rows
    dropped), and the loss scaled by world / B: the mean of the two ranks' losses and of their gradients is the global
    batch's, for even, uneven and one-query batches (where rank 0 holds padding only)."""
    from cir.iterative import sharding
    from cir.iterative.trainer import share_contrastive, step_share
    from core.distributed import DistInfo

    batch = [_t(i, f"r{i % 2}", f"tgt{i % 4}", [f"neg{i}"]) for i in range(size)]
    names = [f"tgt{i}" for i in range(4)] + [f"neg{i}" for i in range(size)] + [f"q{i}" for i in range(size)]
    base = _embeddings(names)
    _, targets, share = step_share(batch, negatives_per_query=1)
    whole = {n: base[n].clone().requires_grad_(True) for n in names}
    loss = share_contrastive(torch.stack([whole[f"q{i}"] for i in range(size)]),
                             torch.stack([whole[n] for n in targets]), 0.1, share)
    loss.backward()

    ranks = [DistInfo(rank=r, world_size=2) for r in range(2)]
    shares = [step_share(batch, 1, info) for info in ranks]
    assert len({len(s[0]) for s in shares}) == 1 and len({len(s[1]) for s in shares}) == 1  # equal shapes to gather
    split = {n: base[n].clone().requires_grad_(True) for n in names}
    both = torch.cat([torch.stack([split[n] for n in s[1]]) for s in shares])  # what all_gather returns
    monkeypatch.setattr(sharding, "gather_with_grad", lambda rows, info: both)
    total = 0
    for info, (queries, mine, part) in zip(ranks, shares):
        gathered = sharding.gather_share_rows(torch.stack([split[n] for n in mine]), len(part.target_ids), info)
        assert torch.equal(gathered.detach(), torch.stack([base[n] for n in targets]))  # global order, no padding
        q = torch.stack([split[f"q{t.pairid}"] for t in queries])
        total = total + share_contrastive(q, gathered, 0.1, part, world_size=2) / 2  # DDP's average over ranks
    total.backward()
    assert torch.allclose(total, loss, atol=1e-6)
    grad = lambda x: x.grad if x.grad is not None else torch.zeros_like(x)  # noqa: E731 (an unused target: none)
    for n in names:
        assert torch.allclose(grad(split[n]), grad(whole[n]), atol=1e-6), n


def _write_pngs(folder, n):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in range(n):
        paths[f"img{i}"] = folder / f"img{i}.png"
        Image.new("RGB", (8, 8), (30 * i, 255 - 20 * i, 7 * i)).save(paths[f"img{i}"])
    return paths


def test_token_cache_is_written_reused_and_rebuilt(tmp_path):
    """The frozen encoder's tokens go to a float16 cache on disk, read back by memory map; it is reused while
    encoder, preprocessing and image list are the same, and rebuilt when one changes."""
    from cir.iterative.data import Corpus, TokenCache, token_cache
    from core.data import LoaderOptions

    calls = []

    def encode(pixels):  # [B, 3, 8, 8] -> tokens [B, 4, 3]: the mean colour of each quarter
        calls.append(len(pixels))
        return F.avg_pool2d(pixels, 4).flatten(2).transpose(1, 2)

    def preprocess(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)

    paths = _write_pngs(tmp_path / "images", 5)
    options = LoaderOptions(num_workers=0)
    corpus = Corpus(paths, cache_dir=tmp_path / "cache", options=options)
    cache = token_cache(corpus, encode, preprocess, {"encoder": "e1"}, batch_size=2, device=torch.device("cpu"))
    assert isinstance(cache, TokenCache) and sum(calls) > 0
    stored = np.load(tmp_path / "cache" / "corpus-tokens.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (5, 12)
    want = torch.stack([encode(preprocess(corpus.image(n))[None])[0] for n in corpus.names])
    assert torch.allclose(cache.batch([0, 1, 2, 3, 4]), want, atol=1e-3)
    assert torch.equal(cache.batch([3, 1]), cache.batch([0, 1, 2, 3, 4])[[3, 1]])
    calls.clear()
    token_cache(corpus, encode, preprocess, {"encoder": "e1"}, 2, torch.device("cpu"))
    assert calls == []                                                   # same maker and images: reused
    token_cache(corpus, encode, preprocess, {"encoder": "e2"}, 2, torch.device("cpu"))
    assert sum(calls) >= 5                                               # another encoder: rebuilt
    calls.clear()
    more = Corpus({**paths, **_write_pngs(tmp_path / "more", 6)}, cache_dir=tmp_path / "cache", options=options)
    more.paths["img5"] = tmp_path / "more" / "img5.png"
    assert len(token_cache(more, encode, preprocess, {"encoder": "e2"}, 2, torch.device("cpu"))) == 6
    assert sum(calls) >= 6                                               # another image list: rebuilt


def test_a_corrupt_image_is_an_input_error_naming_it(tmp_path):
    from cir.iterative.data import Corpus, token_cache
    from core.data import LoaderOptions

    paths = _write_pngs(tmp_path / "images", 3)
    paths["img2"].write_bytes(paths["img2"].read_bytes()[:40])  # truncated
    corpus = Corpus(paths, listed_in={n: tmp_path / "split.rc2.train.json" for n in paths},
                    cache_dir=tmp_path / "cache", options=LoaderOptions(num_workers=0))
    with pytest.raises(InputError, match="img2.png") as err:
        token_cache(corpus, lambda p: p.flatten(2).transpose(1, 2), lambda im: torch.zeros(3, 2, 2), {}, 2,
                    torch.device("cpu"))
    assert "split.rc2.train.json" in str(err.value)
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing half-written under a final name
    with pytest.raises(InputError, match="img2.png"):
        corpus.files().batch([0, 2])
