"""The RQ-VAE tokenizer: an MLP encoder, a residual quantizer of L levels × K codes, an MLP decoder.

Depends on torch only. The quantizer is written here rather than taken from vector-quantize-pytorch: it is
~100 lines, and we need exact control of three things that the library spreads over options and EMA state —
k-means initialisation on the first batch, dead-code restarts from the current residuals, and a shared or
per-level codebook with identical code paths — plus the per-level usage counts the report needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def kmeans(x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain Lloyd k-means on the rows of x; empty clusters are re-seeded from random points."""
    n = x.shape[0]
    idx = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    centers = x[idx].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(dim=1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            centers[empty] = x[torch.randint(n, (int(empty.sum()),), generator=generator)]
    return centers


class ResidualQuantizer(nn.Module):
    """L levels of nearest-neighbour quantization, each quantizing what the previous levels left over.

    With `shared=True` one codebook serves every level (the paper's 1024 × 4 setting); else one per level.
    """

    def __init__(self, dim: int, levels: int, codebook_size: int, shared: bool = False, beta: float = 0.25):
        super().__init__()
        self.dim, self.levels, self.codebook_size, self.shared, self.beta = dim, levels, codebook_size, shared, beta
        n_books = 1 if shared else levels
        self.codebooks = nn.Parameter(torch.randn(n_books, codebook_size, dim) * 0.1)
        self.register_buffer("initialised", torch.tensor(False))
        # usage counts since the last dead-code check, per level
        self.register_buffer("usage", torch.zeros(levels, codebook_size))
        # forward() counts the codes it picks while training; a trainer that splits batches over processes turns
        # this off and calls count_usage with the whole batch's codes, so every rank keeps the same counts
        self.track_usage = True

    def book(self, level: int) -> torch.Tensor:
        return self.codebooks[0 if self.shared else level]

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialise codebooks by k-means on the residuals of the first batch, level by level."""
        residual = z.detach()
        if self.shared:
            # a shared book is fitted to the pooled residuals of all levels (first level dominates the scale)
            pooled, r = [], residual
            for _ in range(self.levels):
                centers = kmeans(r, self.codebook_size, generator=generator)
                pooled.append(r)
                r = r - centers[torch.cdist(r, centers).argmin(1)]
            self.codebooks.data[0] = kmeans(torch.cat(pooled), self.codebook_size, generator=generator)
        else:
            for level in range(self.levels):
                centers = kmeans(residual, self.codebook_size, generator=generator)
                self.codebooks.data[level] = centers
                residual = residual - centers[torch.cdist(residual, centers).argmin(1)]
        self.initialised.fill_(True)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (straight-through quantized z, codes [n, L], codebook + commitment loss).

        Eq. 3 of the RQ-VAE paper (Lee et al. 2022), per level: ||sg[r_l] − e_l||² + β·||r_l − sg[e_l]||².
        """
        residual, quantized, codes, loss = z, torch.zeros_like(z), [], z.new_zeros(())
        for level in range(self.levels):
            book = self.book(level)
            code = torch.cdist(residual.detach(), book.detach()).argmin(dim=1)
            e = book[code]
            loss = loss + F.mse_loss(e, residual.detach()) + self.beta * F.mse_loss(residual, e.detach())
            if self.training and self.track_usage:
                self.usage[level] += torch.bincount(code, minlength=self.codebook_size).to(self.usage.dtype)
            quantized = quantized + e
            residual = residual - e.detach()
            codes.append(code)
        z_q = z + (quantized - z).detach()  # straight-through estimator
        return z_q, torch.stack(codes, dim=1), loss / self.levels

    @torch.no_grad()
    def count_usage(self, codes: torch.Tensor) -> None:
        """Add codes [n, L] to the usage counts (what forward() does itself when `track_usage`)."""
        for level in range(self.levels):
            self.usage[level] += torch.bincount(codes[:, level], minlength=self.codebook_size).to(self.usage.dtype)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        residual, codes = z, []
        for level in range(self.levels):
            book = self.book(level)
            code = torch.cdist(residual, book).argmin(dim=1)
            residual = residual - book[code]
            codes.append(code)
        return torch.stack(codes, dim=1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return sum(self.book(level)[codes[:, level]] for level in range(self.levels))

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, threshold: float = 1.0,
                           generator: torch.Generator | None = None) -> int:
        """Codes used fewer than `threshold` times since the last check jump to random residuals of `z`."""
        residual, restarted = z.detach(), 0
        for level in range(1 if self.shared else self.levels):
            book = self.book(level)
            # a shared book is one pool of codes: a code is dead only if no level used it
            dead = (self.usage.sum(0) if self.shared else self.usage[level]) < threshold
            n_dead = int(dead.sum())
            if n_dead:
                picks = residual[torch.randint(len(residual), (n_dead,), generator=generator)]
                book.data[dead] = picks + 0.01 * picks.std() * torch.randn(picks.shape, generator=generator)
                restarted += n_dead
            residual = residual - book[torch.cdist(residual, book).argmin(1)]
        self.usage.zero_()
        return restarted


@dataclass
class RQVAESpec:
    """Everything needed to rebuild the model (saved as rqvae.json beside the weights)."""
    in_dim: int
    hidden_dim: int = 256
    latent_dim: int = 64
    levels: int = 3
    codebook_size: int = 64
    shared_codebook: bool = False
    beta: float = 0.25


class RQVAE(nn.Module):
    """x → encoder → residual quantizer → decoder → x̂."""

    def __init__(self, spec: RQVAESpec):
        super().__init__()
        self.spec = spec
        self.encoder = nn.Sequential(nn.Linear(spec.in_dim, spec.hidden_dim), nn.GELU(),
                                     nn.Linear(spec.hidden_dim, spec.latent_dim))
        self.quantizer = ResidualQuantizer(spec.latent_dim, spec.levels, spec.codebook_size,
                                           spec.shared_codebook, spec.beta)
        self.decoder = nn.Sequential(nn.Linear(spec.latent_dim, spec.hidden_dim), nn.GELU(),
                                     nn.Linear(spec.hidden_dim, spec.in_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (reconstruction, codes [n, L], quantization loss). Under bf16 autocast the MLPs run in bf16 but
        the quantizer in float32: the deeper levels quantize residuals far smaller than bf16's rounding of z."""
        z = self.encoder(x)
        with torch.autocast(z.device.type, enabled=False):
            z_q, codes, q_loss = self.quantizer(z.float())
        return self.decoder(z_q), codes, q_loss

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.encode(self.encoder(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.decode_codes(self.encode(x)))


def rqvae_loss(x: torch.Tensor, recon: torch.Tensor, q_loss: torch.Tensor, caption: torch.Tensor | None,
               align_weight: float, temperature: float = 0.07,
               first_caption: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """L = ||x − x̂||² + L_vq (codebook + β·commitment) + γ·L_align.

    L_align is the caption-alignment term of ComGTIR's tokenizer: the reconstruction, normalised, must pick its
    own caption embedding among the batch's (InfoNCE), so codes carry what captions say about the image.
    `caption` may hold more rows than `x` (the whole batch when `x` is one process's share of it): row i of `x`
    owns caption row `first_caption + i`, and every row is a negative.
    """
    recon_loss = F.mse_loss(recon, x)
    loss = recon_loss + q_loss
    parts = {"recon": recon_loss.item(), "vq": q_loss.item()}
    if caption is not None and align_weight > 0:
        logits = F.normalize(recon, dim=-1) @ F.normalize(caption, dim=-1).T / temperature
        align = F.cross_entropy(logits, first_caption + torch.arange(len(x), device=x.device))
        loss = loss + align_weight * align
        parts["align"] = align.item()
    return loss, parts
