"""The original ComGTIR-D's initialisation: code-token embeddings and the set head from the RQ-VAE codebook (mapped
to d_model when the sizes differ), the set head's max pooling over the query's own tokens, and the trainer reading
the codebook from the RQ-VAE run folder of its config (an error naming the file when it does not fit)."""
from __future__ import annotations

import pytest
import torch

from core.errors import InputError
from retriever.generative.model import codebook_projection, init_from_codebook, pool_states
from tests.comgtir.test_comgtir_decoding import TINY_T5, tiny_model

LEVELS, K = 3, 5


def _codebooks(shared: bool, dim: int) -> torch.Tensor:
    return torch.randn(1 if shared else LEVELS, K, dim, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dim", [TINY_T5["d_model"], 12, 80])  # equal to d_model (copied as is), narrower, wider
def test_code_token_embeddings_are_the_mapped_codebook_rows(shared, dim):
    model, _, vocab = tiny_model(levels=LEVELS, k=K, suffix=2, shared=shared)
    embeddings = model.t5.get_input_embeddings().weight
    suffix_before = embeddings[vocab.token_ids[LEVELS, :2]].clone()
    books = _codebooks(shared, dim)
    proj = init_from_codebook(model, vocab, books)
    assert proj.shape == (dim, TINY_T5["d_model"])
    for level in range(LEVELS):
        for code in range(K):
            row = books[0 if shared else level, code]
            got = embeddings[vocab.token_ids[level, code]]
            assert torch.allclose(got, row @ proj, atol=1e-5)
            if dim == TINY_T5["d_model"]:
                assert torch.equal(got, row)  # the original's direct copy
            elif dim < TINY_T5["d_model"]:
                assert got.norm().item() == pytest.approx(row.norm().item(), rel=1e-4)  # an isometry into d_model
    assert torch.equal(embeddings[vocab.token_ids[LEVELS, :2]], suffix_before)  # the suffix has no code vector
    assert model.t5.lm_head.weight.data_ptr() == embeddings.data_ptr()  # T5 ties them: the LM head starts there too


def test_the_projection_keeps_inner_products_and_is_fixed_by_its_seed():
    proj = codebook_projection(12, 32, seed=3)
    assert torch.allclose(proj @ proj.T, torch.eye(12), atol=1e-5)
    assert torch.equal(proj, codebook_projection(12, 32, seed=3))
    assert not torch.allclose(proj, codebook_projection(12, 32, seed=4))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_set_head_starts_from_the_codebook_rows(shared, head):
    model, tok, vocab = tiny_model(levels=LEVELS, k=K, shared=shared, set_head=head)
    books = _codebooks(shared, 12)
    proj = init_from_codebook(model, vocab, books)
    out = model.set_head[-1]
    expected = (books @ proj).reshape(-1, TINY_T5["d_model"])  # set element level·K + code, or the shared book's code
    assert out.weight.shape == (model.spec.set_size, TINY_T5["d_model"])
    assert torch.allclose(out.weight, expected, atol=1e-6) and not out.bias.any()
    if not shared:  # element level·K + code is the embedding of code token (level, code)
        emb = model.t5.get_input_embeddings().weight
        assert torch.allclose(out.weight, emb[vocab.token_ids[:LEVELS, :K].reshape(-1)], atol=1e-6)
    if head == "linear":  # the original's head: a code's score is the pooled query against the code's vector
        batch = tok(["a red circle"], return_tensors="pt")
        with torch.no_grad():
            hidden = model.encode(batch["input_ids"], batch["attention_mask"])
            logits = model.set_logits(hidden, batch["attention_mask"])
        pooled = pool_states(hidden, batch["attention_mask"], model.spec.set_pooling)
        assert torch.allclose(logits, pooled @ expected.T, atol=1e-5)


def test_max_pooling_ignores_the_padding_positions():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    hidden[0, 3:] = 100.0  # padding positions far above every real one: they must not win the max
    pooled = pool_states(hidden, mask, "max")
    assert torch.equal(pooled[0], hidden[0, :3].amax(0))
    assert torch.equal(pooled[1], hidden[1].amax(0))


def _train(tmp_path, data, codes, rqvae, *extra):
    from retriever.generative import train

    # lr 0: one step leaves the weights at their initialisation, so the checkpoint shows what the trainer built
    return train.main(["--stage", "seqid", "--data_dir", str(data), "--codes", str(codes), "--rqvae", str(rqvae),
                       "--output_dir", str(tmp_path / "s1"), "--model", '{"d_model": 32, "d_kv": 8, "d_ff": 64, '
                       '"num_layers": 1, "num_decoder_layers": 1, "num_heads": 4}', "--max_steps", "1", "--lr", "0",
                       "--batch_size", "16", "--num_beams", "2", "--max_val_queries", "4", *extra])


def test_the_trainer_initialises_from_the_codebook_of_its_rqvae_run(tmp_path, comgtir_data, codes_path):
    from retriever.generative.model import load_retriever
    from rqvae.train import load_rqvae

    codes, _, rq = codes_path
    best = _train(tmp_path, comgtir_data, codes, rq / "rqvae", "--code_init", "codebook", "--set_pooling", "max",
                  "--set_head", "linear")
    model, _, vocab, _ = load_retriever(best)
    assert (model.spec.set_pooling, model.spec.set_head) == ("max", "linear")  # kept in retriever.json
    books = load_rqvae(rq / "rqvae" / "checkpoint-best").quantizer.codebooks.detach()
    mapped = books @ codebook_projection(books.shape[-1], 32, seed=0)
    emb = model.t5.get_input_embeddings().weight
    for level in range(vocab.levels):
        assert torch.allclose(emb[vocab.token_ids[level, :vocab.codebook_size]], mapped[level], atol=1e-5)
    assert torch.allclose(model.set_head[-1].weight, mapped.reshape(-1, 32), atol=1e-5)


def test_a_codebook_that_does_not_fit_the_vocabulary_is_refused_before_work(tmp_path, comgtir_data, codes_path):
    import json

    from rqvae.codes import Identifiers

    codes, _, rq = codes_path
    doc = json.loads(codes.read_text())
    other = tmp_path / "codes.json"  # the same images under a vocabulary of 3 levels instead of the RQ-VAE's 2
    for entry in doc["images"].values():
        entry["seq"] = entry["seq"][:-1] + [0] + entry["seq"][-1:]
        entry["set"] = sorted(entry["set"] + [2 * doc["codebook_size"]])
    doc.update(levels=3, id_length=4, set_size=3 * doc["codebook_size"])
    other.write_text(json.dumps(doc))
    Identifiers(other)  # a valid codes.json in itself
    with pytest.raises(InputError, match=r"model\.pt.*quantizer\.codebooks"):
        _train(tmp_path, comgtir_data, other, rq / "rqvae", "--code_init", "codebook")
    with pytest.raises(InputError, match="rqvae.json is missing"):
        _train(tmp_path, comgtir_data, codes, tmp_path / "nowhere", "--code_init", "codebook")
    assert not (tmp_path / "s1").exists()


def test_a_checkpoint_keeps_its_set_head_form(tmp_path, comgtir_data, codes_path):
    codes, _, rq = codes_path
    best = _train(tmp_path, comgtir_data, codes, rq / "rqvae")  # random init, mean pooling, MLP head
    from retriever.generative import train

    with pytest.raises(InputError, match="set_pooling"):
        train.main(["--stage", "setid", "--init", str(best), "--data_dir", str(comgtir_data), "--codes", str(codes),
                    "--output_dir", str(tmp_path / "s2"), "--set_pooling", "max", "--max_steps", "1"])
