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
