"""Merge the stage-1 and stage-2 models into the starting point of stage 3 (`stage3_unified_encoder`).

Stage 2 starts from stage 1 and trains only the encoder blocks and the set head, so the merge is well defined:
the decoder, the token (and code) embeddings and the LM head come from stage 1, the set head from stage 2, and the
encoder blocks are `encoder_mix`·stage 2 + (1 − encoder_mix)·stage 1 (1 = stage 2's encoder, the default).
Writes a checkpoint folder loadable with `load_retriever`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.checkpoint import save_checkpoint
from core.config import parse_config
from core.errors import InputError
from retriever.generative.model import STAGE, load_retriever, save_retriever_files


@dataclass
class MergeConfig:
    stage1: str = "runs/shapes/comgtir/stage1_seqid/checkpoint-best"
    stage2: str = "runs/shapes/comgtir/stage2_setid/checkpoint-best"
    output: str = "runs/shapes/comgtir/stage3_merged"
    encoder_mix: float = 1.0


def is_encoder_block(name: str) -> bool:
    return name.startswith("t5.encoder.") and "embed_tokens" not in name


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(MergeConfig, argv)
    if not 0.0 <= cfg.encoder_mix <= 1.0:
        raise InputError("config", "encoder_mix", "must be in [0, 1]")
    model, tokenizer, _, meta1 = load_retriever(cfg.stage1)
    second, _, _, meta2 = load_retriever(cfg.stage2)
    if meta2.get("train_stage") != "setid" or meta1.get("train_stage") != "seqid":
        raise InputError(cfg.stage2, "meta.json: train_stage",
                         f"expected a seqid and a setid checkpoint, got {meta1.get('train_stage')} and {meta2.get('train_stage')}")
    if model.spec != second.spec:
        raise InputError(cfg.stage2, "retriever.json", "the two stages were built for different identifiers")
    state, other = model.state_dict(), second.state_dict()
    for name in state:
        if name.startswith("set_head."):
            state[name] = other[name]
        elif is_encoder_block(name):
            state[name] = cfg.encoder_mix * other[name] + (1 - cfg.encoder_mix) * state[name]
    model.load_state_dict(state)
    save_checkpoint(cfg.output, stage=STAGE, model=model, step=0, config=cfg, model_files=save_retriever_files(model, tokenizer),
                    extra={"train_stage": "merged", "stage1": cfg.stage1, "stage2": cfg.stage2})
    print(f"merged {cfg.stage1} + {cfg.stage2} → {cfg.output}")
    return Path(cfg.output)


if __name__ == "__main__":
    main()
