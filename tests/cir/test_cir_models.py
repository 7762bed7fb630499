"""The composed retriever and the MTST generator on the tiny world: the embedding the loss trains is the one search
uses; short training beats chance; folders reload; the real-model code paths run with tiny random InstructBLIPs."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from cir.data import load_cirr
from cir.evaluate import evaluate_model
from cir.features import LiveTokens, token_bank
from cir.retriever import ComposedRetriever, build_shapes_retriever
from cir.train import TrainConfig, batch_targets, fit, step_loss

SMALL = {"qformer": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
                     "cross_attention_frequency": 1, "max_position_embeddings": 48,
                     "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
         "num_query_tokens": 4, "embed_dim": 64, "max_text_length": 40}


@pytest.fixture(scope="module")
def cir_data(shapes_world):
    root = shapes_world / "cirr"
    return load_cirr(root, "train"), load_cirr(root, "val")


@pytest.fixture(scope="module")
def retriever(dense_checkpoint, cir_data):
    torch.manual_seed(0)
    return build_shapes_retriever(dense_checkpoint, [t.caption for t in cir_data[0].triplets], SMALL)


def _pixels(model, split, names):
    return torch.stack([model.preprocess(Image.open(split.images[n]).convert("RGB")) for n in names])


def test_training_embedding_is_the_search_embedding(retriever, cir_data, tmp_path):
    train, _ = cir_data
    batch = train.triplets[:6]
    live = LiveTokens(retriever.image_encoder, train.images, device=torch.device("cpu"))
    cached = token_bank(retriever.image_encoder, train.images, tmp_path / "tokens")
    _, names = batch_targets(batch, True, True)
    retriever.eval()
    with torch.no_grad():
        # what step_loss trains (the tower run live on the loader's batches) == what encode_queries / encode_targets
        # return from pixels
        (tokens,) = live.batches([[t.reference for t in batch] + names])
        trained_q, _ = retriever.encode_queries_with_prototype(tokens.get([t.reference for t in batch], "cpu"),
                                                               [t.caption for t in batch])
        served_q = retriever.encode_queries(_pixels(retriever, train, [t.reference for t in batch]),
                                            [t.caption for t in batch])
        trained_t = retriever.encode_targets_from_tokens(tokens.get(names, "cpu"))
        served_t = retriever.encode_targets(_pixels(retriever, train, names))
        # ... and from the float16 cache, up to its rounding
        cached_q = retriever.encode_queries_from_tokens(cached.get([t.reference for t in batch], "cpu"),
                                                        [t.caption for t in batch])
        cached_t = retriever.encode_targets_from_tokens(cached.get(names, "cpu"))
        # the padding mask: a query's embedding does not depend on the other (longer) texts in its batch
        alone = retriever.encode_queries_from_tokens(cached.get([batch[0].reference], "cpu"), [batch[0].caption])
        padded = retriever.encode_queries_from_tokens(cached.get([batch[0].reference] * 2, "cpu"),
                                                      [batch[0].caption, batch[0].caption + " and " * 10 + "more"])
    assert torch.allclose(trained_q, served_q, atol=1e-5) and torch.allclose(trained_t, served_t, atol=1e-5)
    assert torch.allclose(cached_q, served_q, atol=5e-3) and torch.allclose(cached_t, served_t, atol=5e-3)
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert torch.allclose(served_q.norm(dim=-1), torch.ones(len(batch)), atol=1e-5)


def test_ptha_step_and_save_reload(retriever, cir_data, tmp_path):
    train, _ = cir_data
    bank = token_bank(retriever.image_encoder, train.images, tmp_path / "tokens")
    reverse = {t.pairid: f"undo: {t.caption}" for t in train.triplets}
    cfg = TrainConfig(objective="ptha")
    retriever.train()
    loss, parts = step_loss(retriever, train.triplets[:8], bank, reverse, cfg)
    loss.backward()
    assert set(parts) == {"q2t", "t2t", "p2p"} and torch.isfinite(loss)
    expected = parts["q2t"] + parts["t2t"] + 0.5 * parts["p2p"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    retriever.zero_grad()
    retriever.save_pretrained(tmp_path / "r")
    again = ComposedRetriever.from_pretrained(tmp_path / "r", device=torch.device("cpu"))
    retriever.eval()
    with torch.no_grad():
        x = bank.get([train.triplets[0].reference], "cpu")
        assert torch.allclose(retriever.encode_queries_from_tokens(x, ["make it red"]),
                              again.encode_queries_from_tokens(x, ["make it red"]), atol=1e-6)


def assert_fits_its_training_triplets(model, train, tmp_path) -> None:
    """30 epochs on `train`: the best checkpoint's subset Rs@1 on those triplets clears 40 % (chance 20 %) and gains
    15 points over the untrained model; writes under tmp_path/run."""
    bank = token_bank(model.image_encoder, train.images, tmp_path / "tokens")
    before = evaluate_model(model, train, bank)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), epochs=30, batch_size=32, lr=3e-3, warmup_steps=5,
                      temperature=0.1)
    fit(model, train, bank, train, bank, None, cfg)
    best = ComposedRetriever.from_pretrained(tmp_path / "run" / "checkpoint-best", device=torch.device("cpu"))
    after = evaluate_model(best, train, bank)
    assert after["Rs@1"] > 40.0 and after["Rs@1"] > before["Rs@1"] + 15.0, (before, after)


def test_retriever_training_fits_its_training_triplets(dense_checkpoint, cir_data, tmp_path):
    """A few epochs on the annotated training triplets: the subset ranking (5 near-duplicates) of those same triplets
    must be learnt well above chance (Rs@1 = 20%). This shows that the loss trains the model, not that it generalises:
    80 triplets do not (trained this way and selected on val, the 30 val triplets went from Rs@1 23.3 to 26.7);
    held-out recall is asserted where the data allow it (tests/cir/iterative, FashionIQ's val)."""
    train, _ = cir_data
    torch.manual_seed(0)
    model = build_shapes_retriever(dense_checkpoint, [t.caption for t in train.triplets], SMALL)
    assert_fits_its_training_triplets(model, train, tmp_path)
    assert (tmp_path / "run" / "checkpoint-last" / "training_state.pt").is_file()
