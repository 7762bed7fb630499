"""Caption → layout: which shape, colour and size a caption puts in each cell of the Shapes grid.

The Shapes generator draws from this layout, as layout-grounded diffusion does (text → layout → image; LMD, Lian
et al., 2023; GLIGEN, Li et al., 2023): the dense text tower hardly encodes where things are or which shape they
have (docs/mir.md), and a UNet conditioned only on it leaves both to the noise. A `LayoutEncoder` is a
bidirectional GRU and a small transformer over the caption's tokens (the dense tower's tokenizer, its own
embeddings) with one learned query per grid cell; it is trained on the training split's captions against the world's `scenes.json`, and at generation
time it reads text only. A partial caption ("a purple square and something else") gives spread-out
probabilities, so the generator learns what to draw when the caption leaves a cell open.

Reads the caption tokens and scenes; `load_or_train_layout` caches the trained encoder as one file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.fit import fit
from core.shapes.world import COLOUR_CLASSES, GRID, SHAPE_CLASSES, SIZE_CLASSES, Scene, cell_classes

CELLS = GRID * GRID
GROUPS = (len(SHAPE_CLASSES), len(COLOUR_CLASSES), len(SIZE_CLASSES))
LAYOUT_CHANNELS = sum(GROUPS)  # per cell: a distribution over shapes, one over colours, one over sizes
LAYOUT_FILE = "layout_encoder.pt"
LAYOUT_CONTEXT = 64  # tokens; the longest Shapes caption has 48, and the dense tower's context (32) cuts a fifth
LAYOUT_SIZE = {"dim": 96, "layers": 2, "heads": 4}
LAYOUT_FIT = {"batch_size": 64, "lr": 3e-3}  # 2 epochs at these read every complete test caption right


def layout_tokens(tokenizer: Callable[..., torch.Tensor], texts: Sequence[str]) -> torch.Tensor:
    """[B, LAYOUT_CONTEXT] token ids from the dense tower's (open_clip) tokenizer, padded with 0."""
    return tokenizer(list(texts), context_length=LAYOUT_CONTEXT)


class LayoutEncoder(torch.nn.Module):
    """Caption tokens → per-cell logits over SHAPE_CLASSES, COLOUR_CLASSES and SIZE_CLASSES.

    Only the token ids seen in training get an embedding (the tokenizer's vocabulary is far larger than the
    world's words); any other id shares one "unknown" row."""

    def __init__(self, token_ids: Sequence[int], vocab_size: int, context_length: int, dim: int = 96,
                 layers: int = 2, heads: int = 4):
        super().__init__()
        self.kwargs = {"token_ids": sorted(int(t) for t in token_ids), "vocab_size": vocab_size,
                       "context_length": context_length, "dim": dim, "layers": layers, "heads": heads}
        index = torch.ones(vocab_size, dtype=torch.long)  # 1 = unknown, 0 = padding
        index[torch.tensor(self.kwargs["token_ids"], dtype=torch.long)] = torch.arange(2, 2 + len(token_ids))
        index[0] = 0
        self.register_buffer("row_of", index)
        self.embed = torch.nn.Embedding(len(token_ids) + 2, dim, padding_idx=0)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(context_length, dim))
        # A bidirectional GRU first: attention alone, with absolute positions, learns slowly that "left" means
        # another cell in "top left" than in "middle left" (object accuracy plateaued near 90 % and was
        # unstable); the GRU composes such phrases from the start.
        self.gru = torch.nn.GRU(dim, dim // 2, batch_first=True, bidirectional=True)
        self.cells = torch.nn.Parameter(0.02 * torch.randn(CELLS, dim))
        block = dict(d_model=dim, nhead=heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(**block), layers,
                                                   enable_nested_tensor=False)
        # The cell queries also attend to one another, so "and something else" can be placed where no named
        # object went.
        self.decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(**block), layers)
        self.head = torch.nn.Linear(dim, LAYOUT_CHANNELS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids → [B, 9, LAYOUT_CHANNELS] logits, cells in reading order."""
        lengths = (tokens != 0).sum(1)
        if self.training:  # padding past the batch's longest caption is dead weight; at inference the shape stays
            tokens = tokens[:, : int(lengths.max())]  # fixed, so a caption's layout never depends on its batch
        pad = tokens == 0
        x = self.embed(self.row_of[tokens]) + self.pos[: tokens.shape[1]]
        x = x + self._gru(x, lengths)
        memory = self.encoder(x, src_key_padding_mask=pad)
        queries = self.cells.expand(len(tokens), -1, -1)
        return self.head(self.decoder(queries, memory, memory_key_padding_mask=pad))

    def _gru(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The GRU over each caption's own tokens only: run over padding, its backward pass would start there."""
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=x.shape[1])[0]

    def probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, LAYOUT_CHANNELS, 3, 3]: per cell, the shape, colour and size distributions side by side."""
        probs = torch.cat([g.softmax(-1) for g in self(tokens).split(GROUPS, dim=-1)], dim=-1)
        return probs.transpose(1, 2).reshape(len(tokens), LAYOUT_CHANNELS, GRID, GRID)

    def save(self, path: Path, key: str = "") -> None:
        """One file with the constructor's arguments beside the weights; written atomically."""
        tmp = path.with_suffix(".tmp")
        torch.save({"key": key, "kwargs": self.kwargs, "state_dict": self.state_dict()}, tmp)
        tmp.replace(path)


def load_layout_encoder(path: str | Path) -> LayoutEncoder:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    encoder = LayoutEncoder(**saved["kwargs"])
    encoder.load_state_dict(saved["state_dict"])
    return encoder.eval()


def layout_targets(scene: Scene) -> torch.Tensor:
    """[9, 3] class indices per cell: shape, colour, size (0 = empty / none)."""
    return torch.tensor(cell_classes(scene)).T


def layout_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each cell's shape, colour and size, summed over the three."""
    return sum(F.cross_entropy(g.flatten(0, 1), targets[..., i].flatten())
               for i, g in enumerate(logits.split(GROUPS, dim=-1)))


def train_layout_encoder(tokens: torch.Tensor, owner: torch.Tensor, scenes: Sequence[Scene], vocab_size: int,
                         epochs: int = 2, seed: int = 0, progress: Callable | None = None) -> LayoutEncoder:
    """Fit a LayoutEncoder on captions (`tokens` [N, L]) whose scene is `scenes[owner[i]]`."""
    torch.manual_seed(seed)
    encoder = LayoutEncoder(torch.unique(tokens[tokens != 0]).tolist(), vocab_size, tokens.shape[1], **LAYOUT_SIZE)
    targets = torch.stack([layout_targets(s) for s in scenes])[owner]
    fit(encoder, len(tokens), lambda idx: layout_loss(encoder(tokens[idx]), targets[idx]), epochs,
        LAYOUT_FIT["batch_size"], LAYOUT_FIT["lr"], seed, "training caption → layout encoder", progress, pct_start=0.1)
    return encoder


@torch.no_grad()
def layout_accuracy(encoder: LayoutEncoder, tokens: torch.Tensor, scenes: Sequence[Scene]) -> dict[str, float]:
    """Over captions that name every object: objects whose cell gets the right shape, colour and size (%), and
    empty cells read as empty (%)."""
    encoder.eval()
    pred = torch.stack([g.argmax(-1) for g in encoder(tokens).split(GROUPS, dim=-1)], dim=-1)
    truth = torch.stack([layout_targets(s) for s in scenes]).to(pred.device)
    occupied = truth[..., 0] != 0
    right = (pred == truth).all(-1)
    return {"layout object acc": float(100 * right[occupied].float().mean()),
            "layout empty-cell acc": float(100 * right[~occupied].float().mean()) if (~occupied).any() else float("nan")}


def load_or_train_layout(path: Path, tokenize: Callable[[list[str]], torch.Tensor], vocab_size: int,
                         captions: Sequence[Sequence[str]], scenes: Sequence[Scene], seed: int, epochs: int = 2,
                         progress: Callable | None = None) -> LayoutEncoder:
    """The encoder cached at `path` when it was trained on the same captions and scenes with the same settings,
    else a new one (written atomically: a killed run never leaves half a file)."""
    settings = [[list(c) for c in captions], [s.to_dict() for s in scenes], vocab_size, seed, epochs, LAYOUT_CONTEXT,
                LAYOUT_SIZE, LAYOUT_FIT]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    if path.is_file() and torch.load(path, map_location="cpu", weights_only=True).get("key") == key:
        return load_layout_encoder(path)
    flat = [c for caps in captions for c in caps]
    owner = torch.from_numpy(np.repeat(np.arange(len(captions)), [len(c) for c in captions]))
    encoder = train_layout_encoder(tokenize(flat), owner, scenes, vocab_size, epochs=epochs, seed=seed,
                                   progress=progress)
    encoder.save(path, key)
    return encoder
