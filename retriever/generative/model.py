"""The ComGTIR-D retriever: a T5 that generates an image's sequential identifier from a query, and a global
relevance head over the T5 encoder that scores identifier codes as a set (the order-invariant identifier).

A trained model is a folder: `model.pt` (all weights), `t5/config.json`, `tokenizer/`, `retriever.json` and
`meta.json` (core.checkpoint), so it reloads without its training config.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from core.checkpoint import load_model_weights, read_meta
from core.errors import InputError
from core.io import atomic_write_json
from retriever.generative.vocab import CodeVocab, load_tokenizer, save_tokenizer

STAGE = "comgtir"
SET_LOSSES = ("margin", "infonce")
SET_POOLINGS = ("max", "mean")  # max: the original ComGTIR-D's; mean: a masked mean
SET_HEADS = ("linear", "mlp")  # linear: the original's one layer d_model → set size; mlp: d_model → d_model → set size
CODE_INITS = ("codebook", "random")  # code-token embeddings and set head from the RQ-VAE codebook, or T5's random init

# A T5 small enough to train from scratch on the Shapes world on two CPU cores in a minute or two.
SHAPES_T5: dict[str, Any] = {"d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2,
                             "num_heads": 4, "dropout_rate": 0.1}


@dataclass
class RetrieverSpec:
    """The identifier layout the model was built for and the set head's form (saved as retriever.json; a folder
    written before the set head had options holds no `set_pooling`/`set_head` and was a mean-pooled MLP)."""
    levels: int
    codebook_size: int
    suffix_size: int
    set_size: int
    shared_codebook: bool
    set_pooling: str = "mean"
    set_head: str = "mlp"
    rqvae_weights: str = ""  # digest of the RQ-VAE that made the identifiers ("" = not recorded, older folders)

    IDENTIFIER_FIELDS = ("levels", "codebook_size", "suffix_size", "set_size", "shared_codebook")

    def __post_init__(self):
        if self.set_pooling not in SET_POOLINGS:
            raise InputError("config", "set_pooling", f"must be one of {SET_POOLINGS}, got {self.set_pooling!r}")
        if self.set_head not in SET_HEADS:
            raise InputError("config", "set_head", f"must be one of {SET_HEADS}, got {self.set_head!r}")

    @classmethod
    def from_identifiers(cls, ids: Any, set_pooling: str = "mean", set_head: str = "mlp") -> "RetrieverSpec":
        return cls(ids.levels, ids.codebook_size, ids.suffix_size, ids.set_size, ids.shared, set_pooling, set_head,
                   ids.rqvae_weights)

    def check_fits(self, ids: Any) -> None:
        """The identifiers of a codes.json must be the ones this model's vocabulary and set head were built for."""
        theirs = RetrieverSpec.from_identifiers(ids)
        for name in self.IDENTIFIER_FIELDS:
            mine, other = getattr(self, name), getattr(theirs, name)
            if name == "suffix_size" and other <= mine:
                continue  # fewer disambiguation codes needed: still fits
            if mine != other:
                raise InputError(ids.path, name, f"{other} does not fit the model's vocabulary (built for {mine})")
        # codes of the same sizes from another tokenizer run fit the vocabulary but mean other images
        if self.rqvae_weights and ids.rqvae_weights and self.rqvae_weights != ids.rqvae_weights:
            raise InputError(ids.path, "rqvae_weights", f"made by another RQ-VAE run ({ids.rqvae_weights[:12]}) than "
                             f"the identifiers this model was trained on ({self.rqvae_weights[:12]})")


def build_t5(model: dict[str, Any], vocab_size: int, pad_id: int, eos_id: int) -> T5ForConditionalGeneration:
    """A pretrained T5 (`{"pretrained": "t5-base"}`) with its embeddings grown to the vocabulary, or a T5 from a config dict.

    The T5 is trained here, not a frozen tower: it loads in float32 whatever the checkpoint's own dtype (the
    optimizer's master weights; bf16 weights would lose updates below their 8-bit mantissa), and the forward
    passes run in bf16 under core.device.autocast."""
    if "pretrained" in model:
        t5 = T5ForConditionalGeneration.from_pretrained(model["pretrained"], dtype=torch.float32)
        t5.resize_token_embeddings(vocab_size)
        return t5
    config = T5Config(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id,
                      **model)
    return T5ForConditionalGeneration(config)


class GenerativeRetriever(nn.Module):
    def __init__(self, t5: T5ForConditionalGeneration, spec: RetrieverSpec):
        super().__init__()
        self.t5, self.spec = t5, spec
        d = t5.config.d_model
        # a Sequential either way, so the output layer is set_head[-1] and the parameter names stay the same
        hidden_layers = [nn.Linear(d, d), nn.GELU()] if spec.set_head == "mlp" else []
        self.set_head = nn.Sequential(*hidden_layers, nn.Linear(d, spec.set_size))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.t5.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def set_logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Relevance of every set element (code) to the query: encoder states pooled over the query's own tokens
        (spec.set_pooling) → the set head."""
        return self.set_head(pool_states(hidden, attention_mask, self.spec.set_pooling))

    def seq_loss(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the identifier tokens given the query (teacher forcing)."""
        out = self.t5(encoder_outputs=(hidden,), attention_mask=attention_mask, labels=labels)
        return out.loss

    def set_log_prob(self, set_logits: torch.Tensor) -> torch.Tensor:
        """log p(element) over the set elements, [n, E]: a softmax over the shared book, or over each level's codes."""
        n, levels, k = len(set_logits), self.spec.levels, self.spec.codebook_size
        if self.spec.shared_codebook:
            return F.log_softmax(set_logits, -1)
        return F.log_softmax(set_logits.view(n, levels, k), -1).view(n, levels * k)

    def level_log_prior(self, set_logits: torch.Tensor) -> torch.Tensor:
        """log p(code | level) from the set scores, [n, L, K]: what the set identifier says about each level."""
        n, levels, k = len(set_logits), self.spec.levels, self.spec.codebook_size
        log_prob = self.set_log_prob(set_logits)
        if self.spec.shared_codebook:
            return log_prob.unsqueeze(1).expand(n, levels, k)
        return log_prob.view(n, levels, k)


def pool_states(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, d] → [B, d] over the unpadded positions only, so a query's set scores never depend on its batch.

    "max" is the original ComGTIR-D's pooling (an element-wise max over positions); the original takes it over the
    padding too, which makes a query's scores depend on how far it was padded; here padding never wins the max."""
    if how == "max":
        keep = attention_mask.unsqueeze(-1).bool()
        return hidden.masked_fill(~keep, torch.finfo(hidden.dtype).min).amax(1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return pooled


def codebook_projection(dim: int, d_model: int, seed: int = 0) -> torch.Tensor:
    """[dim, d_model]: how RQ-VAE code vectors become T5 token embeddings.

    The original copies the codebook rows into the embedding table as they are, which needs dim = d_model; that
    case is the identity here. Otherwise a fixed random semi-orthogonal map drawn from `seed`, not learned (the
    embeddings it initialises are trained from there on): inner products and norms are kept exactly when
    dim ≤ d_model, and norms in expectation (scaled by √(dim/d_model)) when the codebook is wider."""
    if dim == d_model:
        return torch.eye(dim)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(dim, d_model), min(dim, d_model), generator=gen))  # orthonormal columns
    proj = q if dim > d_model else q.T
    return proj * math.sqrt(max(dim / d_model, 1.0))


@torch.no_grad()
def init_from_codebook(model: GenerativeRetriever, vocab: CodeVocab, codebooks: torch.Tensor,
                       seed: int = 0) -> torch.Tensor:
    """The original ComGTIR-D's initialisation: the embedding of code token (level l, code c) is codebook row
    (l, c) mapped to d_model (codebook_projection), and the set head's output layer is those rows with a zero bias,
    so a code's set score starts as the inner product of the pooled query with that code's embedding (the original
    copies the LM head's code-token rows, which T5 ties to the embeddings). `codebooks` is the RQ-VAE's
    [books, K, dim]: one book shared by every level, or one per level. The suffix tokens keep their random init
    (they have no code vector). Returns the projection used."""
    spec, d_model = model.spec, model.t5.config.d_model
    levels, k = spec.levels, spec.codebook_size
    assert tuple(codebooks.shape[:2]) == (1 if spec.shared_codebook else levels, k), "codebook does not fit the spec"
    proj = codebook_projection(codebooks.shape[-1], d_model, seed)
    mapped = codebooks.float().cpu() @ proj  # [books, K, d_model]
    per_level = mapped.expand(levels, k, d_model) if spec.shared_codebook else mapped
    embeddings = model.t5.get_input_embeddings().weight
    embeddings[vocab.token_ids[:levels, :k].to(embeddings.device)] = per_level.to(embeddings)
    out = model.set_head[-1]
    # set element c of a shared book, or level·K + c of per-level books (rqvae.codes.set_identifier)
    out.weight.copy_(mapped[0] if spec.shared_codebook else mapped.reshape(levels * k, d_model))
    out.bias.zero_()
    return proj


def set_loss(set_logits: torch.Tensor, target_sets: torch.Tensor, imgids: torch.Tensor, kind: str = "margin",
             margin: float = 0.5, first: int = 0, shares: int = 1) -> torch.Tensor:
    """The order-invariant identifier's loss; `target_sets` is a multi-hot [B, E] of each query's image codes.

    "margin" (default; the ComGTIR paper's set-identifier objective): the set score s(q, I) = mean of the code
    scores of I's codes must beat every other in-batch image's by `margin`: mean max(0, m − s(q, I⁺) + s(q, I⁻)).
    "infonce" (the reference code's variant): a multi-positive softmax over all codes,
    −mean_{c ∈ set(I⁺)} log softmax(scores)_c.

    Under torchrun `set_logits` holds one rank's queries, rows [first, first + b) of the global batch whose
    `target_sets` and `imgids` (data, needing no gradient) are given whole: every image of the global batch is a
    negative. The margin loss is a mean over the global batch's negative pairs, so each rank sums its rows' hinges
    and divides by its 1/`shares` of that count; the mean over ranks that DDP takes is then the global loss.
    """
    rows = slice(first, first + len(set_logits))
    if kind == "infonce":
        logp = F.log_softmax(set_logits, -1)
        targets = target_sets[rows]
        return -((logp * targets).sum(-1) / targets.sum(-1).clamp(min=1)).mean()
    if kind != "margin":
        raise InputError("config", "set_loss", f"must be one of {SET_LOSSES}, got {kind!r}")
    weights = target_sets / target_sets.sum(-1, keepdim=True).clamp(min=1)
    scores = set_logits @ weights.T  # [b queries, B images]
    pos = scores.gather(1, torch.arange(rows.start, rows.stop, device=scores.device).unsqueeze(1))
    negative = imgids[rows].unsqueeze(1) != imgids.unsqueeze(0)  # the same image twice in a batch is no negative
    hinge = F.relu(margin - pos + scores) * negative
    pairs = (imgids.unsqueeze(0) != imgids.unsqueeze(1)).sum().clamp(min=1)
    return hinge.sum() / (pairs / shares)


def save_retriever_files(model: GenerativeRetriever, tokenizer: Any):
    """`model_files` callback for core.checkpoint.save_checkpoint: everything but the weights."""
    def write(folder: Path) -> None:
        model.t5.config.save_pretrained(str(Path(folder) / "t5"))
        save_tokenizer(tokenizer, Path(folder) / "tokenizer")
        atomic_write_json(Path(folder) / "retriever.json", dataclasses.asdict(model.spec))
    return write


def load_retriever(folder: str | Path, map_location: str = "cpu") -> tuple[GenerativeRetriever, Any, CodeVocab, dict]:
    """(model, tokenizer, code vocabulary, meta) from a checkpoint folder written by this stage."""
    folder = Path(folder)
    meta = read_meta(folder, stage=STAGE)
    spec_path = folder / "retriever.json"
    if not spec_path.is_file():
        raise InputError(spec_path, None, "not a ComGTIR retriever folder (retriever.json is missing)")
    spec = RetrieverSpec(**json.loads(spec_path.read_text()))
    tokenizer = load_tokenizer(folder / "tokenizer")
    t5 = T5ForConditionalGeneration(T5Config.from_pretrained(str(folder / "t5")))
    model = GenerativeRetriever(t5, spec)
    load_model_weights(folder, model, stage=STAGE)
    vocab = CodeVocab(tokenizer, spec.levels, spec.codebook_size, spec.suffix_size, source=str(folder / "tokenizer"))
    return model.eval(), tokenizer, vocab, meta
