"""The MTST modification-text generator (InstructBLIP-style), shared by composed retrieval, iterative CIR and GenIR.

A frozen image encoder turns the reference and the target image into patch tokens; a trainable Q-Former reads both
token sets together (a learned segment vector marks which image a token comes from) plus a fixed instruction, and its
query outputs, projected, prefix a frozen causal language model that writes the modification text (MTST paper, §3.1:
only the Q-Former is trained). The parts are transformers' InstructBLIP classes: `InstructBlipQFormerModel` and a
causal LM (`AutoModelForCausalLM`); real data takes all of them, pretrained, from an
`InstructBlipForConditionalGeneration` checkpoint (`from_instructblip`); the Shapes world builds them at a tiny size
with the project's trained dense image tower as the frozen image encoder.

A generator is a folder (`save_pretrained` / `load_modification_generator`): `modtext.json`, `meta.json` (stage
"mtst"), `bridge.pt` (query tokens, segment vectors, LM projection), `qformer/`, `language_model/` (unless named),
`qformer_tokenizer/`, `lm_tokenizer/`, `image_encoder/`. Frozen pretrained parts are named, not copied: a ViT or LM
taken from a hub checkpoint is written as its name (+ a fingerprint of its weights) and reloaded alone from that
checkpoint (`pretrained_part`: only its own tensors, never the whole 7B InstructBLIP). Hub weights load in
`core.device.weights_dtype` (bf16 on CUDA) when frozen and in float32 when trained (an optimizer stepping bf16 weights
loses small updates); forward passes run in `core.device.autocast`.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import nn

from core.device import autocast, get_device, pretrained_dtype_kwargs
from core.encoders import image_tokens as encoder_image_tokens
from core.errors import InputError
from core.io import atomic_dir, atomic_write_json, read_json

STAGE = "mtst"
INSTRUCTION = "How to change from one image to the other image?"
SPEC_FILE = "modtext.json"
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}
# Parts that train load in float32 whatever the device: AdamW on bf16 weights rounds small updates away; autocast
# still runs their matmuls in bf16 on CUDA.
TRAINABLE_DTYPE = {"dtype": torch.float32}

# Tiny sizes for the Shapes world: trains on a CPU in about a minute.
SHAPES_QFORMER = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                  "cross_attention_frequency": 1, "max_position_embeddings": 64,
                  "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
SHAPES_LM = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "intermediate_size": 256, "max_position_embeddings": 96}


# ----------------------------------------------------------------------------------------------- tokenizers
def build_word_tokenizer(texts: Sequence[str]):
    """A lower-cased word-level tokenizer over `texts` (the Shapes vocabulary is a few hundred words), as a
    `PreTrainedTokenizerFast` so it saves and loads like any Hugging Face tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: dict[str, None] = {}
    norm = normalizers.Lowercase()
    pre = pre_tokenizers.Whitespace()
    for text in texts:
        for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
            words.setdefault(word, None)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def detokenize(tokenizer, ids: Sequence[int]) -> str:
    """Token ids back to text, without special tokens and without the spaces a word tokenizer puts before '?'."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    for spaced, joined in ((" ?", "?"), (" ,", ","), (" .", "."), (" ;", ";"), (" - ", "-")):
        text = text.replace(spaced, joined)
    return text.strip()


# ----------------------------------------------------------------------------------------------- image encoders
class ImageTokens(nn.Module):
    """A frozen image encoder that returns image tokens [B, N, D]; `.preprocess` maps a PIL image to a tensor.

    kind "dense": the project's open_clip dual encoder, tokens from `core.encoders.image_tokens` (a ViT's CLS + patches
    after `ln_post`; a ResNet's last residual stage, or `source["token_stage"]`, as a grid of positioned tokens).
    kind "hf": a transformers vision model (InstructBLIP/BLIP-2 ViT), tokens = `last_hidden_state`.
    """

    def __init__(self, kind: str, model: nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 hidden_size: int, source: dict[str, Any]):
        super().__init__()
        if kind not in ("dense", "hf"):
            raise InputError(None, "image_encoder.kind", f"unknown kind {kind!r}; expected 'dense' or 'hf'")
        self.kind, self.model, self.preprocess, self.hidden_size = kind, model, preprocess, hidden_size
        self.source = dict(source)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "ImageTokens":
        # Frozen: stays in eval mode (no dropout) whatever the parent module does.
        return super().train(False)

    @property
    def named(self) -> bool:
        """A pretrained tower that reloads by name from its checkpoint (so a folder never copies its weights)."""
        return self.kind == "hf" and "name" in self.source

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, D] in float32, the tower run inside core.device.autocast (bf16 on CUDA)."""
        with autocast(pixels.device):
            if self.kind == "dense":
                x = encoder_image_tokens(self.model, pixels, self.source.get("token_stage"))
            else:
                x = self.model(pixel_values=pixels).last_hidden_state
        return x.float()

    def fingerprint(self) -> str:
        """A digest of the tower's weights: the first 1024 values of every tensor (enough to tell two towers apart),
        rounded to bf16 so that the same tower loaded in bf16 (CUDA) or float32 (CPU) has one fingerprint; and the
        ResNet stage read, if one was chosen."""
        h = hashlib.sha256(self.kind.encode())
        if "token_stage" in self.source:  # the same ResNet read at another stage gives other tokens
            h.update(f"token_stage={self.source['token_stage']}".encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            head = tensor.detach().flatten()[:1024]
            h.update(head.to(torch.bfloat16).float().cpu().numpy().tobytes() if head.is_floating_point()
                     else head.cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def preprocess_id(self) -> str:
        """The preprocessing as stable text (no object addresses), for caches to record what made them."""
        processor = getattr(self, "processor", None)
        if processor is not None:
            return json.dumps(processor.to_dict(), sort_keys=True, default=str)
        return re.sub(r" at 0x[0-9a-f]+", "", repr(self.preprocess))

    def pixels(self, images: Sequence[Image.Image], device: torch.device | None = None) -> torch.Tensor:
        out = torch.stack([self.preprocess(img.convert("RGB")) for img in images])
        return out.to(device) if device is not None else out

    def save(self, folder: Path) -> None:
        """`image_encoder.json` (kind, source, fingerprint) and, unless the tower is named, its weights."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "dense":
            self.model.save(folder)  # the project's own small trained tower
        elif not self.named:  # a tower without a checkpoint to reload it from (a tiny random one in tests)
            self.model.save_pretrained(folder)
            self.processor.save_pretrained(folder)
        atomic_write_json(folder / "image_encoder.json", {"kind": self.kind, "hidden_size": self.hidden_size,
                                                          **self.source, "fingerprint": self.fingerprint()})


def dense_image_tokens(dense_folder: str | Path, token_stage: int | None = None) -> ImageTokens:
    """The frozen image tower of a trained dense retriever (`$RUN_DIR/dense/checkpoint-best`), ViT or ResNet;
    `token_stage` picks a ResNet's residual stage (0-based; default the last), recorded in the tower's source."""
    from core.encoders import image_token_width, load_dual_encoder

    encoder = load_dual_encoder(dense_folder)
    source: dict[str, Any] = {"dense_folder": str(dense_folder)}
    if token_stage is not None:
        source["token_stage"] = int(token_stage)
    try:
        width = image_token_width(encoder, token_stage)
    except InputError as e:  # name the folder whose tower cannot give tokens
        raise InputError(Path(dense_folder) / "encoder.json", e.field, e.message) from None
    return ImageTokens("dense", encoder, encoder.preprocess, width, source)


def hf_image_tokens(vision_model: nn.Module, image_processor: Any, source: dict[str, Any]) -> ImageTokens:
    """A transformers vision tower; `source["name"]` (a hub name or checkpoint folder) makes it reload by name."""
    def preprocess(img: Image.Image) -> torch.Tensor:
        return image_processor(images=img, return_tensors="pt")["pixel_values"][0]

    tokens = ImageTokens("hf", vision_model, preprocess, int(vision_model.config.hidden_size), source)
    tokens.processor = image_processor
    return tokens


def load_image_tokens(folder: str | Path, device: torch.device | None = None) -> ImageTokens:
    """The tower an `image_encoder/` folder describes: the dense tower saved there, a named pretrained ViT reloaded
    alone from its checkpoint (its fingerprint must match the one recorded), or an hf tower saved there."""
    import transformers

    folder = Path(folder)
    info = read_json(folder / "image_encoder.json", required=["kind"])
    source = {k: v for k, v in info.items() if k not in ("kind", "hidden_size", "fingerprint")}
    if info["kind"] == "dense":
        tokens = dense_image_tokens(folder, info.get("token_stage"))
        tokens.source = source
    elif "name" in info:  # {"name": "Salesforce/instructblip-vicuna-7b", "vision_class": "InstructBlipVisionModel"}
        vision = pretrained_part(info["name"], getattr(transformers, vision_class(info)), "vision_model.", device)
        tokens = hf_image_tokens(vision, transformers.AutoImageProcessor.from_pretrained(info["name"]), source)
    else:
        vision = getattr(transformers, vision_class(info)).from_pretrained(folder, **pretrained_dtype_kwargs(
            device or get_device()))
        tokens = hf_image_tokens(vision, transformers.AutoImageProcessor.from_pretrained(folder), source)
    if "fingerprint" in info and tokens.fingerprint() != info["fingerprint"]:
        raise InputError(folder / "image_encoder.json", "fingerprint",
                         f"the image tower loaded from {info.get('name', folder)} is not the one this folder was "
                         "trained with (its weights changed)")
    return tokens


def vision_class(info: dict[str, Any]) -> str:
    """The transformers class of a saved tower; folders written before `vision_class` was recorded name the
    composite class (InstructBlipForConditionalGeneration → InstructBlipVisionModel)."""
    if "vision_class" in info:
        return info["vision_class"]
    return info.get("class", "InstructBlipForConditionalGeneration").replace("ForConditionalGeneration", "VisionModel")


@contextlib.contextmanager
def _quiet_transformers():
    """Loading one part of a composite checkpoint lists every other part's tensors as unexpected; they are meant
    to be skipped, so the report is silenced."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def pretrained_part(name: str, cls: Any, prefix: str, device: torch.device | None = None, trainable: bool = False,
                    config: Any = None, key_mapping: dict[str, str] | None = None) -> nn.Module:
    """One part of a composite checkpoint (InstructBLIP / BLIP-2: "vision_model.", "qformer.", "language_model."),
    built from its own sub-config with only its own tensors read (`key_mapping` strips the prefix; the other parts'
    tensors are skipped), so reloading a ViT never loads the 7B language model beside it. A part whose tensors sit
    under more than one prefix passes its own `key_mapping` (regex → replacement) instead. Frozen parts load in
    core.device's dtype (bf16 on CUDA), trained ones in float32."""
    dtype = TRAINABLE_DTYPE if trainable else pretrained_dtype_kwargs(device or get_device())
    extra = {"config": config} if config is not None else {}
    mapping = key_mapping if key_mapping is not None else {rf"^{re.escape(prefix)}": ""}
    with _quiet_transformers():
        part = cls.from_pretrained(name, key_mapping=mapping, **extra, **dtype)
    # transformers keeps the key mapping to undo it on save_pretrained; a trained part is saved as a model of its own
    # class (a folder that reloads without the mapping), so it is dropped
    part._weight_conversions = None
    return part


def checkpoint_tensor(name: str, key: str) -> torch.Tensor:
    """One tensor of a hub checkpoint (or a local folder) read from its safetensors file, e.g. InstructBLIP's
    `query_tokens`, without building the model."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(name, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    filename = json.loads(Path(index).read_text())["weight_map"].get(key) if index else "model.safetensors"
    path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False) if filename else None
    if path is None:
        raise InputError(name, key, "tensor not found in the checkpoint's safetensors files")
    with safe_open(path, "pt") as f:
        if key not in f.keys():
            raise InputError(path, key, "tensor not found in the checkpoint")
        return f.get_tensor(key)


# ----------------------------------------------------------------------------------------------- the generator
class ModificationTextGenerator(nn.Module):
    """(reference image, target image) → modification text. Only the Q-Former side (`trainable_parameters`) learns."""

    def __init__(self, image_encoder: ImageTokens, qformer: nn.Module, language_model: nn.Module,
                 qformer_tokenizer: Any, lm_tokenizer: Any, num_query_tokens: int = 16,
                 instruction: str = INSTRUCTION, spec: dict[str, Any] | None = None):
        super().__init__()
        hidden = qformer.config.hidden_size
        if qformer.config.encoder_hidden_size != image_encoder.hidden_size:
            raise InputError(None, "qformer.encoder_hidden_size",
                             f"is {qformer.config.encoder_hidden_size}, the image encoder gives {image_encoder.hidden_size}")
        self.image_encoder = image_encoder
        self.qformer = qformer
        self.language_model = language_model
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden) * 0.02)
        # Marks each patch token as the reference's (0), the target's (1) or, with `difference_tokens`, their
        # difference (2): the Q-Former sees all sets at once. Difference tokens (target − reference, patch by patch)
        # let a tiny Q-Former find what changed between two near-duplicates without learning to compare sets.
        self.segment = nn.Parameter(torch.zeros(3, image_encoder.hidden_size))
        self.language_projection = nn.Linear(hidden, language_model.config.hidden_size)
        self.qformer_tokenizer, self.lm_tokenizer = qformer_tokenizer, lm_tokenizer
        self.instruction = instruction
        self.spec = copy.deepcopy(spec or {})
        self.model_id = "untrained"
        self.language_model.requires_grad_(not self.spec.get("freeze_language_model", True))

    # ---- pieces shared by training and generation
    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(pixels.to(self.device))

    def _instruction_ids(self, tokenizer: Any, batch: int) -> torch.Tensor:
        ids = tokenizer(self.instruction, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids] * batch, dtype=torch.long, device=self.device)

    def prefix(self, ref_tokens: torch.Tensor, tgt_tokens: torch.Tensor) -> torch.Tensor:
        """LM input embeddings [B, Q + len(instruction), H]: projected Q-Former queries, then the instruction."""
        b = ref_tokens.shape[0]
        parts = [ref_tokens + self.segment[0], tgt_tokens + self.segment[1]]
        if self.spec.get("difference_tokens", False):
            parts.append(tgt_tokens - ref_tokens + self.segment[2])
        pair = torch.cat(parts, dim=1)
        q_ids = self._instruction_ids(self.qformer_tokenizer, b)
        queries = self.query_tokens.expand(b, -1, -1)
        mask = torch.ones(b, queries.shape[1] + q_ids.shape[1], dtype=torch.long, device=self.device)
        out = self.qformer(input_ids=q_ids, attention_mask=mask, query_embeds=queries,
                           encoder_hidden_states=pair).last_hidden_state[:, : queries.shape[1]]
        lm_ids = self._instruction_ids(self.lm_tokenizer, b)
        lm_instruction = self.language_model.get_input_embeddings()(lm_ids)
        return torch.cat([self.language_projection(out), lm_instruction], dim=1)

    def _text_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.lm_tokenizer([t + self.lm_tokenizer.eos_token for t in texts], add_special_tokens=False,
                                padding=True, return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def label_count(self, texts: Sequence[str]) -> int:
        """How many tokens `loss` scores for `texts` (each text and its EOS), to normalise a batch split over ranks."""
        enc = self.lm_tokenizer([t + self.lm_tokenizer.eos_token for t in texts], add_special_tokens=False)
        return sum(len(ids) for ids in enc["input_ids"])

    def loss(self, ref_tokens: torch.Tensor, tgt_tokens: torch.Tensor, texts: Sequence[str],
             normalizer: float | None = None) -> torch.Tensor:
        """Next-token cross-entropy of the modification text given the prefix (the InstructBLIP objective): the sum
        over the scored tokens divided by `normalizer` (default: their number here, i.e. the mean). A trainer that
        splits a batch over ranks passes the global batch's count / world size, so DDP's average over ranks is the
        global batch's token mean."""
        ids, mask = self._text_ids(texts)
        with autocast(self.device):
            prefix = self.prefix(ref_tokens, tgt_tokens)
            embeds = torch.cat([prefix, self.language_model.get_input_embeddings()(ids).to(prefix.dtype)], dim=1)
            full_mask = torch.cat([torch.ones(prefix.shape[:2], dtype=mask.dtype, device=self.device), mask], dim=1)
            logits = self.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits
        labels = torch.cat([torch.full(prefix.shape[:2], -100, dtype=torch.long, device=self.device),
                            ids.masked_fill(mask == 0, -100)], dim=1)
        return token_cross_entropy(logits, labels, normalizer)

    @torch.no_grad()
    def generate_from_tokens(self, ref_tokens: torch.Tensor, tgt_tokens: torch.Tensor, max_new_tokens: int = 24,
                             num_beams: int = 1) -> list[str]:
        tok = self.lm_tokenizer
        with autocast(self.device):
            prefix = self.prefix(ref_tokens, tgt_tokens)
            mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device)
            out = self.language_model.generate(
                inputs_embeds=prefix, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id)
        return [detokenize(tok, row) for row in out.tolist()]

    @torch.no_grad()
    def generate(self, references: list[Image.Image], targets: list[Image.Image], max_new_tokens: int = 24,
                 num_beams: int = 1, seed: int | None = None, batch_size: int = 64) -> list[str]:
        """The modification text that turns each reference into its target (reads only the pixels)."""
        if len(references) != len(targets):
            raise InputError(None, "targets", f"{len(references)} references but {len(targets)} targets")
        was_training = self.training
        self.eval()
        texts: list[str] = []
        # Decoding is greedy/beam (deterministic); the seed fixes any randomness a subclass or LM config adds.
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for i in range(0, len(references), batch_size):
                ref = self.image_tokens(self.image_encoder.pixels(references[i:i + batch_size], self.device))
                tgt = self.image_tokens(self.image_encoder.pixels(targets[i:i + batch_size], self.device))
                texts += self.generate_from_tokens(ref, tgt, max_new_tokens, num_beams)
        self.train(was_training)
        return texts

    # ---- folders
    def save_pretrained(self, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the generator folder atomically; `meta` extras go to meta.json beside stage "mtst"."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            torch.save({"query_tokens": self.query_tokens.detach().cpu(), "segment": self.segment.detach().cpu(),
                        "language_projection": self.language_projection.state_dict()}, tmp / "bridge.pt")
            self.qformer.save_pretrained(tmp / "qformer")
            if "language_model_name" not in self.spec or not self.spec.get("freeze_language_model", True):
                self.language_model.save_pretrained(tmp / "language_model")
            self.qformer_tokenizer.save_pretrained(tmp / "qformer_tokenizer")
            self.lm_tokenizer.save_pretrained(tmp / "lm_tokenizer")
            self.image_encoder.save(tmp / "image_encoder")
            spec = {**self.spec, "num_query_tokens": int(self.query_tokens.shape[1]), "instruction": self.instruction}
            atomic_write_json(tmp / SPEC_FILE, spec)
            atomic_write_json(tmp / "meta.json", {"stage": STAGE, **(meta or {})})
        self.model_id = checkpoint_id(folder)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | None = None) -> "ModificationTextGenerator":
        return load_modification_generator(folder, device)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """Causal-LM cross-entropy (position t predicts label t+1; -100 is not scored), summed in float32 and divided by
    `normalizer` (default: the number of scored tokens, i.e. the mean, as transformers' `labels=` loss)."""
    import torch.nn.functional as F

    target = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target, ignore_index=-100,
                            reduction="sum")
    return total / (normalizer if normalizer is not None else (target != -100).sum().clamp(min=1))


def checkpoint_id(folder: str | Path) -> str:
    """`<folder name>@<hash>`: the hash covers the trained parts (bridge + Q-Former + LM if saved), so two folders with
    the same id hold the same generator."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".pt", ".safetensors", ".bin") and "image_encoder" not in path.parts:
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    name = folder.name if folder.name not in ("checkpoint-best", "checkpoint-last") else f"{folder.parent.name}/{folder.name}"
    return f"{name}@{h.hexdigest()[:12]}"


# ----------------------------------------------------------------------------------------------- builders
def build_shapes_generator(dense_folder: str | Path, texts: Sequence[str], num_query_tokens: int = 16,
                           qformer: dict[str, Any] | None = None, language_model: dict[str, Any] | None = None,
                           freeze_language_model: bool = True, difference_tokens: bool = True) -> ModificationTextGenerator:
    """A tiny generator for the Shapes world: the dense image tower (frozen), a word tokenizer over `texts` shared by
    the Q-Former and the LM, a 2-layer Q-Former and a 2-layer Llama-architecture LM (to be trained on text first)."""
    from transformers import AutoConfig, AutoModelForCausalLM, InstructBlipQFormerConfig, InstructBlipQFormerModel

    image = dense_image_tokens(dense_folder)
    tokenizer = build_word_tokenizer([*texts, INSTRUCTION])
    q_cfg = InstructBlipQFormerConfig(**{**SHAPES_QFORMER, **(qformer or {})}, vocab_size=len(tokenizer),
                                      pad_token_id=tokenizer.pad_token_id, encoder_hidden_size=image.hidden_size)
    lm_spec = {**SHAPES_LM, **(language_model or {})}
    lm_cfg = AutoConfig.for_model(lm_spec.pop("model_type"), **lm_spec, vocab_size=len(tokenizer),
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    spec = {"kind": "shapes", "freeze_language_model": freeze_language_model, "difference_tokens": difference_tokens}
    return ModificationTextGenerator(image, InstructBlipQFormerModel(q_cfg), AutoModelForCausalLM.from_config(lm_cfg),
                                     tokenizer, tokenizer, num_query_tokens, INSTRUCTION, spec)


def from_instructblip(model: nn.Module, image_processor: Any, qformer_tokenizer: Any, lm_tokenizer: Any,
                      source: dict[str, Any] | None = None) -> ModificationTextGenerator:
    """Take the parts of an `InstructBlipForConditionalGeneration` (pretrained for real data, or a tiny random one in
    tests): its ViT (frozen), Q-Former, query tokens and projection (trained), its decoder-only LM (frozen)."""
    if model.language_model.config.is_encoder_decoder:
        raise InputError(None, "text_config", "the generator needs a decoder-only language model (e.g. Vicuna, OPT)")
    return from_parts(model.vision_model, model.qformer, model.language_model, model.query_tokens,
                      model.language_projection.state_dict(), image_processor, qformer_tokenizer, lm_tokenizer, source)


def from_parts(vision: nn.Module, qformer: nn.Module, language_model: nn.Module, query_tokens: torch.Tensor,
               projection: dict[str, torch.Tensor], image_processor: Any, qformer_tokenizer: Any, lm_tokenizer: Any,
               source: dict[str, Any] | None = None) -> ModificationTextGenerator:
    """A generator from InstructBLIP's parts; `source["name"]` names the checkpoint its frozen ViT and LM reload
    from."""
    source = dict(source or {})
    image = hf_image_tokens(vision, image_processor, {k: source[k] for k in ("name",) if k in source}
                            | {"vision_class": type(vision).__name__})
    spec = {"kind": "instructblip", "freeze_language_model": True, **source}
    if "name" in source:
        spec["language_model_name"] = source["name"]
    gen = ModificationTextGenerator(image, qformer.float(), language_model, qformer_tokenizer, lm_tokenizer,
                                    int(query_tokens.shape[1]), INSTRUCTION, spec)
    with torch.no_grad():  # start from the pretrained bridge, as the paper fine-tunes it
        gen.query_tokens.copy_(query_tokens)
        gen.language_projection.load_state_dict(projection)
    return gen


def load_pretrained_instructblip(name: str, device: torch.device | None = None) -> ModificationTextGenerator:
    """A real generator from the hub or a local copy, e.g. "Salesforce/instructblip-vicuna-7b": each part read alone
    from the checkpoint, the frozen ViT and LM in core.device's dtype (bf16 on CUDA), the Q-Former in float32."""
    from transformers import (AutoConfig, AutoModelForCausalLM, InstructBlipProcessor, InstructBlipQFormerModel,
                              InstructBlipVisionModel)

    config = AutoConfig.from_pretrained(name)
    if config.model_type != "instructblip":
        raise InputError(name, "model_type",
                         f"the generator reads an InstructBLIP checkpoint, got {config.model_type!r}")
    if config.text_config.is_encoder_decoder:
        raise InputError(name, "text_config", "the generator needs a decoder-only language model (e.g. Vicuna, OPT)")
    vision = pretrained_part(name, InstructBlipVisionModel, "vision_model.", device)
    qformer = pretrained_part(name, InstructBlipQFormerModel, "qformer.", trainable=True)
    lm = pretrained_part(name, AutoModelForCausalLM, "language_model.", device, config=config.text_config)
    projection = {k: checkpoint_tensor(name, f"language_projection.{k}") for k in ("weight", "bias")}
    processor = InstructBlipProcessor.from_pretrained(name)
    return from_parts(vision, qformer, lm, checkpoint_tensor(name, "query_tokens"), projection,
                      processor.image_processor, processor.qformer_tokenizer, processor.tokenizer, {"name": name})


def load_modification_generator(folder: str | Path, device: torch.device | None = None) -> ModificationTextGenerator:
    """Reload a trained generator folder (meta.json stage "mtst"), in eval mode, on `device` (default: get_device()).
    Trained parts come from the folder (float32); a named frozen ViT and LM are read alone from their checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, InstructBlipQFormerModel

    from core.checkpoint import read_meta

    folder = Path(folder)
    device = device or get_device()
    read_meta(folder, STAGE)
    spec = read_json(folder / SPEC_FILE, required=["num_query_tokens", "instruction"])
    image = load_image_tokens(folder / "image_encoder", device)
    qformer = InstructBlipQFormerModel.from_pretrained(folder / "qformer", **TRAINABLE_DTYPE)
    if (folder / "language_model").is_dir():
        lm = AutoModelForCausalLM.from_pretrained(folder / "language_model", **TRAINABLE_DTYPE)
    elif "language_model_name" in spec:
        name = spec["language_model_name"]
        lm = pretrained_part(name, AutoModelForCausalLM, "language_model.", device,
                             config=AutoConfig.from_pretrained(name).text_config)
    else:
        raise InputError(folder / "language_model", None, "language model weights are missing and no name is given")
    gen = ModificationTextGenerator(
        image, qformer, lm, AutoTokenizer.from_pretrained(folder / "qformer_tokenizer"),
        AutoTokenizer.from_pretrained(folder / "lm_tokenizer"), int(spec["num_query_tokens"]), spec["instruction"],
        {k: v for k, v in spec.items() if k not in ("num_query_tokens", "instruction")})
    bridge = torch.load(folder / "bridge.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        gen.query_tokens.copy_(bridge["query_tokens"])
        gen.segment.copy_(bridge["segment"])
    gen.language_projection.load_state_dict(bridge["language_projection"])
    gen.model_id = checkpoint_id(folder)
    return gen.to(device).eval()


def generator_summary(folder: str | Path) -> dict[str, Any]:
    """meta.json + modtext.json of a generator folder, for logs."""
    folder = Path(folder)
    return {**json.loads((folder / "meta.json").read_text()), **json.loads((folder / SPEC_FILE).read_text())}
