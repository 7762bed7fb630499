"""`DATASET=coco|flickr30k bash scripts/comgtir/run.sh` end to end on fixtures in the real layouts (Karpathy JSON,
COCO's train2014/ and val2014/ folders, Flickr30K's flickr30k-images/), with tiny local models of the real classes
(an open_clip CLIP, a T5, BLIP's captioner and ITM) put in through the scripts' model overrides and the step
configs copied with tiny sizes. Plus the refusals that come before any work."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORDS = "red blue green yellow circle square triangle star top bottom left right middle small large".split()
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "yellow": (230, 220, 30)}
SHAPES = ["circle", "square", "triangle", "star"]
TINY_CLIP = {"embed_dim": 16, "image_size": 32,
             "vision": {"layers": 1, "width": 32, "patch_size": 8, "head_width": 16, "mlp_ratio": 2.0},
             "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0}}
# every step's sizes made tiny (the dataset's own values otherwise: its paths and models come from the scripts)
TINY_CONFIGS = {
    "prepare_emb": {"batch_size": 8, "num_workers": 0},
    "rqvae": {"hidden_dim": 32, "latent_dim": 16, "levels": 2, "codebook_size": 8, "epochs": 20, "batch_size": 16,
              "restart_every": 10},
    "pseudo_query": {"n_per_image": 2, "batch_size": 8, "num_workers": 0},
    "retriever": {"epochs": 1, "batch_size": 16, "warmup_steps": 1, "num_beams": 4, "max_val_queries": 8,
                  "max_query_len": 16},
    "evaluate": {"num_beams": 4, "batch_size": 8, "prefix_top": 8, "max_query_len": 16},
    "rerank": {"depth": 4, "batch_size": 8, "num_workers": 0},
}
# (Karpathy split, image folder) of each fixture image: COCO's restval images sit in val2014/ as in the real data
LAYOUT = {
    "coco": ("dataset_coco.json", "images", [("train", "train2014")] * 8 + [("restval", "val2014")] * 4
             + [("val", "val2014")] * 4 + [("test", "val2014")] * 4),
    "flickr30k": ("dataset_flickr30k.json", "flickr30k-images", [("train", "")] * 12 + [("val", "")] * 4
                  + [("test", "")] * 4),
}
ROWS = ["rqvae", "seq-id", "dual-id", "dual-id+dense-rerank", "dual-id+itm-rerank"]


def write_dataset(data: Path, dataset: str, drop_split: str = "") -> Path:
    """A Karpathy JSON and tiny rendered images (a coloured shape on grey, 32 px), five captions per image."""
    from PIL import Image, ImageDraw

    json_name, root, layout = LAYOUT[dataset]
    rng = np.random.default_rng(0)
    images = []
    for i, (split, folder) in enumerate(layout):
        if split == drop_split:
            continue
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 4]
        name = f"COCO_{folder}_{i:012d}.jpg" if dataset == "coco" else f"{1000 + i}.jpg"
        path = data / root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (32, 32), (128, 128, 128))
        x, y = int(rng.integers(2, 14)), int(rng.integers(2, 14))
        ImageDraw.Draw(image).rectangle([x, y, x + 14 + i % 3, y + 14], fill=COLOURS[colour])
        image.save(path)
        captions = [f"a {size} {colour} {shape} {where}" for size, where in
                    [("small", "top left"), ("large", "bottom right"), ("small", "middle"), ("large", "top"),
                     ("small", "left")]]
        entry = {"filename": name, "imgid": i, "split": split, "sentids": list(range(5 * i, 5 * i + 5)),
                 "sentences": [{"raw": c, "sentid": 5 * i + j, "tokens": c.split()} for j, c in enumerate(captions)]}
        if dataset == "coco":
            entry["filepath"] = folder
        images.append(entry)
    path = data / json_name
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_blip) -> dict[str, Path]:
    """A CLIP dual-encoder folder (encoder.json, model.pt, meta.json) and a T5 with a word-level tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from core.encoders import build_dual_encoder
    from core.io import atomic_write_json
    from retriever.generative.vocab import train_word_tokenizer

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    build_dual_encoder(TINY_CLIP).save(folder / "clip")
    atomic_write_json(folder / "clip" / "meta.json", {"stage": "dense", "step": 0})
    base = train_word_tokenizer([" ".join(["a", "an", "the", *WORDS])])
    base.save_pretrained(str(folder / "t5"))
    T5ForConditionalGeneration(T5Config(vocab_size=len(base), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                        num_decoder_layers=1, num_heads=2, decoder_start_token_id=0)
                               ).save_pretrained(str(folder / "t5"))
    return {"clip": folder / "clip", "t5": folder / "t5", "captioner": tiny_blip / "captioner", "itm": tiny_blip / "itm"}


def tiny_configs(dataset: str, out: Path) -> Path:
    """The dataset's step configs, each with the sizes of TINY_CONFIGS."""
    shutil.copytree(REPO / "configs" / "comgtir" / dataset, out)
    for step, values in TINY_CONFIGS.items():
        path = out / f"{step}.yaml"
        doc = yaml.safe_load(path.read_text())
        doc.update(values)
        path.write_text(yaml.safe_dump(doc))
    return out


def run_env(dataset: str, run_dir: Path, configs: Path, models: dict[str, Path]) -> dict[str, str]:
    return {**os.environ, "DATASET": dataset, "RUN_DIR": str(run_dir), "COMGTIR_CONFIGS": str(configs),
            "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "COMGTIR_CLIP": str(models["clip"]), "COMGTIR_T5": str(models["t5"]),
            "COMGTIR_CAPTIONER": str(models["captioner"]), "COMGTIR_ITM": str(models["itm"])}


def run_script(env: dict[str, str], script: str = "run.sh") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "comgtir" / script)], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory):
    """run(dataset) → the run folder of one `run.sh` over the dataset's fixture (each dataset run once)."""
    runs: dict[str, Path] = {}

    def run(dataset: str) -> Path:
        if dataset not in runs:
            root = tmp_path_factory.mktemp(dataset)
            write_dataset(root / "run" / "data", dataset)
            done = run_script(run_env(dataset, root / "run", tiny_configs(dataset, root / "configs"), tiny_models))
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            runs[dataset] = root / "run"
        return runs[dataset]
    return run


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_run_sh_runs_every_step_on_the_real_layout(dataset, finished_run):
    run_dir = finished_run(dataset)

    out = run_dir / "comgtir"
    for step_output in ["emb/image_test_ids.json", "emb/text_train_ids.json", "rqvae/checkpoint-best/model.pt",
                        "codes.json", "pseudo_queries.jsonl", "data/train.jsonl", "data/val.jsonl",
                        "stage1_seqid/checkpoint-best/model.pt", "stage2_setid/checkpoint-best/model.pt",
                        "stage3_unified/checkpoint-best/model.pt", "eval/seq-id/candidates.jsonl",
                        "eval/dual-id/candidates.jsonl", "eval/dual-id+dense-rerank/metrics.json",
                        "eval/dual-id+itm-rerank/metrics.json"]:
        assert (out / step_output).is_file(), f"{dataset}: no {step_output}"
    table = json.loads((run_dir / "results.json").read_text())["comgtir"]
    assert set(table) == set(ROWS)
    for row in ROWS[1:]:
        assert set(table[row]) >= {"R@1", "R@5", "R@10"}
    test_ids = json.loads((out / "emb" / "image_test_ids.json").read_text())
    queries = json.loads((out / "emb" / "text_test_ids.json").read_text())
    assert len(test_ids) == 4 and len(queries) == 20  # every test image and caption, embedded by the tiny CLIP

    train = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    in_train = {(r["imgid"], r["source"]) for r in train}
    trained = [i for i, (split, _) in enumerate(LAYOUT[dataset][2]) if split in ("train", "restval")]
    assert {(i, "caption") for i in trained} <= in_train  # restval captions are training data
    gallery = range(len(LAYOUT[dataset][2]))
    assert {(i, "pseudo") for i in gallery} <= in_train  # every image indexed, restval's too


def test_codes_of_another_rqvae_run_are_refused_before_decoding(finished_run, tmp_path, monkeypatch):
    """Identifiers of the same sizes from a second tokenizer run fit the vocabulary but name other images."""
    from core.errors import InputError
    from retriever.generative import evaluate
    from rqvae import generate_codes
    from rqvae import train as rqvae_train

    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = finished_run("coco") / "comgtir"
    sizes = TINY_CONFIGS["rqvae"]
    rqvae_train.main(["--config", str(REPO / "configs/comgtir/coco/rqvae.yaml"), "--emb_dir", str(out / "emb"),
                      "--output_dir", str(tmp_path / "rqvae"), "--seed", "1",
                      *[a for k, v in sizes.items() for a in (f"--{k}", str(v))]])
    generate_codes.main(["--checkpoint", str(tmp_path / "rqvae" / "checkpoint-best"), "--emb_dir", str(out / "emb"),
                         "--output", str(tmp_path / "codes.json")])
    with pytest.raises(InputError, match="codes.json.*rqvae_weights.*another RQ-VAE run"):
        evaluate.main(["--checkpoint", str(out / "stage3_unified" / "checkpoint-best"), "--codes",
                       str(tmp_path / "codes.json"), "--emb_dir", str(out / "emb"), "--output_dir",
                       str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()
    evaluate.main(["--checkpoint", str(out / "stage3_unified" / "checkpoint-best"), "--codes",  # its own codes run
                   str(out / "codes.json"), "--emb_dir", str(out / "emb"), "--output_dir", str(tmp_path / "eval"),
                   "--num_beams", "2", "--max_queries", "2"])


def test_a_dataset_without_configs_is_refused_before_any_work(tmp_path):
    env = {**os.environ, "DATASET": "nosuchset", "RUN_DIR": str(tmp_path / "run"), "PYTHON": "false"}
    done = run_script(env)
    assert done.returncode != 0
    assert "configs/comgtir/nosuchset" in done.stderr and "DATASET=nosuchset" in done.stderr
    assert "coco" in done.stderr  # the datasets there are
    assert not (tmp_path / "run").exists()


def test_a_dataset_json_without_a_test_split_is_refused_before_any_work(tiny_models, tmp_path):
    """prepare_emb's own command (as 01_prepare_emb.sh gives it), in process: the refusal comes before encoding."""
    from core.errors import InputError
    from retriever.dense import encode

    data_json = write_dataset(tmp_path / "data", "coco", drop_split="test")
    with pytest.raises(InputError, match=r"dataset_coco.json.*images\[\]\.split.*'test' is empty"):
        encode.main(["--config", str(REPO / "configs/comgtir/coco/prepare_emb.yaml"), "--checkpoint",
                     str(tiny_models["clip"]), "--data_json", str(data_json), "--image_root", str(tmp_path / "data" / "images"),
                     "--output_dir", str(tmp_path / "emb"), "--splits", "train,val,test"])
    assert not (tmp_path / "emb").exists()


@pytest.mark.parametrize("dataset", ["shapes", "coco", "flickr30k"])
def test_every_step_config_parses(dataset):
    from core.config import parse_config
    from retriever.dense.encode import EncodeConfig
    from retriever.generative.evaluate import EvaluateConfig
    from retriever.generative.named_encoder import NamedEncoderConfig
    from retriever.generative.prepare_dataset import PrepareDatasetConfig
    from retriever.generative.rerank import RerankConfig
    from retriever.generative.train import RetrieverTrainConfig
    from rqvae.generate_codes import GenerateCodesConfig
    from rqvae.train import RQVAETrainConfig
    from tools.generate_pseudo_query import PseudoQueryConfig

    steps = {"prepare_emb": EncodeConfig, "rqvae": RQVAETrainConfig, "generate_codes": GenerateCodesConfig,
             "pseudo_query": PseudoQueryConfig, "prepare_dataset": PrepareDatasetConfig,
             "retriever": RetrieverTrainConfig, "evaluate": EvaluateConfig, "rerank": RerankConfig}
    if dataset != "shapes":
        steps["encoder"] = NamedEncoderConfig
    folder = REPO / "configs" / "comgtir" / dataset
    assert {p.stem for p in folder.glob("*.yaml")} == set(steps)
    for file, cls in steps.items():
        parse_config(cls, ["--config", str(folder / f"{file}.yaml")])
    if dataset != "shapes":  # the paper's models and sizes
        assert parse_config(NamedEncoderConfig, ["--config", str(folder / "encoder.yaml")]).model == {
            "pretrained_name": "ViT-L-14-336-quickgelu", "pretrained": "openai"}
        rq = parse_config(RQVAETrainConfig, ["--config", str(folder / "rqvae.yaml")])
        assert (rq.levels, rq.codebook_size, rq.shared_codebook) == (4, 1024, True)
        assert parse_config(RetrieverTrainConfig, ["--config", str(folder / "retriever.yaml")]).model == {
            "pretrained": "t5-base"}
        assert parse_config(EvaluateConfig, ["--config", str(folder / "evaluate.yaml")]).num_beams == 50
        assert parse_config(RerankConfig, ["--config", str(folder / "rerank.yaml")]).depth == 20
