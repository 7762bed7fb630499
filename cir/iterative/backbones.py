"""Embedding models for (reference image + modification text) queries and image targets, chosen by
`--model_backbone`: the project's composed retriever (`cir.retriever.ComposedRetriever`, Shapes) or a VLM2Vec-style
Qwen2-VL (last-token pooling of the final hidden state, LoRA adapters trained, real data). Both expose one interface:

    prepare_images(corpus) -> ImageSource (cir.iterative.data: one item per image, batches read by DataLoader workers)
    encode_queries(reference batch, texts) -> [B, D];  encode_targets(image batch) -> [B, D] or [B, T, D]
    (L2-normalised), scored by similarity(queries, targets) -> [B, M]
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

from cir.iterative.config import VLM2VecOptions
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
        """[B, D] target embeddings, or [B, T, D] for a model that scores a target by its best token (`similarity`)."""
        raise NotImplementedError

    @staticmethod
    def similarity(queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B, M] scores of queries [B, D] against `encode_targets`' output for M images: the inner product."""
        return queries @ targets.T

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
        """[B, T, D]: one embedding per Q-Former query token for the official PTHA variant, scored by the max over
        them as the CIR stage trains and evaluates it (T = 1 for the project variant)."""
        return self.retriever.encode_target_tokens_from_tokens(self._tokens(images))

    def similarity(self, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.retriever.similarity(queries, targets)

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
    L2-normalised, is the embedding (Eq. 1 of VLM2Vec: InfoNCE over these last-token embeddings, τ = 0.02).

    As VLM2Vec trains it, only LoRA adapters (peft) train; the base Qwen2-VL stays frozen. A checkpoint is the
    adapter alone (peft's adapter_config.json + adapter_model.safetensors) and a spec naming its base model, so
    reloading is base + adapter, and the released TIGER-Lab/VLM2Vec-Qwen2VL-2B loads the same way over
    Qwen/Qwen2-VL-2B-Instruct."""

    kind = "qwen2_vl"
    QUERY = "{image}Given an image, find a similar image with the described changes: {text}"
    TARGET = "{image}Represent the given image."

    def __init__(self, vlm: torch.nn.Module, processor: Any, base_model: str, temperature: float = 0.02,
                 max_pixels: int = 0):
        super().__init__()
        self.vlm, self.processor, self.temperature = vlm, processor, float(temperature)
        self.base_model, self.max_pixels = str(base_model), int(max_pixels)
        self.processor.tokenizer.padding_side = "right"

    @property
    def image_placeholder(self) -> str:
        return "<|vision_start|>" + self.processor.image_token + "<|vision_end|>"

    def prepare_images(self, corpus: Corpus, info: DistInfo = SINGLE) -> ImageSource:
        # An adapter may reach into the vision tower (its target modules decide), so nothing is precomputed: the
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
        # The base model (no LM head): the vocabulary projection is never needed for an embedding. The adapters
        # are injected into its layers in place, so they act here too.
        hidden = self.vlm.get_base_model().model(**inputs, use_cache=False).last_hidden_state
        return F.normalize(last_token_pool(hidden, inputs["attention_mask"]).float(), dim=-1)

    def save_pretrained(self, folder: str | Path) -> None:
        self.vlm.save_pretrained(folder)  # a PeftModel writes its adapter only
        self._write_spec(folder, base_model=self.base_model, max_pixels=self.max_pixels)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | None = None,
                        options: VLM2VecOptions | None = None) -> "Qwen2VLEmbedder":
        """`path` is one of our checkpoints (its spec names the base; its adapter, temperature and pixel cap are
        the trained ones) or a base Qwen2-VL folder / hub name, with `options.model_adapter` over it (or a fresh
        adapter of the options' shape)."""
        from peft import PeftModel, get_peft_model
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        device = device or get_device()
        options = options or VLM2VecOptions()
        spec = _read_spec(path) if Path(path).is_dir() else {}
        if "base_model" in spec:
            base, adapter, max_pixels = spec["base_model"], str(path), int(spec.get("max_pixels", 0))
        else:
            base, adapter, max_pixels = str(path), options.model_adapter, options.max_pixels
        _check_adapter(adapter, path)
        # bf16 weights on CUDA (a 2B-7B VLM), fp32 on CPU: the load dtype is decided once, in core.device.
        vlm = Qwen2VLForConditionalGeneration.from_pretrained(base, **pretrained_dtype_kwargs(device))
        if options.gradient_checkpointing:
            enable_checkpointing(vlm)
        if adapter:
            vlm = PeftModel.from_pretrained(vlm, adapter, is_trainable=True)
        else:
            vlm = get_peft_model(vlm, lora_config(options))
        processor = AutoProcessor.from_pretrained(base)
        if max_pixels:
            cap_image_pixels(processor, max_pixels)
        return cls(vlm.to(device), processor, base, spec.get("temperature", 0.02), max_pixels)


def cap_image_pixels(processor: Any, max_pixels: int) -> None:
    """Qwen2-VL resizes each image to at most `max_pixels` (its size's longest_edge counts pixels, not a side)
    keeping the aspect ratio; the lower bound (shortest_edge) stays the processor's, or the cap if that is lower."""
    size = processor.image_processor.size
    floor = min(int(size["shortest_edge"]), max_pixels)
    processor.image_processor.size = type(size)(shortest_edge=floor, longest_edge=max_pixels)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation (gradient) checkpointing of every layer. Non-reentrant, so gradients reach the adapters although
    the frozen embeddings' outputs need none (the reentrant kind would need enable_input_require_grads)."""
    kwargs = {"use_reentrant": False}
    # transformers deprecates gradient_checkpointing_enable for activation_checkpointing_enable; a version without
    # the new name gets the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def lora_config(options: VLM2VecOptions) -> Any:
    """A fresh adapter as VLM2Vec builds one: Gaussian-initialised A, zero B (the model starts as the base), DoRA
    when `lora_dora`."""
    from peft import LoraConfig

    return LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=list(options.lora_target_modules), use_dora=options.lora_dora,
                      init_lora_weights="gaussian")


def check_vlm2vec_options(options: VLM2VecOptions, source: str | Path = "command line") -> None:
    """The qwen2_vl options, checked before any work starts."""
    for name in ("lora_r", "lora_alpha"):
        if getattr(options, name) < 1:
            raise InputError(source, name, "must be at least 1")
    if not 0 <= options.lora_dropout < 1:
        raise InputError(source, "lora_dropout", "must be in [0, 1)")
    if not options.lora_target_modules:
        raise InputError(source, "lora_target_modules", "name at least one module for the adapters")
    if options.max_pixels < 0:
        raise InputError(source, "max_pixels", "must be 0 (the processor's setting) or a number of pixels")
    # As for the foundation model: a local-looking path must exist, anything else is taken as a hub name.
    adapter = options.model_adapter
    if adapter.startswith((".", "/", "~")) and not Path(adapter).expanduser().is_dir():
        raise InputError(adapter, "model_adapter", "adapter folder not found")
    _check_adapter(options.model_adapter, "")


def _check_adapter(adapter: str, path: str | Path) -> None:
    """A local adapter folder must hold peft's two files (a hub name is left to peft)."""
    if not adapter or not Path(adapter).is_dir():
        return
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (Path(adapter) / name).is_file():
            field = "model_adapter" if str(adapter) != str(path) else "model_path"
            raise InputError(Path(adapter) / name, field, "a LoRA adapter folder needs peft's adapter_config.json "
                                                          "and adapter_model.safetensors")


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token, whichever side the padding is on."""
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def load_backbone(kind: str, path: str | Path, device: torch.device | None = None,
                  cache_tokens: bool = True, vlm_options: VLM2VecOptions | None = None) -> EmbeddingBackbone:
    """Round 0 is the upstream model in its own folder; later rounds are our checkpoint_iter_N/ folders.
    `cache_tokens` (composed retriever): its frozen encoder's tokens come from a cache on disk, else run live.
    `vlm_options` (qwen2_vl): the round-0 adapter, a fresh adapter's shape, checkpointing, the pixel cap."""
    if kind not in MODEL_BACKBONES:
        raise InputError("command line", "model_backbone",
                         f"unknown backbone {kind!r}; choose one of {', '.join(MODEL_BACKBONES)}")
    spec = _read_spec(path) if Path(path).is_dir() else {}
    if spec and spec.get("backbone") != kind:
        raise InputError(Path(path) / SPEC_FILE, "backbone", f"this checkpoint holds a {spec.get('backbone')} model, not {kind}")
    if kind == "qwen2_vl":
        return Qwen2VLEmbedder.from_pretrained(path, device=device, options=vlm_options)
    model = ComposedRetrieverBackbone.from_pretrained(path, device=device)
    model.cache_tokens = cache_tokens
    return model


def _read_spec(path: str | Path) -> dict[str, Any]:
    spec_path = Path(path) / SPEC_FILE
    return json.loads(spec_path.read_text()) if spec_path.is_file() else {}


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
