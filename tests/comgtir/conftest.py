"""ComGTIR fixtures: identifiers for the tiny world (an RQ-VAE trained on the dense fixture's embeddings)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def codes_path(dense_run, tmp_path_factory):
    """(codes.json path, tokenizer report row, folder) for the tiny world, 2 levels × 16 codes."""
    from rqvae import generate_codes
    from rqvae import train as rqvae_train

    out = tmp_path_factory.mktemp("rqvae")
    rqvae_train.main(["--emb_dir", str(dense_run / "emb"), "--output_dir", str(out / "rqvae"), "--epochs", "100",
                      "--batch_size", "128", "--levels", "2", "--codebook_size", "16", "--restart_every", "10"])
    row = generate_codes.main(["--checkpoint", str(out / "rqvae" / "checkpoint-best"), "--emb_dir", str(dense_run / "emb"),
                               "--output", str(out / "codes.json"), "--summary", str(out / "results.json")])
    return out / "codes.json", row, out


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory):
    """A tiny random BLIP saved twice with its real processor (32 px images, a word-level BERT tokenizer), no hub:
    `itm/` (BlipForImageTextRetrieval) and `captioner/` (BlipForConditionalGeneration), loadable by path."""
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,
                              BlipImageProcessor, BlipProcessor)

    folder = tmp_path_factory.mktemp("blip")
    words = "a an the red blue green yellow circle square triangle star top bottom left right middle small large"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words.split(), ".", ","]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizerFast(vocab_file=str(folder / "vocab.txt")))
    config = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3, "bos_token_id": 5},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    for cls, name in [(BlipForImageTextRetrieval, "itm"), (BlipForConditionalGeneration, "captioner")]:
        cls(config).save_pretrained(folder / name)
        processor.save_pretrained(folder / name)
    return folder


@pytest.fixture(scope="session")
def comgtir_data(shapes_world, codes_path, tmp_path_factory):
    """The retriever's training data for the tiny world: pseudo queries, then `prepare_dataset`'s folder."""
    from retriever.generative import prepare_dataset
    from tools import generate_pseudo_query

    codes, _, _ = codes_path
    out = tmp_path_factory.mktemp("comgtir_data")
    generate_pseudo_query.main(["--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root",
                                str(shapes_world / "images"), "--scenes", str(shapes_world / "scenes.json"),
                                "--n_per_image", "3", "--output", str(out / "pseudo.jsonl")])
    prepare_dataset.main(["--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root",
                          str(shapes_world / "images"), "--codes", str(codes), "--pseudo_queries",
                          str(out / "pseudo.jsonl"), "--output_dir", str(out / "data")])
    return out / "data"
