"""The ComGTIR trainers under torchrun: two ranks (gloo, CPU) and one rank on the same global batch end a few
optimizer steps with the same weights — the RQ-VAE (k-means start, a dead-code restart, the in-batch caption
alignment), the generative retriever's unified stage (sequence loss and the set loss over the global batch's
images) and the ITM head (hard-negative groups, the image-token cache made in shards). A batch the ranks cannot
share evenly is refused before any work."""
from __future__ import annotations

import json

import pytest
import torch

from core.checkpoint import LAST
from core.errors import InputError
from tests.distributed import assert_same_state, load_state, run_torchrun

T5 = '{"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4, "dropout_rate": 0.0}'


def one_and_two_ranks(module: str, args: list[str], out) -> tuple:
    """checkpoint-last/model.pt of the same run with one process and with two."""
    for n in (1, 2):
        run_torchrun(module, [*args, "--output_dir", str(out / f"ranks{n}")], nproc=n)
    return out / "ranks1" / LAST / "model.pt", out / "ranks2" / LAST / "model.pt"


def moved(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_rqvae_two_ranks_train_as_one(dense_run, tmp_path):
    from rqvae.model import RQVAE, RQVAESpec

    # 400 images, batch 128: 3 steps; the codebooks start from k-means, codes used < 4 times are restarted at step 2
    one, two = one_and_two_ranks("rqvae.train", [
        "--emb_dir", dense_run / "emb", "--epochs", "1", "--batch_size", "128", "--levels", "2",
        "--codebook_size", "16", "--restart_every", "2", "--restart_threshold", "4"], tmp_path)
    assert_same_state(one, two)
    spec = RQVAESpec(**json.loads((one.parent / "rqvae.json").read_text()))
    torch.manual_seed(0)  # the trainer's seed: its initial weights
    start = RQVAE(spec).state_dict()
    assert moved(load_state(one)["encoder.0.weight"], start["encoder.0.weight"]) > 5e-4


@pytest.fixture(scope="module")
def retriever_data(comgtir_data, codes_path, tmp_path_factory):
    """Retriever training data for the tiny world and a stage-1 model trained two steps (no dropout)."""
    from retriever.generative import train

    codes, _, _ = codes_path
    out = tmp_path_factory.mktemp("comgtir-dist")
    s1 = train.main(["--stage", "seqid", "--data_dir", str(comgtir_data), "--codes", str(codes), "--model", T5,
                     "--output_dir", str(out / "s1"), "--max_steps", "2", "--batch_size", "64",
                     "--max_val_queries", "10", "--num_beams", "2"])
    return comgtir_data, codes, s1


def test_unified_stage_two_ranks_train_as_one(retriever_data, tmp_path):
    data, codes, s1 = retriever_data
    # batch 32 of ~3000 queries over 580 images: some batches hold an image twice (no negative of itself)
    one, two = one_and_two_ranks("retriever.generative.train", [
        "--stage", "unified", "--init", s1, "--data_dir", data, "--codes", codes, "--max_steps", "3",
        "--batch_size", "32", "--lr", "1e-3", "--warmup_steps", "1", "--max_val_queries", "10", "--num_beams", "2"],
        tmp_path)
    assert_same_state(one, two)
    start = load_state(s1 / "model.pt")
    final = load_state(one)
    assert moved(final["set_head.0.weight"], start["set_head.0.weight"]) > 5e-4  # the set loss trained
    assert moved(final["t5.decoder.block.0.layer.0.SelfAttention.q.weight"],
                 start["t5.decoder.block.0.layer.0.SelfAttention.q.weight"]) > 5e-4  # and the sequence loss


def test_itm_two_ranks_train_as_one(shapes_world, dense_run, tmp_path):
    # 96 queries, batch 32: 3 steps, each query against its image and 3 hard negatives
    one, two = one_and_two_ranks("retriever.generative.train_itm", [
        "--dense_checkpoint", dense_run / "checkpoint-best", "--emb_dir", dense_run / "emb",
        "--data_json", shapes_world / "dataset_shapes.json", "--image_root", shapes_world / "images",
        "--width", "32", "--layers", "1", "--dropout", "0", "--epochs", "1", "--queries_per_epoch", "96",
        "--batch_size", "32", "--lr", "1e-3", "--val_queries", "20", "--val_depth", "5", "--num_workers", "0"],
        tmp_path)
    # The head's bias shifts the logits of a query's group alike: the group softmax gives it no gradient but float
    # noise, which Adam turns into steps of about lr·|g|/(|g| + eps) in the noise's direction. Compare the rest.
    for name, path in (("one", one), ("two", two)):
        state = load_state(path)
        del state["head.1.bias"]
        torch.save(state, tmp_path / f"{name}.pt")
    assert_same_state(tmp_path / "one.pt", tmp_path / "two.pt")
    assert moved(load_state(one)["head.1.weight"], torch.zeros(1)) > 5e-4  # the head starts at zero
    # the two ranks cached the image tokens in one shard each
    manifest = json.loads((tmp_path / "ranks2" / "cache" / "image_tokens_train.shards.json").read_text())
    assert len(manifest["shards"]) == 2


@pytest.mark.parametrize("entry", ["rqvae.train", "retriever.generative.train", "retriever.generative.train_itm"])
def test_a_batch_the_ranks_cannot_share_is_refused_before_work(entry, monkeypatch, tmp_path):
    import importlib

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # nothing the run would read exists: the batch is checked first
    with pytest.raises(InputError, match="cannot be split evenly over 2 processes"):
        importlib.import_module(entry).main(["--batch_size", "5", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
