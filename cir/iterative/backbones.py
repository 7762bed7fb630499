"""Embedding models for (reference image + modification text) queries and image targets, chosen by
`--model_backbone`: the project's composed retriever (`cir.retriever.ComposedRetriever`, Shapes) or a VLM2Vec-style
Qwen2-VL (last-token pooling of the final hidden state, real data). Both expose one interface:

    prepare_images(list of PIL) -> prepared corpus;  take(prepared, indices) -> image batch
    encode_queries(reference batch, texts) -> [B, D];  encode_targets(image batch) -> [B, D]  (L2-normalised)
    temperature;  save_pretrained(folder);  load_backbone(kind, path)

Training, mining and evaluation all call these same two functions, so the embedding the loss trains is the one
retrieval ranks with.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import InputError
from core.io import atomic_write_json

MODEL_BACKBONES = ("composed_retriever", "qwen2_vl")
SPEC_FILE = "iterative_backbone.json"


class EmbeddingBackbone(torch.nn.Module):
    kind = ""
    temperature: float = 0.07

    def prepare_images(self, images: Sequence[Image.Image]) -> Any:
        """What the model needs of each image, computed once per run (whatever stays fixed while training)."""
        raise NotImplementedError

    def take(self, prepared: Any, indices: Sequence[int]) -> Any:
        raise NotImplementedError

    def prepared_key(self) -> str:
        """Prepared images stay valid while this key is unchanged (a hash of whatever part is frozen)."""
        raise NotImplementedError

    def encode_queries(self, references: Any, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_targets(self, images: Any) -> torch.Tensor:
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path) -> None:
        raise NotImplementedError

    def _write_spec(self, folder: str | Path, **extra: Any) -> None:
        atomic_write_json(Path(folder) / SPEC_FILE, {"backbone": self.kind, "temperature": self.temperature, **extra})


class ComposedRetrieverBackbone(EmbeddingBackbone):
    """The CIR stage's composed retriever. Its image encoder is frozen (as the CIR stage trains it), so every image's
    patch tokens are computed once per run and the Q-Formers train on them: the same `*_from_tokens` functions that
    the retriever's own `encode_queries` / `encode_targets` call on pixels."""

    kind = "composed_retriever"

    def __init__(self, retriever: torch.nn.Module, temperature: float | None = None, token_batch: int = 256):
        super().__init__()
        self.retriever = retriever
        self.retriever.image_encoder.requires_grad_(False)
        self.temperature = float(temperature if temperature is not None else _retriever_temperature(retriever))
        self.token_batch = token_batch

    @torch.no_grad()
    def prepare_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        from core.logging import progress

        chunks = []
        for start in progress(range(0, len(images), self.token_batch), desc="image tokens"):
            pixels = torch.stack([self.retriever.preprocess(im.convert("RGB"))
                                  for im in images[start:start + self.token_batch]])
            chunks.append(self.retriever.image_tokens(pixels).cpu())
        return torch.cat(chunks)

    def take(self, prepared: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        return prepared[torch.as_tensor(list(indices), dtype=torch.long)]

    def prepared_key(self) -> str:
        # Cached tokens are reused across rounds only if the frozen image encoder really is the same.
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.retriever.image_encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def encode_queries(self, references: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return self.retriever.encode_queries_from_tokens(references.to(_device_of(self)), list(texts))

    def encode_targets(self, images: torch.Tensor) -> torch.Tensor:
        return self.retriever.encode_targets_from_tokens(images.to(_device_of(self)))

    def save_pretrained(self, folder: str | Path) -> None:
        self.retriever.save_pretrained(folder)
        self._write_spec(folder)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ComposedRetrieverBackbone":
        from cir.retriever import ComposedRetriever

        spec = _read_spec(path)
        return cls(ComposedRetriever.from_pretrained(path), spec.get("temperature", _trained_temperature(path)))


def _trained_temperature(folder: str | Path) -> float | None:
    """The temperature in the resolved config.yaml the CIR stage saves beside its checkpoint, if any."""
    import yaml

    path = Path(folder) / "config.yaml"
    value = (yaml.safe_load(path.read_text()) or {}).get("temperature") if path.is_file() else None
    return float(value) if isinstance(value, (int, float)) else None


def _retriever_temperature(retriever: torch.nn.Module) -> float:
    """The contrastive temperature the CIR stage trained with, when the retriever carries one."""
    for name in ("temperature", "temp"):
        value = getattr(retriever, name, None)
        if value is not None:
            return float(value.detach().item() if torch.is_tensor(value) else value)
    scale = getattr(retriever, "logit_scale", None)
    if scale is not None:
        return float(1.0 / scale.detach().exp().item())
    return 0.07


class Qwen2VLEmbedder(EmbeddingBackbone):
    """VLM2Vec: a Qwen2-VL reads an instruction with the image; the final hidden state of the last token,
    L2-normalised, is the embedding (Eq. 1 of VLM2Vec: InfoNCE over these last-token embeddings, τ = 0.02)."""

    kind = "qwen2_vl"
    QUERY = "{image}Given an image, find a similar image with the described changes: {text}"
    TARGET = "{image}Represent the given image."

    def __init__(self, vlm: torch.nn.Module, processor: Any, temperature: float = 0.02):
        super().__init__()
        self.vlm, self.processor, self.temperature = vlm, processor, float(temperature)
        self.processor.tokenizer.padding_side = "right"

    @property
    def image_placeholder(self) -> str:
        return "<|vision_start|>" + self.processor.image_token + "<|vision_end|>"

    def prepare_images(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        # The vision tower trains too (VLM2Vec fine-tunes the whole model), so nothing can be precomputed.
        return [im.convert("RGB") for im in images]

    def take(self, prepared: list[Image.Image], indices: Sequence[int]) -> list[Image.Image]:
        return [prepared[i] for i in indices]

    def prepared_key(self) -> str:
        return "pil-rgb"

    def encode_queries(self, references: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        prompts = [self.QUERY.format(image=self.image_placeholder, text=t) for t in texts]
        return self._embed(prompts, references)

    def encode_targets(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self._embed([self.TARGET.format(image=self.image_placeholder)] * len(images), images)

    def _embed(self, prompts: list[str], images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(text=prompts, images=list(images), padding=True, return_tensors="pt").to(_device_of(self))
        # The base model (no LM head): the vocabulary projection is never needed for an embedding.
        hidden = self.vlm.model(**inputs).last_hidden_state
        return F.normalize(last_token_pool(hidden, inputs["attention_mask"]).float(), dim=-1)

    def save_pretrained(self, folder: str | Path) -> None:
        self.vlm.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        self._write_spec(folder)

    @classmethod
    def from_pretrained(cls, path: str | Path, temperature: float = 0.02) -> "Qwen2VLEmbedder":
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        spec = _read_spec(path) if Path(path).is_dir() else {}
        vlm = Qwen2VLForConditionalGeneration.from_pretrained(path)
        return cls(vlm, AutoProcessor.from_pretrained(path), spec.get("temperature", temperature))


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token, whichever side the padding is on."""
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def load_backbone(kind: str, path: str | Path) -> EmbeddingBackbone:
    """Round 0 is the upstream model in its own folder; later rounds are our checkpoint_iter_N/ folders."""
    if kind not in MODEL_BACKBONES:
        raise InputError("command line", "model_backbone",
                         f"unknown backbone {kind!r}; choose one of {', '.join(MODEL_BACKBONES)}")
    spec = _read_spec(path) if Path(path).is_dir() else {}
    if spec and spec.get("backbone") != kind:
        raise InputError(Path(path) / SPEC_FILE, "backbone", f"this checkpoint holds a {spec.get('backbone')} model, not {kind}")
    cls = {"composed_retriever": ComposedRetrieverBackbone, "qwen2_vl": Qwen2VLEmbedder}[kind]
    return cls.from_pretrained(path)


def _read_spec(path: str | Path) -> dict[str, Any]:
    spec_path = Path(path) / SPEC_FILE
    return json.loads(spec_path.read_text()) if spec_path.is_file() else {}


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
