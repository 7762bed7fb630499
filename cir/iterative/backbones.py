"""Embedding models for (reference image + modification text) queries and image targets, chosen by
`--model_backbone`: the project's composed retriever (`cir.retriever.ComposedRetriever`, Shapes) or a VLM2Vec-style
Qwen2-VL (last-token pooling of the final hidden state, real data). Both expose one interface:

    prepare_images(corpus) -> ImageSource (cir.iterative.data: one item per image, batches read by DataLoader workers)
    encode_queries(reference batch, texts) -> [B, D];  encode_targets(image batch) -> [B, D]  (L2-normalised)
    temperature;  save_pretrained(folder);  load_backbone(kind, path, device)

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

from cir.iterative.data import SINGLE, Corpus, ImageSource, describe_transform, token_cache
from core.device import get_device, pretrained_dtype_kwargs
from core.distributed import DistInfo
from core.errors import InputError
from core.io import atomic_write_json, state_dict_digest

MODEL_BACKBONES = ("composed_retriever", "qwen2_vl")
SPEC_FILE = "iterative_backbone.json"


class EmbeddingBackbone(torch.nn.Module):
    kind = ""
    temperature: float = 0.07

    def prepare_images(self, corpus: Corpus, info: DistInfo = SINGLE) -> ImageSource:
        """What the model reads of each corpus image, computed once per run (whatever stays fixed while training).
        Under torchrun every rank calls it."""
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
    """The CIR stage's composed retriever. Its image encoder is frozen (as the CIR stage trains it), so by default
    every image's patch tokens are computed once per run into a float16 cache on disk (cir.iterative.data.token_cache,
    reused while encoder, preprocessing and image list are unchanged) and the Q-Formers train on them: the same
    `*_from_tokens` functions that the retriever's own `encode_queries` / `encode_targets` call on pixels. With
    `cache_tokens` off the frozen encoder runs live on each batch of pixels instead (a real ViT-g's tokens of a whole
    corpus are tens of GB)."""

    kind = "composed_retriever"

    def __init__(self, retriever: torch.nn.Module, temperature: float | None = None, token_batch: int = 256,
                 cache_tokens: bool = True):
        super().__init__()
        self.retriever = retriever
        self.retriever.image_encoder.requires_grad_(False)
        self.temperature = float(temperature if temperature is not None else _retriever_temperature(retriever))
        self.token_batch, self.cache_tokens = token_batch, cache_tokens

    def prepare_images(self, corpus: Corpus, info: DistInfo = SINGLE) -> ImageSource:
        if not self.cache_tokens:
            return corpus.pixels(self.retriever.preprocess)
        encoder = self.retriever.image_encoder
        made_by = {"encoder": self.prepared_key(), "kind": encoder.kind, "source": encoder.source,
                   "preprocess": describe_transform(self.retriever.preprocess)}
        return token_cache(corpus, self.retriever.image_tokens, self.retriever.preprocess, made_by, self.token_batch,
                           _device_of(self), info)

    def prepared_key(self) -> str:
        # Cached tokens are reused across rounds only if the frozen image encoder really is the same.
        return state_dict_digest(self.retriever.image_encoder, 16) + ("-tokens" if self.cache_tokens else "-pixels")

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens of a prepared batch: the cached tokens [B, T, D], or the live encoder's on pixels."""
        images = images.to(_device_of(self), non_blocking=True)
        return images if self.cache_tokens else self.retriever.image_tokens(images)

    def encode_queries(self, references: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return self.retriever.encode_queries_from_tokens(self._tokens(references), list(texts))

    def encode_targets(self, images: torch.Tensor) -> torch.Tensor:
        return self.retriever.encode_targets_from_tokens(self._tokens(images))

    def save_pretrained(self, folder: str | Path) -> None:
        self.retriever.save_pretrained(folder)
        self._write_spec(folder)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | None = None) -> "ComposedRetrieverBackbone":
        from cir.retriever import ComposedRetriever

        spec = _read_spec(path)
        return cls(ComposedRetriever.from_pretrained(path, device=device),
                   spec.get("temperature", _trained_temperature(path)))


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

    def prepare_images(self, corpus: Corpus, info: DistInfo = SINGLE) -> ImageSource:
        # The vision tower trains too (VLM2Vec fine-tunes the whole model), so nothing can be precomputed: the
        # images are decoded per batch by the DataLoader's workers.
        return corpus.files()

    def prepared_key(self) -> str:
        return "image-files"

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
    def from_pretrained(cls, path: str | Path, device: torch.device | None = None,
                        temperature: float = 0.02) -> "Qwen2VLEmbedder":
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        device = device or get_device()
        spec = _read_spec(path) if Path(path).is_dir() else {}
        # bf16 weights on CUDA (a 2B-7B VLM), fp32 on CPU: the load dtype is decided once, in core.device.
        vlm = Qwen2VLForConditionalGeneration.from_pretrained(path, **pretrained_dtype_kwargs(device))
        return cls(vlm.to(device), AutoProcessor.from_pretrained(path), spec.get("temperature", temperature))


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token, whichever side the padding is on."""
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def load_backbone(kind: str, path: str | Path, device: torch.device | None = None,
                  cache_tokens: bool = True) -> EmbeddingBackbone:
    """Round 0 is the upstream model in its own folder; later rounds are our checkpoint_iter_N/ folders.
    `cache_tokens` (composed retriever): its frozen encoder's tokens come from a cache on disk, else run live."""
    if kind not in MODEL_BACKBONES:
        raise InputError("command line", "model_backbone",
                         f"unknown backbone {kind!r}; choose one of {', '.join(MODEL_BACKBONES)}")
    spec = _read_spec(path) if Path(path).is_dir() else {}
    if spec and spec.get("backbone") != kind:
        raise InputError(Path(path) / SPEC_FILE, "backbone", f"this checkpoint holds a {spec.get('backbone')} model, not {kind}")
    if kind == "qwen2_vl":
        return Qwen2VLEmbedder.from_pretrained(path, device=device)
    model = ComposedRetrieverBackbone.from_pretrained(path, device=device)
    model.cache_tokens = cache_tokens
    return model


def _read_spec(path: str | Path) -> dict[str, Any]:
    spec_path = Path(path) / SPEC_FILE
    return json.loads(spec_path.read_text()) if spec_path.is_file() else {}


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
