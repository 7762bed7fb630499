"""ReT: a recurrent cell walks the layers of FROZEN vision and text towers and writes 32 late-interaction tokens.

Reproduces the recurrent cell of ReT (Caffagni et al., CVPR 2025) as the public code defines it
(aimagelab/ReT, src/models/ret/modeling_ret.py, `RetCell.forward` and `RetModel.forward`). The paper
PDF could not be read from this machine, so the equations are numbered here, (R1)-(R10), each
following one step of that code; docs/ret.md lists them.

  (R1) h̄_l = h_{l-1} + P                    h_0 = a learned state [32, H]; P = fixed sinusoidal ids of the 32 slots
  (R2) r_l = h̄_l + SA(LN_x(h̄_l))           self-attention among the 32 state tokens, residual
  (R3) c^T_l = XA_T(LN_x(h̄_l), LN_T(A^T_l t_l))   cross-attention to layer l's text tokens (A^T_l: per-layer adapter)
       c^V_l = XA_V(LN_x(h̄_l), LN_V(A^V_l v_l))   ... and to layer l's visual tokens
  (R4) i^T_l = σ(W_iT c^T_l + b_i) · m_T    input gate of the text  (m_T = 0 when the item has no text)
  (R5) i^V_l = σ(W_iV c^V_l + b_i) · m_V    input gate of the image (m_V = 0 when the item has no image)
  (R6) f_l = σ(m_T W_fT c^T_l + m_V W_fV c^V_l + b_f)   one forget gate, fed by both modalities
  (R7) h'_l = f_l ⊙ φ(r_l) + i^T_l ⊙ φ(c^T_l) + i^V_l ⊙ φ(c^V_l)   (φ = tanh or identity)
  (R8) h_l = h'_l + MLP(LN_m(h'_l))
  (R9) e = normalize(W_late h_L) ∈ R^{32×128}
The layers read are a config choice: the reference reads all 12 text/vision layers of CLIP ViT-B, every
other vision layer of ViT-L/14 (`LAYER_STRATEGIES`); the Shapes towers (4+4 layers) are read in full.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.data import open_image
from core.device import autocast
from core.encoders import (SHAPES_ENCODER, DualEncoder, build_dual_encoder, image_token_layers, layer_image_tokens,
                           layer_token_width, load_dual_encoder)
from core.errors import InputError
from core.io import atomic_dir, atomic_write_json, read_json, state_dict_digest

STAGE = "ret"
CONFIG_FILE = "retriever.json"
ENCODER_DIR = "encoder"
TOWERS_FILE = "towers.json"  # which frozen towers a checkpoint was trained on: their spec, where, and a hash

# Which tower layers the cell reads, as in the reference's RetLayerStrategy (0-based block indices).
LAYER_STRATEGIES: dict[str, dict[str, list[int]]] = {
    "clip_vit_b": {"text": list(range(12)), "vision": list(range(12))},
    "clip_vit_l": {"text": list(range(12)), "vision": list(range(24))[::2]},
    "openclip_vit_h": {"text": [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23],
                       "vision": [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 31]},
    "openclip_vit_g": {"text": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 31],
                       "vision": [2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 44, 47]},
    "shapes": {"text": [0, 1, 2, 3], "vision": [0, 1, 2, 3]},
    "shapes_last": {"text": [3], "vision": [3]},  # the single-layer (non-recurrent) ablation
}


@dataclass
class RetConfig:
    """One side (query or passage) of ReT; the reference's RetConfig with open_clip towers."""

    text_layers: list[int] = field(default_factory=lambda: list(LAYER_STRATEGIES["shapes"]["text"]))
    vision_layers: list[int] = field(default_factory=lambda: list(LAYER_STRATEGIES["shapes"]["vision"]))
    num_queries: int = 32  # state tokens = late-interaction tokens per item
    hidden_size: int = 128
    head_dim: int = 64  # reference: heads = hidden_size // 64
    mlp_ratio: int = 4
    out_dim: int = 128  # late_proj_output_size
    dropout: float = 0.05
    attention_dropout: float = 0.05
    input_gate_bias_prior: float = 0.0
    forget_gate_bias_prior: float = 0.0
    use_tanh: bool = False
    vision_pool: int = 1  # > 1: average-pool the patch grid by this factor before the cell (not in the reference; CPU budget)
    use_text: bool = True  # False: text-only/image-only ablations mask a modality out (m_T / m_V = 0)
    use_image: bool = True

    def validate(self) -> None:
        if len(self.text_layers) != len(self.vision_layers) or not self.text_layers:
            raise InputError("ret config", "text_layers/vision_layers",
                             "the cell takes one text and one vision layer per step: give equally long, non-empty lists")
        if self.hidden_size % self.head_dim:
            raise InputError("ret config", "head_dim", f"must divide hidden_size ({self.hidden_size})")
        if not (self.use_text or self.use_image):
            raise InputError("ret config", "use_text/use_image", "at least one modality must be used")

    @property
    def n_steps(self) -> int:
        return len(self.text_layers)


@dataclass
class RetrieverConfig:
    """The whole retriever: the frozen towers' spec and a cell per side (the reference's RetrieverConfig)."""

    encoder: dict = field(default_factory=lambda: copy.deepcopy(SHAPES_ENCODER))
    query: RetConfig = field(default_factory=RetConfig)
    passage: RetConfig = field(default_factory=RetConfig)
    use_instruction: bool = False  # queries read as "{instruction} {question}": how the model was trained

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "query": dataclasses.asdict(self.query),
                "passage": dataclasses.asdict(self.passage), "use_instruction": self.use_instruction}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "retriever config") -> "RetrieverConfig":
        try:
            return cls(encoder=dict(d.get("encoder", SHAPES_ENCODER)), query=RetConfig(**d.get("query", {})),
                       passage=RetConfig(**d.get("passage", {})), use_instruction=bool(d.get("use_instruction", False)))
        except TypeError as e:
            raise InputError(source, "query/passage", str(e)) from None


def layer_strategy(name: str, n_text: int | None = None, n_vision: int | None = None) -> dict[str, list[int]]:
    """Layers a named strategy reads; "all" (one step per layer, spread evenly if the towers differ in depth)
    and "last" adapt to towers of `n_text` / `n_vision` layers."""
    if name in ("all", "last") and n_text and n_vision:
        if name == "last":
            return {"text": [n_text - 1], "vision": [n_vision - 1]}
        steps = min(n_text, n_vision)
        spread = lambda n: [round(i * (n - 1) / max(1, steps - 1)) for i in range(steps)]  # noqa: E731
        return {"text": spread(n_text), "vision": spread(n_vision)}
    if name not in LAYER_STRATEGIES:
        known = ", ".join([*LAYER_STRATEGIES, "all", "last"])
        raise InputError("ret config", "layer_strategy", f"unknown {name!r}; known: {known}")
    return copy.deepcopy(LAYER_STRATEGIES[name])


# ----------------------------------------------------------------------------------------------------------------
# The frozen towers


def is_pretrained_spec(spec: dict) -> bool:
    """Towers of a named architecture (open_clip by name, or a published checkpoint's Hugging Face CLIP towers)."""
    return "pretrained_name" in spec or "hf_clip" in spec


class FrozenTowers(nn.Module):
    """An open_clip CLIP (core.encoders.DualEncoder) whose per-layer tokens the cells read; never trained."""

    def __init__(self, encoder: DualEncoder):
        super().__init__()
        image_token_layers(encoder)  # refuses, before any work, a tower that gives no image tokens
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> "FrozenTowers":
        return super().train(False)  # frozen: dropout and friends stay off

    @property
    def fingerprint(self) -> str:
        """sha256 of the towers' weights (names, dtypes, shapes, values): what a checkpoint or a token cache names
        them by. Computed once (a ViT-L/14 takes seconds); the towers never change."""
        if self._fingerprint is None:
            self._fingerprint = state_dict_digest(self.encoder)
        return self._fingerprint

    @property
    def pretrained(self) -> bool:
        """Towers of a named open_clip architecture (ViT-L/14, ViT-g...), hub or fine-tuned weights: too large to
        copy into checkpoints or to cache per layer; the Shapes world's towers are built from a spec instead."""
        return is_pretrained_spec(self.encoder.spec)

    @property
    def text_width(self) -> int:
        return int(self.encoder.clip.transformer.width)

    @property
    def vision_width(self) -> int:
        return layer_token_width(self.encoder)

    @property
    def n_text_layers(self) -> int:
        return len(self.encoder.clip.transformer.resblocks)

    @property
    def n_vision_layers(self) -> int:
        """A ViT's blocks or a ResNet's residual stages (core.encoders.layer_image_tokens)."""
        return image_token_layers(self.encoder)

    @torch.no_grad()
    def text_tokens(self, tokens: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer token states [B, n_layers, L, D] (residual stream, no final LN) and the key mask [B, L]."""
        attention = tokens != 0  # open_clip pads with 0 after the end-of-text token
        length = int(attention.sum(1).max())
        clip = self.encoder.clip
        if getattr(clip, "attn_mask", None) is not None and hasattr(clip, "positional_embedding"):
            # The text tower is causal: positions before `length` never see the padding after it, so running
            # only the first `length` positions gives the same states at a fraction of the cost.
            cast = clip.transformer.get_cast_dtype()
            x = clip.token_embedding(tokens[:, :length]).to(cast) + clip.positional_embedding[:length].to(cast)
            _, states = clip.transformer.forward_intermediates(x, attn_mask=clip.attn_mask[:length, :length],
                                                               indices=list(layers))
        else:
            states = clip.forward_intermediates(text=tokens, text_indices=list(layers),
                                                intermediates_only=True)["text_intermediates"]
        return torch.stack(states, 1)[:, :, :length], attention[:, :length]

    @torch.no_grad()
    def vision_tokens(self, pixels: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """Per-layer [CLS] + patch tokens [B, n_layers, 1 + P, D] of a ViT, as Hugging Face's CLIP hidden_states give
        them, or a ResNet's per-stage [global] + grid tokens (core.encoders.layer_image_tokens)."""
        return layer_image_tokens(self.encoder, pixels, layers)


# ----------------------------------------------------------------------------------------------------------------
# The recurrent cell


def _slot_ids(num_queries: int, hidden: int) -> torch.Tensor:
    """Fixed sinusoidal ids of the state slots (P in R1), as the reference's `query_state_ids`."""
    position = torch.arange(num_queries).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, hidden, 2) * (-math.log(10000.0) / hidden))
    pe = torch.zeros(1, num_queries, hidden)
    pe[..., 0::2] = torch.sin(position * div_term)
    pe[..., 1::2] = torch.cos(position * div_term)
    return pe


class RetCell(nn.Module):
    """One step of ReT's recurrence, shared by every layer (R1-R8)."""

    def __init__(self, cfg: RetConfig):
        super().__init__()
        h, heads = cfg.hidden_size, cfg.hidden_size // cfg.head_dim
        self.cfg = cfg
        self.initial_state = nn.Parameter(torch.empty(1, cfg.num_queries, h).normal_(0.0, 0.2))  # h_0
        self.register_buffer("slot_ids", _slot_ids(cfg.num_queries, h), persistent=False)  # P
        self.sa = nn.MultiheadAttention(h, heads, dropout=cfg.attention_dropout, batch_first=True)
        self.text_xa = nn.MultiheadAttention(h, heads, dropout=cfg.attention_dropout, batch_first=True, bias=False)
        self.vision_xa = nn.MultiheadAttention(h, heads, dropout=cfg.attention_dropout, batch_first=True, bias=False)
        self.mlp = nn.Sequential(nn.Linear(h, cfg.mlp_ratio * h), nn.Dropout(cfg.dropout), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * h, h), nn.Dropout(cfg.dropout))
        self.text_input_gate_w = nn.Linear(h, h)
        self.vision_input_gate_w = nn.Linear(h, h)
        self.text_forget_gate_w = nn.Linear(h, h)
        self.vision_forget_gate_w = nn.Linear(h, h)
        self.xa_ln, self.text_ln, self.vision_ln, self.mlp_ln = (nn.LayerNorm(h) for _ in range(4))
        self.act = nn.Tanh() if cfg.use_tanh else nn.Identity()  # φ in R7

    def forward(self, state: torch.Tensor | None, text: torch.Tensor | None, text_attention: torch.Tensor | None,
                vision: torch.Tensor | None, text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """state [B, 32, H] or None at the first layer; text [B, L, H] and vision [B, P, H] already adapted;
        text_mask / image_mask [B] (1 = the item has that modality). A modality passed as None is absent for
        the whole batch, which equals a zero mask (R4-R6) without computing its attention."""
        n = (text if text is not None else vision).shape[0]
        if state is None:
            state = self.initial_state.expand(n, -1, -1)
        state = state + self.slot_ids  # R1
        x = self.xa_ln(state)
        residual = state + self.sa(x, x, x, need_weights=False)[0]  # R2
        forget_logit = torch.full_like(residual, self.cfg.forget_gate_bias_prior)
        update = self.act(residual)
        if text is not None:
            kv = self.text_ln(text)
            pad = None if text_attention is None else ~text_attention.bool()
            c_t = self.text_xa(x, kv, kv, key_padding_mask=pad, need_weights=False)[0]  # R3 (text)
            m_t = text_mask.to(c_t.dtype)[:, None, None]
            i_t = torch.sigmoid(self.text_input_gate_w(c_t) + self.cfg.input_gate_bias_prior) * m_t  # R4
            forget_logit = forget_logit + self.text_forget_gate_w(c_t) * m_t  # R6 (text term)
            text_in = i_t * self.act(c_t)  # R7 (text term)
        if vision is not None:
            kv = self.vision_ln(vision)
            c_v = self.vision_xa(x, kv, kv, need_weights=False)[0]  # R3 (vision)
            m_v = image_mask.to(c_v.dtype)[:, None, None]
            i_v = torch.sigmoid(self.vision_input_gate_w(c_v) + self.cfg.input_gate_bias_prior) * m_v  # R5
            forget_logit = forget_logit + self.vision_forget_gate_w(c_v) * m_v  # R6 (vision term)
            vision_in = i_v * self.act(c_v)  # R7 (vision term)
        state = torch.sigmoid(forget_logit) * update  # R6 σ(...) then R7 f ⊙ φ(r)
        if text is not None:
            state = state + text_in
        if vision is not None:
            state = state + vision_in
        return state + self.mlp(self.mlp_ln(state))  # R8


@dataclass
class SideInputs:
    """What one side's cell reads for a batch: per-layer tower tokens (only the layers it reads) and masks."""

    text: torch.Tensor | None  # [B, n_steps, L, Dt]
    text_attention: torch.Tensor | None  # [B, L] bool
    vision: torch.Tensor | None  # [B, n_steps, P, Dv]
    text_mask: torch.Tensor  # [B]
    image_mask: torch.Tensor  # [B]

    def to(self, device: torch.device) -> "SideInputs":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SideInputs(move(self.text), move(self.text_attention), move(self.vision), move(self.text_mask),
                          move(self.image_mask))


def pool_patches(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, 1 + g*g, D] ([CLS] + a g×g patch grid) → [CLS] + the grid average-pooled by `factor`."""
    if factor == 1:
        return tokens
    b, n, d = tokens.shape
    g = math.isqrt(n - 1)
    if g * g != n - 1 or g % factor:
        raise InputError("ret config", "vision_pool", f"cannot pool a {n - 1}-patch grid by {factor}")
    grid = tokens[:, 1:].reshape(b, g, g, d).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, factor).flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :1], pooled], 1)


class RetModel(nn.Module):
    """One side of ReT: per-layer adapters, the shared recurrent cell, and the late projection (R9).

    The frozen towers are shared with the other side and are not part of this module's state dict.
    """

    def __init__(self, cfg: RetConfig, towers: FrozenTowers):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.__dict__["towers"] = towers  # shared and frozen: kept out of this module's parameters
        if max(cfg.text_layers) >= towers.n_text_layers or max(cfg.vision_layers) >= towers.n_vision_layers:
            raise InputError("ret config", "text_layers/vision_layers",
                             f"the towers have {towers.n_text_layers} text and {towers.n_vision_layers} vision layers")
        self.text_adapter = nn.ModuleList(nn.Linear(towers.text_width, cfg.hidden_size) for _ in range(cfg.n_steps))
        self.vision_adapter = nn.ModuleList(nn.Linear(towers.vision_width, cfg.hidden_size) for _ in range(cfg.n_steps))
        self.cell = RetCell(cfg)
        self.late_proj = nn.Linear(cfg.hidden_size, cfg.out_dim, bias=False)
        self.tokenizer = None
        self.image_processor = None

    @property
    def device(self) -> torch.device:
        return self.late_proj.weight.device

    def forward(self, inputs: SideInputs) -> torch.Tensor:
        """Late-interaction tokens [B, 32, out_dim], not normalised (R1-R9 without the normalisation)."""
        use_text = self.cfg.use_text and inputs.text is not None
        use_image = self.cfg.use_image and inputs.vision is not None
        state = None
        for step in range(self.cfg.n_steps):
            text = self.text_adapter[step](inputs.text[:, step].float()) if use_text else None  # A^T_l t_l
            vision = (self.vision_adapter[step](pool_patches(inputs.vision[:, step].float(), self.cfg.vision_pool))
                      if use_image else None)  # A^V_l v_l
            state = self.cell(state, text, inputs.text_attention if use_text else None, vision,
                              inputs.text_mask, inputs.image_mask)
        return self.late_proj(state)  # R9 (projection)

    def encode(self, inputs: SideInputs) -> torch.Tensor:
        return F.normalize(self(inputs), p=2, dim=-1)  # R9 (per-token L2 normalisation)

    # -- the user-facing API of the reference ----------------------------------------------------------------

    def init_tokenizer_and_image_processor(self) -> None:
        """The towers' own tokenizer and image preprocessing (open_clip's, for CLIP and the Shapes towers)."""
        if self.tokenizer is None:
            self.tokenizer = self.towers.encoder.tokenizer
        if self.image_processor is None:
            self.image_processor = self.towers.encoder.preprocess

    def prepare(self, docs: Sequence[Sequence[Any]]) -> SideInputs:
        """Run the frozen towers on [[text, image_path], ...] ('' or None for a missing text or image)."""
        if self.tokenizer is None or self.image_processor is None:
            raise RuntimeError("call init_tokenizer_and_image_processor() first")
        texts, images, text_mask, image_mask = [], [], [], []
        size = self.towers.encoder.image_size
        for i, doc in enumerate(docs):
            if len(doc) != 2:
                raise InputError("docs", f"[{i}]", "each item must be [text, image_path]")
            text, image_path = doc
            if image_path and not Path(image_path).is_file():
                raise InputError(image_path, f"docs[{i}].image", "image file not found")
            texts.append(text or "")
            text_mask.append(1.0 if text else 0.0)
            image_mask.append(1.0 if image_path else 0.0)
            if image_path:
                images.append(self.image_processor(open_image(image_path, "docs")))
            else:  # the reference feeds a black image and masks it out
                images.append(self.image_processor(Image.new("RGB", (size, size))))
        device = self.device
        tokens = self.tokenizer(texts).to(device)
        with autocast(device):
            text, attention = self.towers.text_tokens(tokens, self.cfg.text_layers)
            vision = self.towers.vision_tokens(torch.stack(images).to(device), self.cfg.vision_layers)
        return SideInputs(text, attention, vision, torch.tensor(text_mask, device=device),
                          torch.tensor(image_mask, device=device))

    @torch.inference_mode()
    def get_ret_features(self, docs: Sequence[Sequence[Any]], to_cpu: bool = False) -> torch.Tensor:
        """[[text, image_path], ...] → L2-normalised late-interaction tokens [batch, 32, 128]."""
        was_training = self.training
        self.eval()
        inputs = self.prepare(docs)
        with autocast(self.device):
            feats = self.encode(inputs).float()
        self.train(was_training)
        return feats.cpu() if to_cpu else feats


# ----------------------------------------------------------------------------------------------------------------
# Scoring and loss


def maxsim(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """Late interaction (ColBERT; ReT's fine-grained logits): s(q, d) = Σ_i max_j <q_i, d_j>.
    queries [Nq, Lq, D], passages [Np, Lp, D] → scores [Nq, Np]."""
    sim = torch.einsum("qid,pjd->qpij", queries, passages)
    return sim.max(-1).values.sum(-1)


def contrastive_loss(query: torch.Tensor, passage: torch.Tensor, labels: Sequence[Any] | None = None,
                     rows: slice | None = None) -> torch.Tensor:
    """In-batch InfoNCE on MaxSim logits, both directions (the reference's `contrastive_loss` with
    fine_grained=True, simmetric=True, no temperature): L = ½[CE(S_qp, Y) + CE(S_pq, Y)], where
    S_qp[i, j] = maxsim(q_i, p_j) = Σ_a max_b <q_i,a, p_j,b> and S_pq[i, j] = maxsim(p_i, q_j) = Σ_b max_a <p_i,b, q_j,a>:
    the passage→query logits score with the passage's tokens as the query side (the reference calls its fine-grained
    logits with the passages first), which is not S_qpᵀ — MaxSim is not symmetric. Y[i, j] = 1 where rows i and j share
    a positive (`labels`, the positive passage id of each row; duplicates share the target mass), normalised per row.

    Under torchrun `query` and `passage` are the whole global batch (gathered with gradients) and `rows` this rank's
    share of it: L is then averaged over those rows only — the rank's queries against every passage and its
    passages against every query — so DDP's mean over equal shares is the global batch's L."""
    n = query.shape[0]
    if labels is None:
        target = torch.eye(n, device=query.device)
    else:
        ids = list(labels)
        target = torch.tensor([[float(a == b) for b in ids] for a in ids], device=query.device)
    rows = slice(0, n) if rows is None else rows
    by_query = maxsim(query[rows], passage)  # S_qp[rows, :]
    by_passage = maxsim(passage[rows], query)  # S_pq[rows, :]
    target = target[rows] / target[rows].sum(1, keepdim=True)  # Y is symmetric: one target for both directions
    return 0.5 * (F.cross_entropy(by_query, target) + F.cross_entropy(by_passage, target))


# ----------------------------------------------------------------------------------------------------------------
# The retriever: both sides, saved and loaded as a folder


class RetrieverModel(nn.Module):
    """Query and passage ReT models over one pair of frozen towers; `from_pretrained(folder)` / `save_pretrained`.

    `encoder_dir` is the folder the towers were loaded from: a checkpoint on towers of a named architecture (ViT-L,
    ViT-g, hub or fine-tuned weights) names that folder and the weights' hash instead of copying gigabytes."""

    def __init__(self, config: RetrieverConfig, encoder: DualEncoder | None = None,
                 encoder_dir: str | Path | None = None, towers: FrozenTowers | None = None):
        super().__init__()
        if towers is not None:
            encoder = towers.encoder
        if encoder is not None and config.encoder != encoder.spec:  # retriever.json names the towers actually used
            config = dataclasses.replace(config, encoder=copy.deepcopy(encoder.spec))
        self.config = config
        self.encoder_dir = Path(encoder_dir) if encoder_dir is not None else None
        if towers is None:
            towers = FrozenTowers(encoder if encoder is not None else build_dual_encoder(config.encoder))
        self.towers = towers
        self.query_model = RetModel(config.query, self.towers)
        self.passage_model = RetModel(config.passage, self.towers)

    def get_query_model(self) -> RetModel:
        return self.query_model

    def get_passage_model(self) -> RetModel:
        return self.passage_model

    def cells(self) -> nn.ModuleDict:
        """The trainable part (everything but the towers): what checkpoints hold."""
        return nn.ModuleDict({"query": self.query_model, "passage": self.passage_model})

    def forward(self, query: SideInputs, passage: SideInputs, labels: Sequence[Any] | None = None) -> torch.Tensor:
        return contrastive_loss(self.query_model.encode(query), self.passage_model.encode(passage), labels)

    def write_files(self, folder: str | Path) -> None:
        """`retriever.json`, `towers.json` (the towers' spec, where their weights come from, their sha256) and, only
        for the small towers trained here (the Shapes world's, a few MB), a copy of them in `encoder/`: frozen
        pretrained weights are named, never copied, so a checkpoint on ViT-L/14 holds the cells alone."""
        folder = Path(folder)
        atomic_write_json(folder / CONFIG_FILE, self.config.to_dict())
        enc = self.towers.encoder
        record: dict[str, Any] = {"spec": enc.spec, "sha256": self.towers.fingerprint}
        if "hf_clip" in enc.spec:  # a published checkpoint's towers: named by the folder they were read from
            record["weights"] = "published"
            record["folder"] = str(Path(enc.spec["hf_clip"]["source"]).resolve())
        elif self.towers.pretrained and enc.spec.get("pretrained"):
            record["weights"] = "hub"  # open_clip rebuilds them from the name; the hash checks they are the same
            (folder / ENCODER_DIR).mkdir(parents=True, exist_ok=True)
            enc.write_spec(folder / ENCODER_DIR)
        elif self.towers.pretrained:
            if self.encoder_dir is None:
                raise ValueError("towers of a named architecture with weights from a folder: pass encoder_dir to "
                                 "RetrieverModel so that its checkpoints can name them instead of copying them")
            record["weights"] = "folder"
            record["folder"] = str(self.encoder_dir.resolve())
        else:
            record["weights"] = "copied"
            (folder / ENCODER_DIR).mkdir(parents=True, exist_ok=True)
            enc.save(folder / ENCODER_DIR)
        atomic_write_json(folder / TOWERS_FILE, record)

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            torch.save(self.cells().state_dict(), tmp / "model.pt")
            self.write_files(tmp)
            atomic_write_json(tmp / "meta.json", {"stage": STAGE})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        device_map: str | torch.device | None = None) -> "RetrieverModel":
        """A folder this project wrote (`retriever.json`), or a checkpoint in the layout aimagelab publishes
        (`config.json` + safetensors; a hub name such as `aimagelab/ReT-CLIP-ViT-L-14` when the hub is reachable).
        `device_map` is the reference's spelling of `device` (one device: the model is small enough)."""
        from retriever.ret import published

        device = device if device is not None else device_map

        if not (Path(folder) / CONFIG_FILE).is_file() and (
                published.is_published_folder(folder) or not Path(folder).exists()):
            return published.load_published(folder, device)
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise InputError(folder / CONFIG_FILE, None, "not a ReT folder (retriever.json is missing)")
        meta = read_json(folder / "meta.json", required=["stage"])
        if meta["stage"] != STAGE:
            raise InputError(folder / "meta.json", "stage", f"written by stage '{meta['stage']}', expected '{STAGE}'")
        config = RetrieverConfig.from_dict(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
        record = read_json(folder / TOWERS_FILE, required=["sha256"]) if (folder / TOWERS_FILE).is_file() else {}
        encoder_dir = Path(record["folder"]) if record.get("weights") in ("folder", "published") else folder / ENCODER_DIR
        if record.get("weights") == "published":
            model = cls(config, towers=published.load_published_towers(encoder_dir), encoder_dir=encoder_dir)
        else:
            model = cls(config, load_dual_encoder(encoder_dir), encoder_dir=encoder_dir)
        if record and model.towers.fingerprint != record["sha256"]:
            raise InputError(folder / TOWERS_FILE, "sha256", f"the towers loaded from {encoder_dir} are not the ones "
                             "this model was trained on (their weights' hash differs)")
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        model.cells().load_state_dict(state)
        model.eval()
        return model.to(device) if device is not None else model
