"""The ComGTIR-D retriever: a T5 that generates an image's sequential identifier from a query, and a global
relevance head over the T5 encoder that scores identifier codes as a set (the order-invariant identifier).

A trained model is a folder: `model.pt` (all weights), `t5/config.json`, `tokenizer/`, `retriever.json` and
`meta.json` (core.checkpoint), so it reloads without its training config.
"""
from __future__ import annotations

import dataclasses
import json
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

# A T5 small enough to train from scratch on the Shapes world on two CPU cores in a minute or two.
SHAPES_T5: dict[str, Any] = {"d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2,
                             "num_heads": 4, "dropout_rate": 0.1}


@dataclass
class RetrieverSpec:
    """The identifier layout the model was built for (saved as retriever.json)."""
    levels: int
    codebook_size: int
    suffix_size: int
    set_size: int
    shared_codebook: bool

    @classmethod
    def from_identifiers(cls, ids: Any) -> "RetrieverSpec":
        return cls(ids.levels, ids.codebook_size, ids.suffix_size, ids.set_size, ids.shared)

    def check_fits(self, ids: Any) -> None:
        """The identifiers of a codes.json must be the ones this model's vocabulary and set head were built for."""
        theirs = RetrieverSpec.from_identifiers(ids)
        for f in dataclasses.fields(self):
            mine, other = getattr(self, f.name), getattr(theirs, f.name)
            if f.name == "suffix_size" and other <= mine:
                continue  # fewer disambiguation codes needed: still fits
            if mine != other:
                raise InputError(ids.path, f.name, f"{other} does not fit the model's vocabulary (built for {mine})")


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
        self.set_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, spec.set_size))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.t5.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def set_logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Relevance of every set element (code) to the query: masked mean of encoder states → MLP."""
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return self.set_head(pooled)

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
