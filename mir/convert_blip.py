"""Convert a BLIP checkpoint in the original repository's layout (ChatIR's fine-tuned `chatir_weights.ckpt`) into a
transformers BlipForImageTextRetrieval folder that `mir.retrieval` opens as a retriever (mir.blip).

Reads the `.ckpt` and the base model (config, tokenizer, image processor: `Salesforce/blip-itm-base-coco` or a
local copy); writes `output_dir/` (model.safetensors, config.json, the processor's files) atomically.

    python -m mir.convert_blip --checkpoint chatir_weights.ckpt --output_dir runs/coco/chatir-blip
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.config import parse_config
from mir.blip import CHATIR_IMAGE_SIZE, convert_checkpoint


@dataclass
class ConvertBlipConfig:
    checkpoint: str = "chatir_weights.ckpt"  # original layout: {"model": {"visual_encoder.…", "text_encoder.…", …}}
    base: str = "Salesforce/blip-itm-base-coco"  # architecture, tokenizer and image processor (name or folder)
    output_dir: str = "runs/coco/chatir-blip"
    image_size: int = CHATIR_IMAGE_SIZE  # ChatIR encodes 224 px images; position embeddings are resized to it


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(ConvertBlipConfig, argv)
    out = convert_checkpoint(cfg.checkpoint, cfg.base, cfg.output_dir, cfg.image_size)
    print(f"converted {cfg.checkpoint} -> {out} ({cfg.image_size} px, architecture of {cfg.base})")
    return out


if __name__ == "__main__":
    main()
