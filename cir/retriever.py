"""The composed retriever: a BLIP-2/Q-Former-style two-hop query encoder (PTHA) against Q-Former target features.

Hop one fuses (reference image tokens, modification text) into prototype tokens; hop two fuses (prototype, text) into
the query embedding. Targets go through hop one's Q-Former with its queries only (no text), as BLIP-2 encodes images.
Two variants (`spec["ptha_variant"]`, recorded in `retriever.json`):

- "official" (the default), as the authors' released model: hop two is the *same* Q-Former, run with hop one's tokens
  as its query embeddings beside the text and no image cross-attention (every token self-attends and takes the text
  feed-forward, as the released Q-Former does without image states); a target keeps one embedding per query token and
  a query scores it by the max over those tokens; the temperature is learnt; a text-only branch (learnable prompt
  tokens + the text, no image) serves L_t2t.
- "project" (folders written before the variant existed load as this): hop two is a second, freshly initialised
  Q-Former that cross-attends to hop one's tokens; a target is one mean-pooled embedding; fixed temperature.
The image encoder is frozen (the dense tower on Shapes, the InstructBLIP/BLIP-2 ViT on real data), so training may run
on cached image tokens: `encode_queries_from_tokens` / `encode_target_tokens_from_tokens` + `similarity` are what
the loss and `cir.evaluate` call, and `encode_queries` / `encode_targets` (pixels in) call the same functions, so what
is trained is what is searched with.

A retriever folder (`save_pretrained` / `from_pretrained`): `retriever.json`, `model.pt`, `meta.json` (stage "cir"),
`tokenizer/`, `hop1/` (its config), `image_encoder/`. `model.pt` holds the trained parts only: the frozen image tower
is described by `image_encoder/` (the project's small dense tower saved there; a pretrained ViT named by its checkpoint
and the fingerprint of its weights, reloaded alone from that checkpoint), so a retriever on a ViT-g is megabytes.
Folders written before this, with the tower in `model.pt`, still load.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cir.losses import max_over_tokens
from core.errors import InputError
from core.io import atomic_write_json, read_json
from core.modtext import (ImageTokens, build_word_tokenizer, checkpoint_tensor, dense_image_tokens, hf_image_tokens,
                          load_image_tokens, pretrained_part)

TOWER = "image_encoder."  # the frozen tower's keys in the module's state dict: never saved in model.pt

STAGE = "cir"
SPEC_FILE = "retriever.json"
VARIANTS = ("official", "project")
LEGACY_VARIANT = "project"  # what a retriever.json without "ptha_variant" was trained as
OFFICIAL_TEMPERATURE = 0.07  # the released model's initial (learnt) temperature
OFFICIAL_LABEL_SMOOTHING = 0.1  # the released model's L_q2t
# Tiny Q-Formers for the Shapes world (the real configs start hop one from BLIP-2's pretrained Q-Former).
SHAPES_RETRIEVER: dict[str, Any] = {
    "qformer": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                "cross_attention_frequency": 1, "max_position_embeddings": 64,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "num_query_tokens": 8,
    "embed_dim": 128,
    "max_text_length": 40,
}


class ComposedRetriever(nn.Module):
    """(reference image, modification text) → query embedding; image → target embedding; both L2-normalised."""

    def __init__(self, image_encoder: ImageTokens, tokenizer: Any, spec: dict[str, Any],
                 hop1: nn.Module | None = None):
        super().__init__()
        from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

        self.spec = copy.deepcopy(spec)
        self.variant = self.spec.setdefault("ptha_variant", "official")
        if self.variant not in VARIANTS:
            raise InputError(SPEC_FILE, "ptha_variant", f"must be one of {VARIANTS}, got {self.variant!r}")
        self.image_encoder, self.tokenizer = image_encoder, tokenizer
        q = dict(spec["qformer"])
        cfg1 = InstructBlipQFormerConfig(**q, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                         encoder_hidden_size=image_encoder.hidden_size)
        self.hop1 = hop1 if hop1 is not None else InstructBlipQFormerModel(cfg1)
        hidden = self.hop1.config.hidden_size
        n_q, dim = int(spec["num_query_tokens"]), int(spec["embed_dim"])
        self.query_tokens1 = nn.Parameter(torch.randn(1, n_q, hidden) * 0.02)
        self.query_proj = nn.Linear(hidden, dim)  # the released model's text_proj (composed and text-only features)
        self.target_proj = nn.Linear(hidden, dim)  # ... and its vision_proj
        if self.variant == "official":
            # The released model draws its prompt tokens with std = hidden size; the Q-Former's embedding LayerNorm
            # makes their scale irrelevant to the forward pass, and at that scale an optimizer step would barely
            # move them, so they start like the query tokens.
            self.prompt_tokens = nn.Parameter(torch.randn(1, n_q, hidden) * 0.02)
            # The released model learns the raw temperature at BLIP-2's learning rates (about 1e-5); at this
            # project's (1e-3 and up) one Adam step would move a raw 0.07 by 1-4 %, so it is learnt as CLIP learns
            # it, a log inverse temperature, where a step is a relative change of that size.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / OFFICIAL_TEMPERATURE)))
        else:
            cfg2 = InstructBlipQFormerConfig(**{**q, "hidden_size": hidden}, vocab_size=len(tokenizer),
                                             pad_token_id=tokenizer.pad_token_id, encoder_hidden_size=hidden)
            self.hop2 = InstructBlipQFormerModel(cfg2)
            self.query_tokens2 = nn.Parameter(torch.randn(1, n_q, hidden) * 0.02)
            self.proto_proj = nn.Linear(hidden, dim)
        self.register_state_dict_post_hook(_drop_tower)
        self.register_load_state_dict_pre_hook(_keep_tower)

    @property
    def device(self) -> torch.device:
        return self.query_tokens1.device

    @property
    def preprocess(self):
        return self.image_encoder.preprocess

    # ---- the embeddings (one code path for training and inference)
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # BLIP-2's Q-Former was pretrained on BERT inputs ([CLS] text [SEP]), which the real backbone keeps; the
        # project's word tokenizers have no special tokens to add
        special = bool(self.spec.get("text_special_tokens", False))
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=int(self.spec["max_text_length"]),
                             return_tensors="pt", add_special_tokens=special)
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen patch tokens [B, N, D] of images (what the training caches)."""
        return self.image_encoder(pixels.to(self.device))

    @staticmethod
    def _fuse(qformer: nn.Module, queries: torch.Tensor, ids: torch.Tensor | None, mask: torch.Tensor | None,
              memory: torch.Tensor) -> torch.Tensor:
        """Queries (+ text, self-attending together) cross-attend to `memory`; returns the query outputs [B, Q, H]."""
        b, n_q = memory.shape[0], queries.shape[1]
        queries = queries.expand(b, -1, -1)
        full_mask = None
        if ids is not None:
            full_mask = torch.cat([torch.ones(b, n_q, dtype=mask.dtype, device=mask.device), mask], dim=1)
        out = qformer(input_ids=ids, attention_mask=full_mask, query_embeds=queries, encoder_hidden_states=memory)
        return out.last_hidden_state[:, :n_q]

    def prototype_tokens(self, image_tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hop one: (image, text) → prototype tokens [B, Q, H]."""
        return self._fuse(self.hop1, self.query_tokens1, ids, mask, image_tokens)

    def _self_attend(self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hop1's Q-Former on (prefix tokens, text) with no image: every token self-attends, none cross-attends, and
        all take the text feed-forward, as the released Q-Former runs when it is given no image states. Returns the
        hidden states [B, P + L, H] (the prefix first)."""
        from transformers.masking_utils import create_bidirectional_mask

        b, n_p = ids.shape[0], prefix.shape[1]
        embeddings = self.hop1.embeddings(input_ids=ids, query_embeds=prefix.expand(b, -1, -1))
        full_mask = torch.cat([torch.ones(b, n_p, dtype=mask.dtype, device=mask.device), mask], dim=1)
        attention = create_bidirectional_mask(config=self.hop1.config, inputs_embeds=embeddings,
                                              attention_mask=full_mask)
        return self.hop1.encoder(embeddings, attention_mask=attention, query_length=0).last_hidden_state

    def second_hop(self, proto: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hop two: (prototype tokens, text) → the query embedding [B, D] (L2-normalised), the mean over the
        query positions' outputs. The released code averages those with the [CLS] output while training and reads
        [CLS] alone when searching; the project's word tokenizers add no [CLS] (BLIP-2's BERT tokenizer does, on
        the real backbone), and one pooling, over the query positions, serves both here."""
        if self.variant == "official":
            fused = self._self_attend(proto, ids, mask)[:, :proto.shape[1]]
        else:
            fused = self._fuse(self.hop2, self.query_tokens2, ids, mask, proto)
        return F.normalize(self.query_proj(fused.mean(dim=1)), dim=-1)

    def encode_queries_with_prototype(self, image_tokens: torch.Tensor,
                                      texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(query embedding [B, D], L2-normalised, mean over query tokens; the prototype L_p2p aligns). The
        prototype is hop one's tokens [B, Q, H] ("official": L_p2p compares their means) or their projected,
        normalised mean [B, D] ("project")."""
        ids, mask = self.tokenize(texts)
        proto = self.prototype_tokens(image_tokens.to(self.device), ids, mask)
        query = self.second_hop(proto, ids, mask)
        if self.variant == "official":
            return query, proto
        return query, F.normalize(self.proto_proj(proto.mean(dim=1)), dim=-1)

    def encode_reverse_prototype(self, image_tokens: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """The reverse branch's prototype (target image + reverse text), in `encode_queries_with_prototype`'s form.
        The official branch runs hop one only: its prototype is all L_p2p reads."""
        if self.variant != "official":
            return self.encode_queries_with_prototype(image_tokens, texts)[1]
        ids, mask = self.tokenize(texts)
        return self.prototype_tokens(image_tokens.to(self.device), ids, mask)

    def encode_text_only(self, texts: Sequence[str]) -> torch.Tensor:
        """The official text-only branch (L_t2t): learnable prompt tokens + the modification text through hop1's
        Q-Former, no image; [B, D] L2-normalised. The released model reads the [CLS] output, which attends to every
        token; with no [CLS] in the project's tokenizers the first prompt token's output plays that role."""
        if self.variant != "official":
            raise ValueError("the text-only branch belongs to the official PTHA variant")
        ids, mask = self.tokenize(texts)
        hidden = self._self_attend(self.prompt_tokens, ids, mask)
        return F.normalize(self.query_proj(hidden[:, 0]), dim=-1)

    def encode_queries_from_tokens(self, image_tokens: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_queries_with_prototype(image_tokens, texts)[0]

    def encode_target_tokens_from_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, D] L2-normalised target embeddings, what `similarity` scores: one per query token ("official",
        T = num_query_tokens) or their mean-pooled one ("project", T = 1)."""
        feats = self._fuse(self.hop1, self.query_tokens1, None, None, image_tokens.to(self.device))
        if self.variant == "official":
            return F.normalize(self.target_proj(feats), dim=-1)
        return F.normalize(self.target_proj(feats.mean(dim=1)), dim=-1)[:, None]

    def encode_targets_from_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[B, D] L2-normalised, one vector per image for single-vector search (the iterative loop's backbone
        interface); for the official variant the normalised mean of the per-token embeddings, which is not how it
        was trained to score: `encode_target_tokens_from_tokens` + `similarity` is."""
        tokens = self.encode_target_tokens_from_tokens(image_tokens)
        return tokens[:, 0] if tokens.shape[1] == 1 else F.normalize(tokens.mean(dim=1), dim=-1)

    @staticmethod
    def similarity(query: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
        """[B, M] scores of queries [B, D] against targets [M, T, D]: the max over each target's tokens (the inner
        product when T = 1)."""
        return max_over_tokens(query, target_tokens)

    def contrastive_temperature(self, fixed: float) -> torch.Tensor | float:
        """The contrastive temperature: learnt ("official", 1 / exp(logit_scale), kept in [0.001, 0.5] as BLIP-2
        keeps its own) or the configured `fixed` one ("project")."""
        if self.variant == "official":
            return 1.0 / self.logit_scale.clamp(math.log(2.0), math.log(1000.0)).exp()
        return fixed

    @property
    def label_smoothing(self) -> float:
        """L_q2t's label smoothing: 0.1 in the released model, none in the project variant."""
        return OFFICIAL_LABEL_SMOOTHING if self.variant == "official" else 0.0

    def encode_queries(self, ref_pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """[B, D] L2-normalised query embeddings from reference pixels and modification texts."""
        if len(texts) != ref_pixels.shape[0]:
            raise InputError(None, "texts", f"{len(texts)} texts for {ref_pixels.shape[0]} reference images")
        return self.encode_queries_from_tokens(self.image_tokens(ref_pixels), texts)

    def encode_targets(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, D] L2-normalised target embeddings from pixels."""
        return self.encode_targets_from_tokens(self.image_tokens(pixels))

    # ---- folders
    def write_files(self, folder: str | Path) -> None:
        """Everything beside model.pt that makes a folder reload alone (core.checkpoint's `model_files`)."""
        folder = Path(folder)
        atomic_write_json(folder / SPEC_FILE, self.spec)
        self.hop1.config.save_pretrained(folder / "hop1")  # a pretrained hop one may differ from spec["qformer"]
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.image_encoder.save(folder / "image_encoder")

    def save_pretrained(self, folder: str | Path, step: int = 0, extra: dict[str, Any] | None = None) -> Path:
        from core.checkpoint import save_checkpoint

        return save_checkpoint(folder, stage=STAGE, model=self, step=step, extra=extra, model_files=self.write_files)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | None = None) -> "ComposedRetriever":
        from transformers import AutoTokenizer, InstructBlipQFormerConfig, InstructBlipQFormerModel

        from core.checkpoint import load_model_weights, read_meta
        from core.device import get_device

        folder = Path(folder)
        device = device or get_device()
        read_meta(folder, STAGE)
        spec = read_json(folder / SPEC_FILE, required=["qformer", "num_query_tokens", "embed_dim"])
        spec.setdefault("ptha_variant", LEGACY_VARIANT)
        hop1 = InstructBlipQFormerModel(InstructBlipQFormerConfig.from_pretrained(folder / "hop1"))
        model = cls(load_image_tokens(folder / "image_encoder", device),
                    AutoTokenizer.from_pretrained(folder / "tokenizer"), spec, hop1=hop1)
        load_model_weights(folder, model, STAGE)
        return model.to(device).eval()


def _drop_tower(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: the frozen tower is named in `image_encoder/`, never copied into model.pt."""
    for key in [k for k in state_dict if k.startswith(prefix + TOWER)]:
        del state_dict[key]


def _keep_tower(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: a model.pt without the tower keeps the tower already loaded (from its name or its
    folder); an older model.pt that holds it loads it as before."""
    for key, value in module.image_encoder.state_dict().items():
        state_dict.setdefault(prefix + TOWER + key, value)


def build_shapes_retriever(dense_folder: str | Path, texts: Sequence[str],
                           spec: dict[str, Any] | None = None) -> ComposedRetriever:
    """A fresh retriever on the dense image tower (frozen), with a word tokenizer over `texts`."""
    return ComposedRetriever(dense_image_tokens(dense_folder), build_word_tokenizer(texts),
                             {**copy.deepcopy(SHAPES_RETRIEVER), **(spec or {}), "kind": "shapes"})


def retriever_from_instructblip(model: nn.Module, image_processor: Any, tokenizer: Any, spec: dict[str, Any],
                                source: dict[str, Any] | None = None) -> ComposedRetriever:
    """Real data: hop one starts from a (pretrained) InstructBLIP Q-Former, the image encoder is its frozen ViT."""
    return retriever_from_parts(model.vision_model, model.qformer, model.query_tokens, image_processor, tokenizer, spec,
                                source)


def retriever_from_parts(vision: nn.Module, qformer: nn.Module, query_tokens: torch.Tensor, image_processor: Any,
                         tokenizer: Any, spec: dict[str, Any], source: dict[str, Any] | None = None,
                         kind: str = "instructblip") -> ComposedRetriever:
    """A retriever on a pretrained ViT (InstructBLIP's or BLIP-2's, frozen; `source["name"]` names the checkpoint it
    reloads from) whose hop one starts from that checkpoint's Q-Former and query tokens (trained, float32)."""
    source = dict(source or {})
    image = hf_image_tokens(vision, image_processor, {k: source[k] for k in ("name",) if k in source}
                            | {"vision_class": type(vision).__name__})
    q = {**spec["qformer"], "hidden_size": qformer.config.hidden_size}
    full = {**spec, "qformer": q, "kind": kind, **source}
    retriever = ComposedRetriever(image, tokenizer, full, hop1=qformer.float())
    with torch.no_grad():
        n = min(retriever.query_tokens1.shape[1], query_tokens.shape[1])
        retriever.query_tokens1[:, :n].copy_(query_tokens[:, :n])
    return retriever


def load_pretrained_retriever(name: str, spec: dict[str, Any], device: torch.device | None = None) -> ComposedRetriever:
    """The retriever a real run starts from: BLIP-2's retrieval checkpoint (`load_blip2_retriever`, e.g.
    "Salesforce/blip2-itm-vit-g", the paper's backbone) or an InstructBLIP one (e.g.
    "Salesforce/instructblip-flan-t5-xl": its ViT, frozen, and its Q-Former, each read alone, its language model
    never loaded)."""
    from transformers import AutoConfig, InstructBlipProcessor, InstructBlipQFormerModel, InstructBlipVisionModel

    config = AutoConfig.from_pretrained(name)
    if config.model_type == "blip-2":
        return load_blip2_retriever(name, config, spec, device)
    if config.model_type != "instructblip":
        raise InputError(name, "model_type", "hop one starts from a BLIP-2 retrieval or an InstructBLIP checkpoint, "
                                             f"got {config.model_type!r}")
    vision = pretrained_part(name, InstructBlipVisionModel, "vision_model.", device)
    qformer = pretrained_part(name, InstructBlipQFormerModel, "qformer.", trainable=True)
    processor = InstructBlipProcessor.from_pretrained(name)
    return retriever_from_parts(vision, qformer, checkpoint_tensor(name, "query_tokens"), processor.image_processor,
                                processor.qformer_tokenizer, spec, {"name": name})


# BLIP-2's retrieval checkpoint keeps its Q-Former's text embeddings beside it (`embeddings.*`, named as InstructBLIP's
# Q-Former names them) and the input LayerNorm inside it (`qformer.layernorm`); InstructBLIP's Q-Former class holds
# both in `embeddings` and computes the same thing (word + position embeddings after the queries, then that
# LayerNorm), so BLIP-2's tensors load into it under these names. `embeddings.*` needs no renaming.
BLIP2_QFORMER_KEYS = {r"^qformer\.layernorm\.": "embeddings.layernorm.", r"^qformer\.encoder\.": "encoder."}
# The retriever's heads and the checkpoint's ITC projections they start from (the released PTHA model scores
# composed and text-only features with BLIP-2's text_proj and targets with its vision_proj).
BLIP2_HEADS = {"query_proj": "text_projection", "target_proj": "vision_projection"}
BLIP2_CLASS = "Blip2ForImageTextRetrieval"


def blip2_qformer_config(config: Any) -> Any:
    """BLIP-2's Q-Former config as InstructBLIP's Q-Former class takes it (the same fields, less the switch that
    gives BLIP-2's layers their text feed-forward, which InstructBLIP's always have)."""
    from transformers import InstructBlipQFormerConfig

    allowed = set(InstructBlipQFormerConfig().to_dict()) - {"model_type", "transformers_version", "architectures"}
    return InstructBlipQFormerConfig(**{k: v for k, v in config.qformer_config.to_dict().items() if k in allowed})


def load_blip2_retriever(name: str, config: Any, spec: dict[str, Any],
                         device: torch.device | None = None) -> ComposedRetriever:
    """The paper's backbone, as the released PTHA model starts from BLIP-2's first-stage checkpoint: the ViT (frozen,
    core.device's dtype, bf16 on CUDA; its last LayerNorm is BLIP-2's `ln_vision`), the Q-Former with its text
    embeddings, the query tokens and the two ITC projections (all trained, float32), the BERT tokenizer (texts keep
    its [CLS] ... [SEP], as the Q-Former was pretrained on them). Each part is
    read alone from `name` (a `Blip2ForImageTextRetrieval` checkpoint); the ITM head is not used. The checkpoint's
    query count and ITC width replace `num_query_tokens` / `embed_dim`."""
    from transformers import AutoImageProcessor, AutoTokenizer, Blip2VisionModel, InstructBlipQFormerModel

    if BLIP2_CLASS not in (config.architectures or []) or not config.qformer_config.use_qformer_text_input:
        raise InputError(Path(name) / "config.json", "architectures",
                         f"hop one starts from BLIP-2's retrieval checkpoint ({BLIP2_CLASS}, e.g. "
                         "Salesforce/blip2-itm-vit-g: a Q-Former with text layers and ITC projections), got "
                         f"{config.architectures}")
    vision = pretrained_part(name, Blip2VisionModel, "vision_model.", device)
    qformer = pretrained_part(name, InstructBlipQFormerModel, "qformer.", trainable=True,
                              config=blip2_qformer_config(config), key_mapping=BLIP2_QFORMER_KEYS)
    spec = {**spec, "num_query_tokens": int(config.num_query_tokens), "embed_dim": int(config.image_text_hidden_size),
            "text_special_tokens": True}
    retriever = retriever_from_parts(vision, qformer, checkpoint_tensor(name, "query_tokens"),
                                     AutoImageProcessor.from_pretrained(name), AutoTokenizer.from_pretrained(name),
                                     spec, {"name": name}, kind="blip2")
    with torch.no_grad():
        for head, key in BLIP2_HEADS.items():
            getattr(retriever, head).weight.copy_(checkpoint_tensor(name, f"{key}.weight"))
            getattr(retriever, head).bias.copy_(checkpoint_tensor(name, f"{key}.bias"))
    return retriever
