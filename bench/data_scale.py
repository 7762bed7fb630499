"""Data-scale benchmark of the dense retriever's image path: peak resident memory and images per second of
`retriever.dense.encode` and of the first steps of `retriever.dense.train` over 2K / 20K / 100K 224-px JPEGs in
COCO's layout, beside the raw decode rate of the same files (a DataLoader, no model: the limit of the machine).

Reads nothing but the code; renders (once, cached) into `work_dir/coco{N}-seed{S}/` a Shapes-like world as
`train2014/`, `val2014/` JPEGs and a Karpathy `dataset_coco.json`, and runs every measurement there, each in its
own subprocess so that peaks do not mix. Writes `out_dir/data_scale.{json,csv,png}` (rewritten after every
measurement, so a long run that is stopped keeps what finished). Figures only: it asserts nothing.

    python -m bench.data_scale --sizes 2000,20000,100000
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from core.config import parse_config, save_config
from core.data import LoaderOptions, default_workers
from core.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, save_figure

FIXTURE_VERSION = 1  # bump when the fixture's images or captions change: cached fixtures are then rebuilt
FIXTURE_FILE = "fixture.json"
DATA_JSON = "dataset_coco.json"
# COCO's Karpathy split: 82,783 of its 113,287 training images are COCO train2014, the rest "restval" from val2014.
TRAIN_SHARE = 82783 / 113287

# A 224-px ViT (7×7 patches of 32 px) light enough that, on 2 CPU cores, the model does not hide the data path:
# on a GPU the tower is fast beside the decoding, and this is the nearest a CPU gets to that.
BENCH_ENCODER: dict[str, Any] = {
    "embed_dim": 64,
    "image_size": 224,
    "vision": {"layers": 2, "width": 64, "patch_size": 32, "head_width": 32, "mlp_ratio": 2.0},
    "text": {"context_length": 32, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}

# tqdm reads its defaults from TQDM_* variables; the stages do not set bar_format, so in the measured subprocesses
# every refresh of a progress bar prints one line that says (bar, n, total, elapsed seconds) to three decimals.
BAR_FORMAT = "@@{desc}|{n}|{total}|{elapsed_s:.3f}@@\n"
BAR_LINE = re.compile(r"@@(?P<desc>[^|\n]*)\|(?P<n>\d+)\|(?P<total>[^|\n]*)\|(?P<t>[\d.]+)@@")
RESULT_LINE = "@@decode-result "


@dataclass
class BenchConfig(LoaderOptions):
    sizes: list[int] = field(default_factory=lambda: [2000, 20000, 100000])  # training images per fixture
    work_dir: str = ""  # fixtures and runs; "" = <system temp>/genretrieval-data-scale (outside the repo)
    out_dir: str = "bench/results"  # data_scale.json, .csv, .png
    seed: int = 0  # fixes every fixture's scenes and captions
    image_size: int = 224
    jpeg_quality: int = 90
    captions_per_image: int = 5  # as COCO
    n_eval: int = 100  # val and test images each, beside the N training images (val feeds training's validation)
    render_workers: int = 2  # processes rendering a fixture
    train_steps: int = 200
    batch_size: int = 64  # training's global batch
    encode_batch_size: int = 256  # retriever.dense.encode's default
    decode_images: int = 10000  # the decode-only rate is measured on the split's first N files (0 = all): a rate
    # per file, it does not depend on the split's size, and decoding 100K files twice costs minutes
    model: dict = field(default_factory=lambda: dict(BENCH_ENCODER))  # encoder spec (core/encoders.py)
    keep_runs: bool = False  # keep each size's checkpoint and embeddings (they are otherwise deleted after use)


# ---------------------------------------------------------------------------------------------------------- fixture

def _fixture_spec(cfg: BenchConfig, n: int) -> dict[str, Any]:
    """Everything that decides a fixture's bytes: a cached fixture is reused only when all of it matches."""
    return {"version": FIXTURE_VERSION, "n_train": n, "n_eval": cfg.n_eval, "seed": cfg.seed,
            "image_size": cfg.image_size, "jpeg_quality": cfg.jpeg_quality,
            "captions_per_image": cfg.captions_per_image}


def _split_of(imgid: int, n_eval: int) -> str:
    """val, then test, then the training images dealt into COCO's train / restval shares."""
    if imgid < n_eval:
        return "val"
    if imgid < 2 * n_eval:
        return "test"
    j = imgid - 2 * n_eval
    return "train" if int((j + 1) * TRAIN_SHARE) > int(j * TRAIN_SHARE) else "restval"


def _coco_name(imgid: int, split: str) -> tuple[str, str]:
    folder = "train2014" if split == "train" else "val2014"
    return folder, f"COCO_{folder}_{imgid:012d}.jpg"


def _render_chunk(job: tuple[str, int, list[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Render images `ids` into `root` and return their Karpathy entries. Each image depends only on (seed, imgid),
    so the fixture is the same however the ids are dealt to processes."""
    from core.shapes.captions import caption_scene, tokenize
    from core.shapes.render import render
    from core.shapes.world import sample_scene

    root, seed, ids, spec = job
    entries = []
    for imgid in ids:
        rng = np.random.default_rng((seed, imgid))
        scene = sample_scene(rng)
        split = _split_of(imgid, spec["n_eval"])
        folder, filename = _coco_name(imgid, split)
        render(scene, spec["image_size"]).save(Path(root) / folder / filename, format="JPEG",
                                               quality=spec["jpeg_quality"])
        sentids = [imgid * spec["captions_per_image"] + k for k in range(spec["captions_per_image"])]
        sentences = [{"raw": raw, "tokens": tokenize(raw), "imgid": imgid, "sentid": s}
                     for raw, s in zip(caption_scene(scene, rng, spec["captions_per_image"]), sentids)]
        entries.append({"filepath": folder, "filename": filename, "imgid": imgid, "split": split,
                        "sentids": sentids, "sentences": sentences, "cocoid": imgid})
    return entries


def make_fixture(cfg: BenchConfig, n: int, work_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The fixture of `n` training images (+ n_eval val and test), rendered once and reused when present; returns
    its folder and {render_s, disk_mb, reused}."""
    root = work_dir / f"coco{n}-seed{cfg.seed}"
    spec = _fixture_spec(cfg, n)
    if (root / FIXTURE_FILE).is_file() and read_json(root / FIXTURE_FILE) == spec and (root / DATA_JSON).is_file():
        return root, {"render_s": None, "disk_mb": _disk_mb(root), "reused": True}
    started = time.perf_counter()
    with atomic_dir(root) as tmp:  # a stopped render leaves nothing that looks like a fixture
        for folder in ("train2014", "val2014"):
            (tmp / folder).mkdir()
        total = n + 2 * cfg.n_eval
        chunks = [list(range(i, min(i + 500, total))) for i in range(0, total, 500)]
        jobs = [(str(tmp), cfg.seed, ids, spec) for ids in chunks]
        with multiprocessing.get_context("fork").Pool(max(1, cfg.render_workers)) as pool:
            entries = [e for part in pool.imap(_render_chunk, jobs) for e in part]
        atomic_write_json(tmp / DATA_JSON, {"dataset": "coco", "images": entries}, indent=None)
        atomic_write_json(tmp / FIXTURE_FILE, spec)
    render_s = time.perf_counter() - started
    print(f"fixture: {n} training images rendered in {render_s:.0f}s -> {root}", flush=True)
    return root, {"render_s": render_s, "disk_mb": _disk_mb(root), "reused": False}


def _disk_mb(root: Path) -> float:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20


# ------------------------------------------------------------------------------------------------------ measuring

def _loadavg() -> float:
    return os.getloadavg()[0]


def run_measured(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd` as one subprocess and report its wall time, its peak resident memory (the largest of the process
    and its DataLoader workers, from wait4's rusage of this child alone), its CPU time (the process and its workers:
    a figure the other jobs on a shared machine disturb less than the wall time) and the 1-minute load average."""
    log.parent.mkdir(parents=True, exist_ok=True)
    loads, done = [_loadavg()], threading.Event()

    def sample() -> None:  # the CPU is shared: the load beside a number says how much to trust it
        while not done.wait(5.0):
            loads.append(_loadavg())

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen so it does not wait again
    wall = time.perf_counter() - started
    done.set()
    loads.append(_loadavg())
    return {"command": shlex.join(cmd), "returncode": proc.returncode, "wall_s": round(wall, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "loadavg_before": round(loads[0], 2), "loadavg_during_mean": round(float(np.mean(loads[1:-1] or loads)), 2),
            "loadavg_max": round(max(loads), 2), "loadavg_after": round(loads[-1], 2), "log": str(log)}


def bar_points(log_text: str, desc: str) -> list[tuple[int, int | None, float]]:
    """(n, total, elapsed_s) of every printed refresh of the first progress bar named `desc`."""
    points = []
    for m in BAR_LINE.finditer(log_text):
        if m["desc"] != desc:
            continue
        n, t = int(m["n"]), float(m["t"])
        if points and (n < points[-1][0] or t < points[-1][2]):  # a second bar of the same name began
            break
        total = int(m["total"]) if m["total"].isdigit() else None
        points.append((n, total, t))
    return points


def steady_rate(points: list[tuple[int, int | None, float]], images: Callable[[int], int],
                include_last: bool) -> tuple[float | None, str]:
    """Images per second between the first refresh after the first item (worker start-up and the first batch left
    out) and the last one (or the last before the bar finished, when what follows the loop — training's final
    validation and checkpoint — is inside the bar's time)."""
    if not points:
        return None, "no progress lines"
    total = points[-1][1]
    usable = [p for p in points if p[0] >= 1 and (include_last or total is None or p[0] < total)]
    if len(usable) >= 2 and usable[-1][2] > usable[0][2]:
        (n0, _, t0), (n1, _, t1) = usable[0], usable[-1]
        return (images(n1) - images(n0)) / (t1 - t0), f"steady state: progress refreshes n={n0}..{n1}"
    n, _, t = points[-1]
    return (images(n) / t if t > 0 else None), "whole bar (too few refreshes for a steady-state rate)"


def child_env() -> dict[str, str]:
    env = dict(os.environ, TQDM_BAR_FORMAT=BAR_FORMAT, TQDM_DISABLE="0", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1")
    return env


def _python() -> str:
    return sys.executable


def measure_train(cfg: BenchConfig, root: Path, run: Path, log: Path, workers: int,
                  env: dict[str, str]) -> dict[str, Any]:
    """The first `train_steps` steps of dense training; validation and a checkpoint only at the end."""
    shutil.rmtree(run, ignore_errors=True)
    cmd = [_python(), "-m", "retriever.dense.train", "--data_json", str(root / DATA_JSON), "--image_root", str(root),
           "--output_dir", str(run), "--model", json.dumps(cfg.model), "--batch_size", str(cfg.batch_size),
           "--max_steps", str(cfg.train_steps), "--warmup_steps", str(min(50, cfg.train_steps)),
           "--eval_every", str(10 ** 9), "--save_every", str(10 ** 9), "--max_val_images", str(cfg.n_eval),
           "--num_workers", str(workers), "--seed", str(cfg.seed)]
    result = run_measured(cmd, log, env)
    points = bar_points(log.read_text(errors="replace"), "training dense")
    rate, method = steady_rate(points, lambda steps: steps * cfg.batch_size, include_last=False)
    steps = points[-1][0] if points else 0
    return {**result, "images": steps * cfg.batch_size, "steps": steps, "images_per_s": _round(rate),
            "rate_method": method}


def measure_encode(cfg: BenchConfig, root: Path, checkpoint: Path, out: Path, log: Path, n: int, workers: int,
                   env: dict[str, str]) -> dict[str, Any]:
    """`retriever.dense.encode` of the N-image train split (train + restval): its images, then its captions."""
    shutil.rmtree(out, ignore_errors=True)  # encode keeps embeddings that are current; this must encode
    cmd = [_python(), "-m", "retriever.dense.encode", "--checkpoint", str(checkpoint),
           "--data_json", str(root / DATA_JSON), "--image_root", str(root), "--splits", "[train]",
           "--output_dir", str(out), "--batch_size", str(cfg.encode_batch_size), "--num_workers", str(workers)]
    result = run_measured(cmd, log, env)
    points = bar_points(log.read_text(errors="replace"), "encoding train images")
    rate, method = steady_rate(points, lambda batches: min(n, batches * cfg.encode_batch_size), include_last=True)
    return {**result, "images": n, "images_per_s": _round(rate), "rate_method": f"image loop, {method}",
            "whole_run_images_per_s": _round(n / result["wall_s"])}


def measure_decode(cfg: BenchConfig, root: Path, checkpoint: Path, log: Path, workers: int,
                   env: dict[str, str]) -> dict[str, Any]:
    """The same files through a DataLoader over core.data.ImageDataset with the encoder's preprocess, no model."""
    cmd = [_python(), "-m", "bench.data_scale", "decode", "--data_json", str(root / DATA_JSON),
           "--image_root", str(root), "--checkpoint", str(checkpoint), "--batch_size", str(cfg.encode_batch_size),
           "--num_workers", str(workers), "--max_images", str(cfg.decode_images)]
    result = run_measured(cmd, log, env)
    found = [line for line in Path(log).read_text(errors="replace").splitlines() if line.startswith(RESULT_LINE)]
    decoded = json.loads(found[-1][len(RESULT_LINE):]) if found else {}
    return {**result, "images": decoded.get("images"), "images_per_s": _round(decoded.get("images_per_s")),
            "rate_method": "steady state: after the first batch to the last"}


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 1)


# ------------------------------------------------------------------------------------------------ decode-only run

@dataclass
class DecodeConfig(LoaderOptions):
    data_json: str = ""
    image_root: str = ""
    split: str = "train"
    checkpoint: str = ""  # a dense checkpoint: its preprocess is the one the encoder applies
    batch_size: int = 256
    max_images: int = 0  # decode only the split's first N files (0 = all)


def decode_main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Decode and preprocess every image of a split with the loader's workers; print the rate, steady state."""
    import torch

    from core.data import ImageDataset, load_karpathy, make_loader
    from core.encoders import load_dual_encoder

    cfg = parse_config(DecodeConfig, argv)
    records = load_karpathy(cfg.data_json, cfg.image_root, cfg.split)
    records = records[:cfg.max_images] if cfg.max_images else records
    preprocess = load_dual_encoder(cfg.checkpoint).preprocess
    loader = make_loader(ImageDataset([r.path for r in records], preprocess, cfg.data_json), cfg,
                         batch_size=cfg.batch_size, device=torch.device("cpu"))
    seen, first, t0 = 0, 0, 0.0
    for batch in loader:
        seen += len(batch)
        if not first:  # worker start-up and the first batch are left out, as in the encode and train rates
            first, t0 = seen, time.perf_counter()
    elapsed = time.perf_counter() - t0
    rate = (seen - first) / elapsed if seen > first and elapsed > 0 else float("nan")
    result = {"images": seen, "images_per_s": rate, "seconds": elapsed}
    print(RESULT_LINE + json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------- report

def machine() -> dict[str, Any]:
    import torch

    model = ""
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else ""
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": model or platform.processor(), "memory_gb": round(mem_gb, 1) if mem_gb else None,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}


def summary(measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per size: encode / train peak RSS and rates, decode rate, and the ratios the targets are about."""
    by = {(m["size"], m["what"]): m for m in measurements}
    sizes = sorted({m["size"] for m in measurements})
    base = {what: by.get((sizes[0], what), {}).get("peak_rss_mb") for what in ("encode", "train")} if sizes else {}
    rows = []
    for size in sizes:
        enc, tr, dec = (by.get((size, w), {}) for w in ("encode", "train", "decode"))
        decode_rate = dec.get("images_per_s")
        row = {"size": size,
               "encode_rss_mb": enc.get("peak_rss_mb"), "encode_img_s": enc.get("images_per_s"),
               "train_rss_mb": tr.get("peak_rss_mb"), "train_img_s": tr.get("images_per_s"),
               "decode_rss_mb": dec.get("peak_rss_mb"), "decode_img_s": decode_rate,
               "encode_rss_vs_smallest": _ratio(enc.get("peak_rss_mb"), base.get("encode")),
               "train_rss_vs_smallest": _ratio(tr.get("peak_rss_mb"), base.get("train")),
               "encode_vs_decode": _ratio(enc.get("images_per_s"), decode_rate),
               "train_vs_decode": _ratio(tr.get("images_per_s"), decode_rate),
               "loadavg_mean": _round_or_none([m.get("loadavg_during_mean") for m in (enc, tr, dec)])}
        rows.append(row)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _round_or_none(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 2) if values else None


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "data_scale.json", report)
    rows = report["table"]
    if rows:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out_dir / "data_scale.csv", buf.getvalue())
        atomic_write_text(out_dir / "data_scale.md", markdown_table(rows))
        _plot(rows, out_dir / "data_scale.png")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary as the table docs/scale.md shows."""
    head = ["images", "encode peak RSS (MB)", "encode img/s", "train peak RSS (MB)", "train img/s",
            "decode peak RSS (MB)", "decode img/s", "encode RSS ÷ smallest", "train RSS ÷ smallest", "encode ÷ decode", "train ÷ decode",
            "load (1 min)"]
    keys = ["size", "encode_rss_mb", "encode_img_s", "train_rss_mb", "train_img_s", "decode_rss_mb",
            "decode_img_s", "encode_rss_vs_smallest", "train_rss_vs_smallest", "encode_vs_decode", "train_vs_decode", "loadavg_mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    lines += ["| " + " | ".join("—" if r.get(k) is None else f"{r[k]:,}" if k == "size" else f"{r[k]:g}"
                                for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, rate) = plt.subplots(1, 2, figsize=(9, 3.5))
    sizes = [r["size"] for r in rows]
    for key, label in (("encode_rss_mb", "encode"), ("train_rss_mb", "train"), ("decode_rss_mb", "decode only")):
        mem.plot(sizes, [r[key] or np.nan for r in rows], marker="o", label=label)
    if rows[0]["encode_rss_mb"]:
        mem.axhline(1.3 * rows[0]["encode_rss_mb"], color="grey", ls=":", label="1.3 × encode at smallest")
    mem.set(xscale="log", xlabel="images in the split", ylabel="peak RSS (MB)", title="peak resident memory")
    for key, label in (("decode_img_s", "decode only"), ("encode_img_s", "encode"), ("train_img_s", "train")):
        rate.plot(sizes, [r[key] or np.nan for r in rows], marker="o", label=label)
    rate.set(xscale="log", xlabel="images in the split", ylabel="images / s", title="throughput")
    for ax in (mem, rate):
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------------------------------------ main

def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["decode"]:
        return decode_main(argv[1:])
    cfg = parse_config(BenchConfig, argv)
    work = Path(cfg.work_dir or Path(tempfile.gettempdir()) / "genretrieval-data-scale")
    out_dir = Path(cfg.out_dir)
    workers = cfg.num_workers if cfg.num_workers >= 0 else default_workers()  # one number for all three
    env = child_env()
    report: dict[str, Any] = {
        "machine": machine(), "config": asdict(cfg), "num_workers": workers, "work_dir": str(work),
        "fixtures": {}, "measurements": [], "table": [],
        "targets": {"encode_rss_vs_smallest": "<= 1.3 at the largest size", "encode_vs_decode": ">= 0.8",
                    "train_vs_decode": ">= 0.8"},
        "rates": "images/s of each loop in steady state, from its progress bar's refreshes (tqdm elapsed times "
                 "printed through TQDM_BAR_FORMAT), the first batch (worker start-up) left out; train: the step loop "
                 "before the final validation, global batch × steps; encode: the image loop only (captions come "
                 "after it); decode: a DataLoader over core.data.ImageDataset with the encoder's preprocess.",
        "peak_rss": "ru_maxrss of each measurement's own subprocess from wait4: the largest of the process and "
                    "its DataLoader workers (not their sum)",
    }
    save_config(cfg, out_dir / "data_scale_config.yaml")
    for n in sorted(cfg.sizes):
        root, info = make_fixture(cfg, n, work)
        report["fixtures"][str(n)] = {"dir": str(root), **info}
        run, logs = work / f"runs-{n}", work / "logs"
        checkpoint = run / "dense" / "checkpoint-best"  # the encode and decode runs read the trained encoder
        measurements = (
            ("train", lambda: measure_train(cfg, root, run / "dense", logs / f"{n}-train.log", workers, env)),
            ("encode", lambda: measure_encode(cfg, root, checkpoint, run / "emb", logs / f"{n}-encode.log", n,
                                              workers, env)),
            ("decode", lambda: measure_decode(cfg, root, checkpoint, logs / f"{n}-decode.log", workers, env)),
        )
        for what, measure in measurements:
            if what != "train" and not checkpoint.is_dir():
                print(f"{n}: {what} skipped, training made no checkpoint", flush=True)
                continue
            m = {"size": n, "what": what, **measure()}
            m["cpu_ms_per_image"] = round(1000 * m["cpu_s"] / m["images"], 2) if m.get("images") else None
            report["measurements"].append(m)
            report["table"] = summary(report["measurements"])
            write_report(out_dir, report)
            tail = "" if m["returncode"] == 0 else f" FAILED (rc {m['returncode']}, see {m['log']})"
            print(f"{n:>7} {what:<6} peak RSS {m['peak_rss_mb']:>7.0f} MB, {m['images_per_s'] or float('nan'):>7.1f}"
                  f" img/s, wall {m['wall_s']:.0f}s, load {m['loadavg_during_mean']}{tail}", flush=True)
        if not cfg.keep_runs:
            shutil.rmtree(run, ignore_errors=True)
    _print_table(report["table"])
    return report


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join("" if r[k] is None else str(r[k]) for k in keys))


if __name__ == "__main__":
    main()
