"""The MTST generator: trained briefly on the tiny world it reads the images (its text loss on the true pairs is
clearly below the loss on mismatched pairs); folders reload; the real InstructBLIP code path runs at a tiny size."""
from __future__ import annotations


import torch
from PIL import Image

from cir import train_mtst
from cir.data import load_cirr
from cir.features import token_bank
from tests.tiny_models import tiny_instructblip
from core.modtext import build_word_tokenizer, from_instructblip, load_modification_generator


def assert_reads_the_images(gen, world, tmp_path):
    """The generator's text loss on 48 true training pairs is clearly below its loss with other pairs' targets;
    returns the training split and those triplets."""
    train = load_cirr(world / "cirr", "train")
    bank = token_bank(gen.image_encoder, train.images, tmp_path / "tokens")
    trip = train.triplets[:48]
    ref, tgt = bank.get([t.reference for t in trip], "cpu"), bank.get([t.target for t in trip], "cpu")
    texts = [t.caption for t in trip]
    with torch.no_grad():
        matched = gen.loss(ref, tgt, texts).item()
        rolled = gen.loss(ref, tgt.roll(7, dims=0), texts).item()  # images of other pairs
    assert matched < rolled - 0.1, (matched, rolled)
    return train, trip


def test_generator_trains_and_reads_the_images(shapes_world, dense_checkpoint, tmp_path):
    out = tmp_path / "mtst"
    metrics = train_mtst.main([
        "--cirr_root", str(shapes_world / "cirr"), "--dense_checkpoint", str(dense_checkpoint),
        "--data_json", str(shapes_world / "dataset_shapes.json"), "--output_dir", str(out),
        "--lm_steps", "40", "--steps", "250", "--batch_size", "16", "--lr", "3e-3", "--eval_every", "250",
        "--eval_pairs", "20", "--test_pairs", "20", "--max_new_tokens", "12", "--num_query_tokens", "8",
    ])
    assert metrics["model_id"].startswith("mtst/checkpoint-best@") and "ROUGE-L" in metrics["test"]
    gen = load_modification_generator(out / "checkpoint-best", device=torch.device("cpu"))
    train, trip = assert_reads_the_images(gen, shapes_world, tmp_path)
    # the public API reads pixels only and is deterministic
    ims = [Image.open(train.images[t.reference]) for t in trip[:2]]
    tgts = [Image.open(train.images[t.target]) for t in trip[:2]]
    a, b = gen.generate(ims, tgts, max_new_tokens=8, seed=1), gen.generate(ims, tgts, max_new_tokens=8, seed=1)
    assert a == b and len(a) == 2 and all(isinstance(x, str) for x in a)


def test_instructblip_code_path_tiny(tmp_path):
    """What real data runs (pretrained InstructBLIP parts), on a tiny random InstructBLIP: generate, save, reload."""
    from transformers import BlipImageProcessor

    from cir.retriever import ComposedRetriever, retriever_from_instructblip

    tok = build_word_tokenizer(["make the circle red", "remove the star", "How to change from one image to the other image?"])
    model = tiny_instructblip(len(tok))
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    gen = from_instructblip(model, processor, tok, tok).to("cpu")
    assert torch.equal(gen.query_tokens, model.query_tokens)
    ims = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    texts = gen.generate(ims, ims[::-1], max_new_tokens=5)
    assert len(texts) == 2
    gen.save_pretrained(tmp_path / "g")
    again = load_modification_generator(tmp_path / "g", device=torch.device("cpu"))
    assert again.generate(ims, ims[::-1], max_new_tokens=5) == texts and again.model_id == gen.model_id
    spec = {"qformer": {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                        "cross_attention_frequency": 1, "max_position_embeddings": 64},
            "num_query_tokens": 4, "embed_dim": 16, "max_text_length": 16}
    r = retriever_from_instructblip(model, processor, tok, spec).eval()
    px = torch.stack([r.preprocess(i) for i in ims])
    with torch.no_grad():
        q, t = r.encode_queries(px, ["make the circle red", "remove the star"]), r.encode_targets(px)
    assert q.shape == (2, 16) and t.shape == (2, 16)
    r.save_pretrained(tmp_path / "r")
    r2 = ComposedRetriever.from_pretrained(tmp_path / "r", device=torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(r2.encode_queries(px, ["make the circle red", "remove the star"]), q, atol=1e-6)


def test_word_tokenizer_round_trip():
    from core.modtext import detokenize

    tok = build_word_tokenizer(["make the medium-sized square red; remove it?"])
    text = "make the medium-sized square red; remove it?"
    assert detokenize(tok, tok(text)["input_ids"]) == text
    assert "[UNK]" in tok.decode(tok("a zebra")["input_ids"])
