"""Fixtures of the iterative-CIR tests: tiny randomly initialised Qwen2-VL and LLaVA folders (the real classes,
processors and chat templates, saved and reloaded with from_pretrained; no hub), and the upstream CIR models."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_llava, save_tiny_qwen2vl

# The words the foundation-model prompts and the Shapes modification texts use (the tiny models' vocabulary).
WORDS = ("a an the it make change to and then also get rid of put add remove move turn into make bigger smaller "
         "small large big tiny red blue green yellow purple violet orange black white grey gray pink brown cyan "
         "circle square triangle star diamond cross heart at in on top bottom left right middle center centre upper "
         "lower of image first second reference target picture half is are was for similar pair write short text that "
         "changes answer with only original modification given find described represent user assistant system").split()


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory) -> Path:
    return save_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl") / "tiny-qwen2-vl", words=WORDS)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava", words=WORDS)


# The round-0 retriever's Q-Formers: small enough to train in seconds (the CIR stage's tests use the same size).
SMALL_RETRIEVER = {"qformer": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 128, "cross_attention_frequency": 1, "max_position_embeddings": 48,
                               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
                   "num_query_tokens": 4, "embed_dim": 64, "max_text_length": 40}
PRETRAIN_SETS, PRETRAIN_PAIRS_PER_SET = 150, 6


def synthetic_triplets(out_dir: Path, n_sets: int, pairs_per_set: int, seed: int):
    """Fresh near-duplicate sets and triplets written by the world's own CIRR task code (the same scenes, edits and
    phrasings as the annotated triplets): the stand-in for the CIR stage's synthetic pretraining triplets (there
    written by the MTST generator). Returns (triplets, {image name: path})."""
    import numpy as np

    from cir.iterative.data import Triplet
    from core.shapes.render import render
    from core.shapes.tasks import cirr as task

    rng = np.random.default_rng((seed, 2024))
    out_dir.mkdir(parents=True, exist_ok=True)
    triplets, paths, seen = [], {}, set()
    for s in range(n_sets):
        members, edits = task._make_set(rng, seen)
        names = [f"pretrain-{s:05d}-img{m}" for m in range(task.SET_SIZE)]
        for name, scene in zip(names, members):
            paths[name] = out_dir / f"{name}.png"
            render(scene, 64).save(paths[name], format="PNG")
        for ref, tgt in task._pick_pairs(rng, pairs_per_set):
            triplets.append(Triplet(f"pretrain{len(triplets)}", names[ref],
                                    task._pair_text(members, edits, ref, tgt, rng), names[tgt], tuple(names)))
    return triplets, paths


@pytest.fixture(scope="session")
def round0_retriever(shapes_world, dense_checkpoint, tmp_path_factory) -> Path:
    """The round-0 model of the loop tests: a composed retriever (the CIR stage's model class, small Q-Formers) on the
    frozen tiny dense image encoder, pretrained on 900 synthetic triplets plus the world's 80 annotated ones, as the
    CIR stage pretrains on synthetic triplets before fine-tuning. The 80 annotated triplets alone leave it at chance
    on the test split; this way it starts well above chance (test R@10 ~ 35-45% vs 8.4% by chance), so the loop
    test can require every round to beat chance clearly."""
    from cir.data import load_cirr
    from cir.iterative.backbones import ComposedRetrieverBackbone
    from cir.iterative.data import Corpus, load_split
    from cir.iterative.evaluate import evaluate_split
    from cir.iterative.trainer import train_round
    from cir.retriever import build_shapes_retriever
    from core.device import seed_everything

    seed_everything(0)
    root = shapes_world / "cirr"
    pretrain, pretrain_paths = synthetic_triplets(tmp_path_factory.mktemp("pretrain"), PRETRAIN_SETS,
                                                  PRETRAIN_PAIRS_PER_SET, seed=0)
    texts = [t.caption for s in ("train", "val", "test") for t in load_cirr(root, s).triplets]
    texts += [t.caption for t in pretrain]
    backbone = ComposedRetrieverBackbone(build_shapes_retriever(dense_checkpoint, texts, SMALL_RETRIEVER),
                                        temperature=0.07)
    train, train_paths = load_split(root, None, "train")
    val, val_paths = load_split(root, None, "val")
    corpus = Corpus({**train_paths, **val_paths, **pretrain_paths})
    corpus.prepare(backbone)
    train_round(backbone, corpus, pretrain + train, epochs=8, batch_size=64, lr=2e-3, weight_decay=0.0,
                warmup_steps=5, temperature=0.07, negatives_per_query=0, seed=0, round_index=0,
                validate=lambda m: evaluate_split(m, corpus, val, sorted(val_paths), 256))
    folder = tmp_path_factory.mktemp("cir") / "retriever"
    backbone.save_pretrained(folder)
    return folder
