"""Shapes generator cost: seconds per training step (forward, backward, AdamW) and sampled images per second, for
the attention-free UNet the main job trains and for the same UNet with cross-attention to the caption's tokens,
both reading the caption's layout, in the trainer's precision (core.device.autocast). Reads a dense checkpoint;
writes `bench/results/mir_generator_step.json`. Figures only, no assertion.

    python -m bench.mir_generator_step --dense_checkpoint runs/shapes/dense/checkpoint-best
"""
from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path
from typing import Sequence

import torch

from core.device import autocast, get_device, set_threads
from core.encoders import load_dual_encoder
from core.io import atomic_write_json
from mir.generator import SHAPES_SCHEDULER, SHAPES_UNET, ShapesGenerator, TextConditioner, build_unet
from mir.layout import LAYOUT_CONTEXT, LayoutEncoder

CROSS_ATTENTION = {**copy.deepcopy(SHAPES_UNET), "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "mid_block_type": "UNetMidBlock2DCrossAttn"}
CAPTION = "a medium-sized orange star at the left edge and a huge violet square in the middle of the image"


def step_seconds(unet: torch.nn.Module, conditioner: TextConditioner, batch: int, steps: int) -> float:
    """Mean wall time of a training step on random images (the cost does not depend on the data)."""
    from diffusers import DDPMScheduler

    device = get_device()
    unet, conditioner = unet.to(device), conditioner.to(device)
    scheduler = DDPMScheduler(**SHAPES_SCHEDULER)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 3, unet.resolution, unet.resolution, device=device) * 2 - 1
    captions = [CAPTION] * batch
    times = []
    for i in range(steps + 2):  # two warm-up steps
        synchronize(device)
        start = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), device=device)
        xt = scheduler.add_noise(x0, torch.randn_like(x0), t)
        with autocast(device):  # the trainer's precision: bf16 on CUDA, fp32 on CPU
            pred = unet(xt, t, conditioner(captions))
        loss = torch.nn.functional.mse_loss(pred.float(), x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize()


def images_per_second(unet: torch.nn.Module, conditioner: TextConditioner, n: int, sample_steps: int) -> float:
    gen = ShapesGenerator(unet, SHAPES_SCHEDULER, conditioner, "bench", steps=sample_steps, guidance=2.0, size=64)
    gen.generate([CAPTION] * 4, list(range(4)))  # warm-up
    start = time.perf_counter()
    gen.generate([CAPTION] * n, list(range(n)))
    return n / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense_checkpoint", default="runs/shapes/dense/checkpoint-best")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--sample_steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/results/mir_generator_step.json")
    args = p.parse_args(argv)

    set_threads(args.threads)
    torch.manual_seed(0)
    encoder = load_dual_encoder(args.dense_checkpoint)
    # An untrained layout encoder over the tokenizer's whole vocabulary costs what a trained one does.
    layout = LayoutEncoder(range(1, 2000), encoder.clip.token_embedding.num_embeddings, LAYOUT_CONTEXT).eval()
    conditioner = TextConditioner(encoder, layout).eval().requires_grad_(False)
    results = {"device": str(get_device()), "torch_threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(), "batch_size": args.batch_size, "unets": []}
    for name, spec in (("attention-free (main job)", SHAPES_UNET), ("cross-attention", CROSS_ATTENTION)):
        unet = build_unet(spec, conditioner.dim, conditioner.layout_channels)
        row = {"unet": name, "parameters": sum(q.numel() for q in unet.parameters()),
               "train_step_s": step_seconds(unet.train(), conditioner, args.batch_size, args.steps),
               "images_per_s": images_per_second(unet.eval(), conditioner, args.images, args.sample_steps)}
        results["unets"].append(row)
        print(f"{name}: {row['train_step_s']:.3f} s a training step at batch {args.batch_size}, "
              f"{row['images_per_s']:.1f} images/s sampled with {args.sample_steps} DDIM steps, "
              f"{row['parameters'] / 1e6:.1f} M parameters")
    atomic_write_json(Path(args.out), results)
    return results


if __name__ == "__main__":
    main()
