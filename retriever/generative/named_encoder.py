"""A dual-encoder folder naming a pretrained open_clip model, for ComGTIR-D's `prepare_emb` on real data.

The paper embeds images and captions with CLIP as released (ViT-L/14 at 336 px, OpenAI's weights), not with a
fine-tuned encoder. This writes `output_dir/encoder.json` (the model's name and weights tag) and `meta.json` (a
dense-stage checkpoint), without weights: `retriever.dense.encode` and the dense re-ranking then load the named
model as they load a trained one (core.encoders.load_dual_encoder).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core.config import parse_config
from core.errors import InputError
from core.io import atomic_write_json

STAGE = "dense"  # the stage whose checkpoints the encoder's readers accept


@dataclass
class NamedEncoderConfig:
    model: dict = field(default_factory=lambda: {"pretrained_name": "ViT-L-14-336-quickgelu", "pretrained": "openai"})
    output_dir: str = "runs/coco/comgtir/clip"


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(NamedEncoderConfig, argv)
    unknown = set(cfg.model) - {"pretrained_name", "pretrained"}
    if unknown:
        raise InputError("config", f"model.{sorted(unknown)[0]}", "a named encoder has pretrained_name and pretrained only")
    for key in ("pretrained_name", "pretrained"):
        if not cfg.model.get(key):
            raise InputError("config", f"model.{key}", "required (e.g. ViT-L-14-336-quickgelu, openai)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "encoder.json", {"pretrained_name": cfg.model["pretrained_name"],
                                             "pretrained": cfg.model["pretrained"]})
    atomic_write_json(out / "meta.json", {"stage": STAGE, "step": 0})  # last: marks the folder complete
    print(f"dual encoder {cfg.model['pretrained_name']} ({cfg.model['pretrained']}) → {out}")
    return out


if __name__ == "__main__":
    main()
