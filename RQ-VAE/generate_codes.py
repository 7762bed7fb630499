"""Give every image its identifiers (`generate_codes` of the ComGTIR pipeline) and write the tokenizer report.

Reads the RQ-VAE checkpoint and `emb_dir/image_{split}` for each split; writes `codes.json` (see rqvae.codes)
and `report.json` (reconstruction error, per-level codebook usage and entropy, collision rate before and after
disambiguation), and adds the row `comgtir/rqvae` to the main job's results.json if asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.config import parse_config
from core.io import atomic_write_json, file_digest, load_embeddings
from core.logging import format_table
from core.results import update_summary
from rqvae.codes import build_codes, collision_rate, reassign_collisions, usage_stats, write_codes
from rqvae.train import load_rqvae, reconstruction_error


@dataclass
class GenerateCodesConfig:
    checkpoint: str = "runs/shapes/comgtir/rqvae/checkpoint-best"
    emb_dir: str = "runs/shapes/dense/emb"
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    output: str = "runs/shapes/comgtir/codes.json"
    reassign: bool = True  # move colliding images to their next-nearest free last-level code before suffixing
    report_split: str = "test"  # split whose reconstruction error is reported
    summary: str = ""  # main job's results.json ("" = none)
    summary_row: str = "comgtir/rqvae"


@torch.no_grad()
def last_level_distances(model, x: torch.Tensor) -> np.ndarray:
    """[n, K]: distance of each embedding's last-level residual to every code of the last level."""
    q = model.quantizer
    residual = model.encoder(x)
    codes = q.encode(residual)
    for level in range(q.levels - 1):
        residual = residual - q.book(level)[codes[:, level]]
    return torch.cdist(residual, q.book(q.levels - 1)).numpy()


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(GenerateCodesConfig, argv)
    model = load_rqvae(cfg.checkpoint)
    embs = {s: load_embeddings(Path(cfg.emb_dir) / f"image_{s}") for s in cfg.splits}
    x = torch.from_numpy(np.concatenate([embs[s][0] for s in cfg.splits]))
    ids = [i for s in cfg.splits for i in embs[s][1]]
    splits = [s for s in cfg.splits for _ in embs[s][1]]
    codes = model.encode(x).numpy()
    # within a colliding group the image closest to the group's reconstruction gets suffix 0
    with torch.no_grad():
        dist = (model.reconstruct(x) - x).pow(2).sum(-1).numpy()
    spec = model.spec
    raw_codes = codes
    if cfg.reassign:
        codes = reassign_collisions(codes, last_level_distances(model, x), order_key=dist)
    doc = build_codes(ids, splits, codes, spec.codebook_size, spec.shared_codebook, order_key=dist)
    doc["rqvae_weights"] = file_digest(Path(cfg.checkpoint) / "model.pt")  # which tokenizer run: checked by readers
    write_codes(cfg.output, doc)

    full = np.array([doc["images"][str(i)]["seq"] for i in ids])
    stats = usage_stats(codes, spec.codebook_size)
    report_x = torch.from_numpy(embs[cfg.report_split][0]) if cfg.report_split in embs else x
    recon = reconstruction_error(model, report_x)
    row = {
        "reconstruction": recon["mse"],  # mean squared error of the embedding rebuilt from its codes
        "reconstruction_cosine": recon["cosine"],
        "usage": stats["usage"],
        "entropy": stats["entropy"],
        "collision_rate_before": collision_rate(raw_codes),
        "collision_rate_reassigned": collision_rate(codes),
        "collision_rate_after": collision_rate(full),
        "suffix_size": doc["suffix_size"],
        "images": len(ids),
    }
    atomic_write_json(Path(cfg.output).with_name("report.json"), row)
    print(format_table({"rqvae": row}, title=f"RQ-VAE tokenizer ({spec.levels}×{spec.codebook_size}"
                                             f"{', shared' if spec.shared_codebook else ''})"))
    if cfg.summary:
        stage, _, name = cfg.summary_row.partition("/")
        update_summary(cfg.summary, stage, {name: row})
    return row


if __name__ == "__main__":
    main()
