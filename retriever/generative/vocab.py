"""The retriever's vocabulary: text tokens plus one token per (level, code) of the identifiers.

For Shapes the text part is a WordLevel tokenizer trained with the `tokenizers` library on the training queries;
for real data it is a pretrained tokenizer (`AutoTokenizer.from_pretrained(name)`, e.g. t5-base). Either way the
identifier tokens are added by name (`<c{level}_{code}>`, `<s_{j}>` for the disambiguation suffix) and looked up
by name: `CodeVocab` maps (level, code) ↔ token id through the tokenizer, with asserts, never by offset.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from core.errors import InputError

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # T5's conventions: pad 0 (also the decoder start), eos 1, unk 2


def code_token(level: int, code: int, suffix_level: bool) -> str:
    return f"<s_{code}>" if suffix_level else f"<c{level}_{code}>"


def identifier_tokens(levels: int, codebook_size: int, suffix_size: int) -> list[str]:
    """Every identifier token, level by level; the last level is the suffix."""
    names = [code_token(level, c, False) for level in range(levels) for c in range(codebook_size)]
    return names + [code_token(levels, j, True) for j in range(suffix_size)]


def train_word_tokenizer(texts: Iterable[str], min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A lower-cased WordLevel tokenizer trained on `texts`, appending </s> like T5's."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, EOS, UNK], min_frequency=min_frequency)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def build_tokenizer(name_or_path: str, texts: Iterable[str] | None, levels: int, codebook_size: int,
                    suffix_size: int) -> PreTrainedTokenizerFast:
    """The text tokenizer ("word" = train one on `texts`, else a pretrained name or folder) + identifier tokens."""
    tokenizer = train_word_tokenizer(texts or []) if name_or_path == "word" else AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.add_tokens(identifier_tokens(levels, codebook_size, suffix_size), special_tokens=True)
    return tokenizer


class CodeVocab:
    """(level, code) ↔ token id for identifiers of `levels` code levels plus one suffix level."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, levels: int, codebook_size: int, suffix_size: int,
                 source: str = "tokenizer"):
        self.levels, self.codebook_size, self.suffix_size = levels, codebook_size, suffix_size
        self.length = levels + 1
        width = max(codebook_size, suffix_size)
        # token_ids[level, code] (-1 where the level has no such code: the suffix level is shorter or longer)
        self.token_ids = torch.full((self.length, width), -1, dtype=torch.long)
        vocab = tokenizer.get_vocab()
        for level in range(self.length):
            size = suffix_size if level == levels else codebook_size
            for code in range(size):
                name = code_token(level, code, level == levels)
                if name not in vocab:
                    raise InputError(source, "vocabulary",
                                     f"identifier token {name} is missing: the identifiers ({levels} levels × "
                                     f"{codebook_size} codes, suffix {suffix_size}) do not fit this tokenizer")
                self.token_ids[level, code] = vocab[name]
        ids = self.token_ids[self.token_ids >= 0]
        assert len(set(ids.tolist())) == len(ids), "two identifier codes share a token"
        self.vocab_size = len(tokenizer)
        assert int(ids.max()) < self.vocab_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        assert self.eos_id is not None and self.pad_id is not None
        # code_of_token[token] = code index at its level (or -1)
        self.code_of_token = torch.full((self.vocab_size,), -1, dtype=torch.long)
        for level in range(self.length):
            valid = self.token_ids[level] >= 0
            self.code_of_token[self.token_ids[level][valid]] = torch.arange(len(valid))[valid]

    def encode(self, codes: torch.Tensor) -> torch.Tensor:
        """Identifier codes [n, L+1] → token ids [n, L+1]."""
        tokens = self.token_ids[torch.arange(self.length), codes]
        assert (tokens >= 0).all(), "code out of range for its level"
        return tokens

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [n, L+1] → codes [n, L+1] (asserting they are identifier tokens of the right level)."""
        codes = self.code_of_token[tokens]
        assert (codes >= 0).all(), "not an identifier token"
        assert (self.token_ids[torch.arange(self.length), codes] == tokens).all(), "token at the wrong level"
        return codes


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    tokenizer.save_pretrained(str(folder))


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(folder))
