"""Train the Shapes text-to-image generator: first a caption → layout encoder (mir.layout) on the training split's
captions and the world's scenes, then a diffusers UNet2DConditionModel on the training images (down-sampled to
`resolution`) conditioned on that layout and the frozen dense text tower; then measure generated-image →
real-image retrieval and the object check on the test split.

Reads the Karpathy JSON, the images (one opened per item by a DataLoader's workers, never the whole split in
memory), the world's `scenes.json` and `dense_checkpoint`; writes `output_dir/layout_encoder.pt` (cached: a rerun
reuses it), `checkpoint-last/` (UNet, EMA, optimizer, step, RNG: a killed run resumes), `checkpoint-best/` (the EMA
UNet with the text and layout encoders, loadable by `mir.generator.load_generator`), `metrics.json`, `samples.png`
(caption, generated, real) and `denoising.png` (x0 predictions of noised test images: where detail is lost).

Under torchrun every rank trains on its share of each global batch (DDP on the UNet); rank 0 alone writes files
and evaluates, and a batch_size the number of processes does not divide is refused before any work.

    python -m mir.train_generator --config configs/mir/generator_shapes.yaml --output_dir runs/shapes/mir/generator
    torchrun --nproc_per_node 2 -m mir.train_generator --config configs/mir/generator_shapes.yaml ...
"""
from __future__ import annotations

import collections
import copy
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from core.checkpoint import BEST, LAST, read_meta, resume, save_checkpoint
from core.config import nested_keys, parse_config, save_config, signature_keys
from core.data import (EpochBatchSampler, ImageRecord, LoaderOptions, image_batches, load_karpathy, make_loader,
                       open_image, verify_images)
from core.device import autocast, derive_seed, seed_everything, set_threads
from core.distributed import (DistInfo, all_reduce_mean, barrier, broadcast_object, check_batch_divisible, cleanup,
                              init_distributed, rank_share, world_size_from_env, wrap_model)
from core.encoders import load_dual_encoder
from core.errors import InputError
from core.io import save_figure
from core.logging import LossSpikeWatch, Tracker, progress, write_metrics
from core.metrics import rank_counting_ties, t2i_recall
from core.results import update_summary
from core.run_folder import open_run_folder
from core.shapes.make import SCENES_FILE, load_scenes
from core.shapes.world import Scene
from mir.generator import (SHAPES_SCHEDULER, SHAPES_UNET, STAGE, Conditioning, PixelImages, TextConditioner,
                           build_unet, images_to_pixels, load_shapes_generator, to_pil, to_pixels,
                           write_generator_files)
from mir.layout import LAYOUT_FILE, LayoutEncoder, layout_accuracy, layout_tokens, load_layout_encoder, load_or_train_layout
from core.shapes.scene_reader import READER_FILE, READER_RESOLUTION, load_or_train_reader, object_metrics, read_cells
from mir.object_check import complete_caption


def unet_keys() -> dict[str, None]:
    """What `unet` may set: UNet2DModel's arguments and the patch UNet's own (mir.generator.build_unet)."""
    from diffusers import UNet2DModel

    return signature_keys(UNet2DModel.__init__, "resolution", "patch")


def scheduler_keys() -> dict[str, None]:
    from diffusers import DDPMScheduler

    return signature_keys(DDPMScheduler.__init__)


@dataclass
class TrainGeneratorConfig(LoaderOptions):
    data_json: str = "data/shapes/dataset_shapes.json"
    image_root: str = "data/shapes/images"
    dense_checkpoint: str = "runs/shapes/dense/checkpoint-best"  # its text tower conditions the UNet
    output_dir: str = "runs/shapes/mir/generator"
    unet: dict = field(default_factory=lambda: copy.deepcopy(SHAPES_UNET), metadata=nested_keys(unet_keys))
    scheduler: dict = field(default_factory=lambda: copy.deepcopy(SHAPES_SCHEDULER),
                            metadata=nested_keys(scheduler_keys))
    batch_size: int = 64  # the global batch: under torchrun each of the w processes trains on batch_size / w
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995  # EMA weights are the ones sampled from: much cleaner images this early in training
    cond_drop: float = 0.1  # share of captions replaced by "" so classifier-free guidance has an unconditional model
    save_every: int = 250
    eval_split: str = "test"
    eval_images: int = 300  # test images whose first caption is generated and searched for among all test images
    sample_steps: int = 20  # DDIM steps at evaluation
    guidance: float = 2.0
    image_size: int = 64  # generated images are up-sampled to the dense encoder's input size
    world_dir: str = ""  # the Shapes world's folder with scenes.json (empty: data_json's folder)
    layout: bool = True  # draw from a caption → layout encoder trained on the world's scenes (mir.layout)
    layout_epochs: int = 2  # training epochs of the layout encoder over the training captions
    sample_every: int = 0  # write a sheet of EMA samples every this many steps (0: only at the end)
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = one per core, 1 when the CPU is shared with other busy jobs
    overwrite: bool = False  # start afresh where output_dir holds another run (core.run_folder)
    summary: str = ""  # results.json to add the row mir/generator to (empty: none)
    wandb_project: str = "genretrieval"


class UNetWithEMA(torch.nn.Module):
    """The trained UNet and its exponential moving average, saved and resumed together."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.ema = copy.deepcopy(unet).requires_grad_(False)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        for e, p in zip(self.ema.parameters(), self.unet.parameters()):
            e.lerp_(p, 1.0 - decay)


def load_pixels(paths: Sequence[str | Path], resolution: int) -> torch.Tensor:
    """Image files as [-1, 1] tensors at `resolution`, all in memory: for the few images of a probe or a sample
    sheet only (training reads mir.generator.PixelImages through a DataLoader)."""
    return torch.stack([to_pixels(open_image(p), resolution) for p in paths])


def step_draws(cfg: TrainGeneratorConfig, captions: Sequence[Sequence[str]], batch: np.ndarray, step: int,
               shape: Sequence[int], timesteps: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Everything random in one training step, drawn for the whole global batch from (seed, step): each image's
    caption (or "" with probability cond_drop), the noise and the timesteps. A resumed run replays the step, and
    each rank takes its share of the same draws, so the ranks together compute one process's loss."""
    rng = np.random.default_rng(derive_seed(cfg.seed, "captions", step))
    texts = ["" if rng.random() < cfg.cond_drop else captions[i][rng.integers(len(captions[i]))] for i in batch]
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "noise", step))
    noise = torch.randn((len(batch), *shape), generator=gen)
    t = torch.randint(0, timesteps, (len(batch),), generator=gen)
    return texts, noise, t


def diffusion_loss(unet: torch.nn.Module, noise_scheduler: Any, cond: Conditioning, x0: torch.Tensor,
                   noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 14 of Ho et al. 2020 (the simple loss) with the scheduler's target: x0 (||x̂_θ(x_t, t, c) − x0||²,
    the default here), ε, or v (Salimans & Ho 2022). The mean over these rows: under DDP each rank's share."""
    xt = noise_scheduler.add_noise(x0, noise, t)
    kind = noise_scheduler.config.prediction_type
    target = {"sample": x0, "epsilon": noise}.get(kind)
    if kind == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, t)
    with autocast(x0.device):
        pred = unet(xt, t, cond)
    return torch.nn.functional.mse_loss(pred.float(), target)


def train_batches(loader: torch.utils.data.DataLoader, sampler: EpochBatchSampler, n_batches: int, start: int,
                  stop: int) -> Iterator[tuple[int, np.ndarray, torch.Tensor]]:
    """(step, the global batch's image indices, this rank's images) for steps [start, stop), `n_batches` an epoch.
    Epoch e walks the permutation of (seed, e); a resumed run starts mid-epoch at the batch where it stopped."""
    step = start
    while step < stop:
        epoch, skip = divmod(step, n_batches)
        sampler.set_epoch(epoch, skip)
        for batch, pixels in zip(sampler.global_batches(), loader):
            yield step, batch, pixels
            step += 1
            if step == stop:
                return


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    from diffusers import DDPMScheduler

    cfg = parse_config(TrainGeneratorConfig, argv)
    check_batch_divisible(cfg.batch_size, world_size_from_env())  # before any work: each rank gets an equal share
    read_meta(cfg.dense_checkpoint, stage="dense")
    if cfg.layout:
        require_scenes(cfg)
    out = Path(cfg.output_dir)
    best = out / BEST
    start = open_run_folder(out, cfg, overwrite=cfg.overwrite)
    if (start.reuse_finished and (best / "meta.json").is_file() and read_meta(best, STAGE).get("step") == cfg.steps
            and (out / "metrics.json").is_file()):
        print(f"generator already trained for {cfg.steps} steps: {best}")
        return _read_metrics(out)
    train = load_karpathy(cfg.data_json, cfg.image_root, "train")
    if len(train) < cfg.batch_size:
        raise InputError(cfg.data_json, "batch_size", f"the training split has {len(train)} images, fewer than one "
                         f"batch of {cfg.batch_size}")
    if cfg.verify_images:
        verify_images([r.path for r in train], cfg.data_json, cfg)
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    dist = init_distributed()
    device = dist.device
    encoder = load_dual_encoder(cfg.dense_checkpoint)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    layout = shared_layout(cfg, encoder, train, out, dist) if cfg.layout else None
    conditioner = TextConditioner(encoder, layout).to(device).eval().requires_grad_(False)
    # The UNet's first weights come from the seed alone, whether the layout encoder was trained now or cached.
    torch.manual_seed(derive_seed(cfg.seed, "unet"))
    model = UNetWithEMA(build_unet(cfg.unet, conditioner.dim, conditioner.layout_channels)).to(device)
    noise_scheduler = DDPMScheduler(**cfg.scheduler)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    step = 0
    if not start.fresh and (out / LAST / "training_state.pt").is_file():
        step, _ = resume(out / LAST, stage=STAGE, model=model, optimizer=opt, scheduler=sched)
        if dist.is_main:
            print(f"resumed generator training at step {step}")
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"mir-generator-{out.parent.parent.name}",
                      enabled=dist.is_main)
    # DDP averages the UNet's gradients over the ranks; the frozen conditioner and the EMA copy stay outside it.
    unet = wrap_model(model.unet, dist)
    captions = [r.captions for r in train]
    sampler = EpochBatchSampler(len(train), cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
    images = PixelImages([r.path for r in train], model.unet.resolution, cfg.data_json)
    loader = make_loader(images, cfg, batch_sampler=sampler, device=device)
    model.unet.train()
    t0 = time.time()
    watch = LossSpikeWatch()
    recent = collections.deque(maxlen=50)  # the global batch's losses of the last steps, for metrics.json
    bar = progress(desc="training generator", initial=step, total=cfg.steps, enabled=dist.is_main)
    n_batches = len(train) // cfg.batch_size
    for step, batch, x0 in train_batches(loader, sampler, n_batches, step, cfg.steps):
        texts, noise, t = step_draws(cfg, captions, batch, step, x0.shape[1:], noise_scheduler.config.num_train_timesteps)
        with autocast(device):
            cond = conditioner(rank_share(texts, dist))
        loss = diffusion_loss(unet, noise_scheduler, cond, x0.to(device, non_blocking=True),
                              rank_share(noise, dist).to(device), rank_share(t, dist).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        opt.step()
        sched.step()
        model.update_ema(min(cfg.ema_decay, (1 + step) / (10 + step)))
        loss_value = all_reduce_mean(loss.item(), dist)  # the global batch's loss, as one process computes it
        recent.append(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if dist.is_main:
            tracker.log({"train/loss": loss_value}, step=step)
            if watch.update(step, loss_value):
                bar.write(f"warning: the generator's training loss jumped at step {step} (smoothed {watch.smoothed:.4f}, "
                          f"best {watch.best:.4f}): training has diverged and its samples will degrade; rerun with a "
                          f"lower --lr or fewer --steps (docs/mir.md)")
            if done % cfg.save_every == 0 or done == cfg.steps:
                save_checkpoint(out / LAST, stage=STAGE, model=model, step=done, optimizer=opt, scheduler=sched,
                                config=cfg)
            if cfg.sample_every and done % cfg.sample_every == 0:
                _progress_samples(cfg, model, conditioner, out / f"samples_step{done:05d}.png", dist.device)
                model.unet.train()
    bar.close()
    train_s = time.time() - t0
    metrics = None
    if dist.is_main:  # the other ranks wait at the broadcast below
        metrics = finish(cfg, model, conditioner, encoder, watch, train_s, device, tracker, list(recent))
    tracker.finish()
    metrics = broadcast_object(metrics, dist)
    cleanup(dist)
    return metrics


def shared_layout(cfg: TrainGeneratorConfig, encoder: Any, train: Sequence[ImageRecord], out: Path,
                  dist: DistInfo) -> LayoutEncoder:
    """Rank 0 trains the caption → layout encoder (or finds it cached) and writes it; the other ranks load that file."""
    layout = train_layout(cfg, encoder, train, out) if dist.is_main else None
    barrier(dist)
    if layout is None:
        layout = load_layout_encoder(out / LAYOUT_FILE).eval().requires_grad_(False)
    return layout


def finish(cfg: TrainGeneratorConfig, model: UNetWithEMA, conditioner: TextConditioner, encoder: Any,
           watch: LossSpikeWatch, train_s: float, device: torch.device, tracker: Tracker,
           recent_losses: list[float]) -> dict[str, float]:
    """Rank 0: checkpoint-best (the EMA UNet), the evaluation, metrics.json and the summary row."""
    out = Path(cfg.output_dir)
    files = lambda tmp: write_generator_files(tmp, cfg.unet, cfg.scheduler, conditioner)  # noqa: E731
    save_checkpoint(out / BEST, stage=STAGE, model=model.ema, step=cfg.steps, config=cfg, model_files=files)
    metrics = evaluate_generator(cfg, out / BEST, encoder, device)
    metrics["train_seconds_this_run"] = round(train_s, 1)
    if recent_losses:  # none when a resumed run had no step left
        metrics["train loss (last 50 steps)"] = float(np.mean(recent_losses))
    if watch.tripped_at is not None:
        metrics["diverged_at_step"] = watch.tripped_at
    write_metrics(out, metrics)
    tracker.log({f"eval/{k}": v for k, v in metrics.items()})
    print(f"generator: gen→real R@1/5/10 = {metrics['R@1']:.1f}/{metrics['R@5']:.1f}/{metrics['R@10']:.1f} "
          f"(chance R@10 = {metrics['chance R@10']:.1f}) over {metrics['N']} test captions")
    if "object acc" in metrics:
        print(f"generator: objects drawn right (shape and colour in the named cell) {metrics['object acc']:.1f} % "
              f"(shape {metrics['shape acc']:.1f} %, colour {metrics['colour acc']:.1f} %), "
              f"{metrics['extra objects / image']:.2f} extra objects an image, over {metrics['object eval captions']} "
              f"captions naming every object; the reader scores {metrics['real object acc']:.1f} % on real images")
    if cfg.summary:
        update_summary(cfg.summary, "mir", {"generator (gen→real)": metrics})
    return metrics


@torch.no_grad()
def evaluate_generator(cfg: TrainGeneratorConfig, folder: Path, encoder: Any, device: torch.device) -> dict[str, float]:
    """Generate each eval image's first caption and rank all eval-split images by the dense image tower."""
    records = load_karpathy(cfg.data_json, cfg.image_root, cfg.eval_split)
    queries = records[: cfg.eval_images]
    generator = load_shapes_generator(folder, cfg.sample_steps, cfg.guidance, cfg.image_size, device)
    seeds = [derive_seed(cfg.seed, "eval", r.imgid) for r in queries]
    fakes = generator.generate([r.captions[0] for r in queries], seeds)
    encoder = encoder.to(device).eval()
    real = _encode_paths(cfg, encoder, [r.path for r in records], device)
    fake = _encode_images(encoder, fakes, device)
    sim = fake @ real.T
    metrics = t2i_recall(sim, np.arange(len(queries)))  # a generated image is the query, its real image the target
    rank = rank_counting_ties(sim, sim[np.arange(len(queries)), np.arange(len(queries))])
    metrics.update({"chance R@10": 100 * min(10, len(records)) / len(records), "N": len(queries),
                    "corpus": len(records), "mean log rank": float(np.mean(np.log1p(rank)))})
    save_sample_sheet(folder.parent / "samples.png", [r.captions[0] for r in queries[:12]], fakes[:12],
                      [open_image(r.path, cfg.data_json) for r in queries[:12]])
    metrics.update(denoising_probe(cfg, generator, queries[:6], folder.parent / "denoising.png"))
    metrics.update(object_accuracy(cfg, generator, records, folder.parent))
    return metrics


def scenes_path(cfg: TrainGeneratorConfig) -> Path:
    """The world's `scenes.json`: in `world_dir`, or else beside the caption file."""
    return (Path(cfg.world_dir) if cfg.world_dir else Path(cfg.data_json).parent) / SCENES_FILE


def require_scenes(cfg: TrainGeneratorConfig) -> None:
    if not scenes_path(cfg).is_file():
        raise InputError(scenes_path(cfg), "world_dir", "the layout encoder learns from the Shapes world's scenes; "
                         "pass --world_dir, or --layout false for a generator without one")


def world_scenes(cfg: TrainGeneratorConfig) -> dict[int, Scene] | None:
    """The world's scenes by image id; None when there is no scenes.json."""
    path = scenes_path(cfg)
    return {r.imgid: r.scene for r in load_scenes(path.parent)} if path.is_file() else None


def scenes_of(cfg: TrainGeneratorConfig, scenes: dict[int, Scene], records: Sequence[Any]) -> list[Scene]:
    missing = [r.imgid for r in records if r.imgid not in scenes]
    if missing:
        raise InputError(scenes_path(cfg), "images", f"no scene for imgid {missing[0]} of {cfg.data_json}")
    return [scenes[r.imgid] for r in records]


def train_layout(cfg: TrainGeneratorConfig, encoder: Any, train: Sequence[ImageRecord], out: Path) -> LayoutEncoder:
    """The caption → layout encoder for the training split (cached in the run folder, so a resumed run reuses it)."""
    scenes = scenes_of(cfg, world_scenes(cfg), train)
    vocab = encoder.clip.token_embedding.num_embeddings
    layout = load_or_train_layout(out / LAYOUT_FILE, lambda texts: layout_tokens(encoder.tokenizer, texts), vocab,
                                  [r.captions for r in train], scenes, cfg.seed, cfg.layout_epochs, progress=progress)
    return layout.eval().requires_grad_(False)


def object_accuracy(cfg: TrainGeneratorConfig, generator: Any, records: Sequence[Any], out: Path) -> dict[str, float]:
    """GenEval-style object check (core.shapes.scene_reader): each of the first `eval_images` eval images that has a caption
    naming every object is generated from that caption, and a reader trained on the real training images says
    which shape and colour it sees in each grid cell. With a layout encoder, also how often it reads those
    captions right. Returns {} with a note when the world's scenes.json is absent."""
    scenes = world_scenes(cfg)
    if scenes is None:
        print(f"no {SCENES_FILE} in the world's folder: object-level accuracy skipped (it reads the Shapes world's scenes)")
        return {}
    eval_scenes = scenes_of(cfg, scenes, records)
    train = load_karpathy(cfg.data_json, cfg.image_root, "train")
    reader = load_or_train_reader(out / READER_FILE,
                                  lambda: PixelImages([r.path for r in train], READER_RESOLUTION, cfg.data_json),
                                  scenes_of(cfg, scenes, train), cfg.seed, progress=progress, loader=cfg)
    real = object_metrics(*_read_real_cells(cfg, reader, [r.path for r in records]), eval_scenes)
    chosen = [(r, cap, scene) for r, scene in zip(records[: cfg.eval_images], eval_scenes)
              if (cap := complete_caption(r.captions, scene))]
    if not chosen:
        print("no eval image has a caption naming all its objects: object-level accuracy skipped")
        return {}
    captions, chosen_scenes = [c for _, c, _ in chosen], [s for _, _, s in chosen]
    fakes = generator.generate(captions, [derive_seed(cfg.seed, "eval", r.imgid) for r, _, _ in chosen])
    fake = object_metrics(*read_cells(reader, images_to_pixels(fakes, READER_RESOLUTION)), chosen_scenes)
    metrics = {"object acc": fake["object acc"], "shape acc": fake["shape acc"], "colour acc": fake["colour acc"],
               "extra objects / image": fake["extra objects / image"], "object eval captions": fake["images"],
               "real object acc": real["object acc"], "real extra objects / image": real["extra objects / image"]}
    layout = generator.conditioner.layout
    if layout is not None:
        tokens = layout_tokens(generator.conditioner.encoder.tokenizer, captions).to(generator.device)
        metrics.update(layout_accuracy(layout, tokens, chosen_scenes))
    return metrics


PROBE_TIMESTEPS = (50, 100, 300, 500, 700, 900)


@torch.no_grad()
def denoising_probe(cfg: TrainGeneratorConfig, generator: Any, records: Sequence[Any], path: Path) -> dict[str, float]:
    """The model's x0 prediction for real test images noised to several levels, with their captions: shows at which
    noise level detail is lost (a model that blurs even nearly clean inputs draws blobs whatever the sampler).
    Writes `path` (rows: real, then noisy input and prediction per level) and returns the x0 MSE per level."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**cfg.scheduler)
    device = generator.device
    x0 = load_pixels([r.path for r in records], generator.unet.resolution).to(device)
    with autocast(device):
        cond = generator.conditioner([r.captions[0] for r in records])
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "probe"))
    rows, labels, metrics = [to_pil(x0, cfg.image_size)], ["real"], {}
    for t in PROBE_TIMESTEPS:
        ts = torch.full((len(x0),), t, dtype=torch.long, device=device)
        xt = noise_scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen).to(device), ts)
        pred = generator.predict(xt, ts[0], cond)
        metrics[f"x0 MSE t={t}"] = float(torch.nn.functional.mse_loss(pred, x0))
        rows += [to_pil(xt, cfg.image_size), to_pil(pred, cfg.image_size)]
        labels += [f"t={t} input", f"t={t} x0 pred."]
    save_image_grid(path, rows, labels)
    return metrics


@torch.no_grad()
def _progress_samples(cfg: TrainGeneratorConfig, model: UNetWithEMA, conditioner: TextConditioner, path: Path,
                      device: torch.device) -> None:
    """Samples of the current EMA weights for the first eval captions, to watch training."""
    from mir.generator import ShapesGenerator

    records = load_karpathy(cfg.data_json, cfg.image_root, cfg.eval_split)[:12]
    gen = ShapesGenerator(model.ema, cfg.scheduler, conditioner, "ema", cfg.sample_steps, cfg.guidance, cfg.image_size, device)
    fakes = gen.generate([r.captions[0] for r in records], [derive_seed(cfg.seed, "eval", r.imgid) for r in records])
    save_sample_sheet(path, [r.captions[0] for r in records], fakes, [open_image(r.path, cfg.data_json) for r in records])


def _encode_images(encoder: Any, images: list[Image.Image], device: torch.device, batch: int = 256) -> np.ndarray:
    """Generated images (held anyway) through the dense image tower."""
    out = []
    for i in range(0, len(images), batch):
        px = torch.stack([encoder.preprocess(im) for im in images[i:i + batch]]).to(device)
        with autocast(device):
            out.append(encoder.encode_image(px).float().cpu())
    return torch.cat(out).numpy()


def _encode_paths(cfg: TrainGeneratorConfig, encoder: Any, paths: Sequence[Path], device: torch.device,
                  batch: int = 256) -> np.ndarray:
    """Image files through the dense image tower, decoded by the DataLoader's workers a batch at a time."""
    out = []
    for px in image_batches(paths, encoder.preprocess, cfg, batch, device, cfg.data_json, desc="encoding eval images"):
        with autocast(device):
            out.append(encoder.encode_image(px.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def _read_real_cells(cfg: TrainGeneratorConfig, reader: Any, paths: Sequence[Path],
                     batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The scene reader's per-cell (shape, colour) classes of image files, read through the DataLoader."""
    preprocess = functools.partial(to_pixels, resolution=READER_RESOLUTION)
    parts = [read_cells(reader, px, batch) for px in image_batches(paths, preprocess, cfg, batch,
                                                                   listed_in=cfg.data_json, desc="reading eval images")]
    return torch.cat([s for s, _ in parts]), torch.cat([c for _, c in parts])


def save_sample_sheet(path: Path, captions: list[str], fakes: list[Image.Image], reals: list[Image.Image]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(captions)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.8), squeeze=False)
    for j in range(n):
        for i, (img, label) in enumerate(((fakes[j], "generated"), (reals[j], "real"))):
            axes[i][j].imshow(img)
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
            if j == 0:
                axes[i][j].set_ylabel(label)
        axes[0][j].set_title(_wrap(captions[j]), fontsize=5)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def save_image_grid(path: Path, rows: list[list[Image.Image]], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(1.2 * len(rows[0]) + 0.8, 1.2 * len(rows)), squeeze=False)
    for i, (row, label) in enumerate(zip(rows, labels)):
        for j, img in enumerate(row):
            axes[i][j].imshow(img)
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
        axes[i][0].set_ylabel(label, fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _wrap(text: str, width: int = 24) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _read_metrics(out: Path) -> dict[str, float]:
    import json

    return json.loads((out / "metrics.json").read_text())


if __name__ == "__main__":
    main()
