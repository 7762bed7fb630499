"""The tower-token cache (float16 memory maps written as made, rebuilt when what made it changes, refused when too
large), the live towers read through a DataLoader, and checkpoints that name their frozen towers instead of
holding them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from core.data import LoaderOptions
from core.encoders import build_dual_encoder, load_dual_encoder
from core.errors import InputError
from retriever.ret import cache, train
from retriever.ret.features import (CachedSource, ItemDataset, LiveSource, build_cache, cache_made_by, cache_shape,
                                    item_loader, resolve_features)
from retriever.ret.model import TOWERS_FILE, FrozenTowers, RetConfig, RetrieverConfig, RetrieverModel
from retriever.ret.retrieval import encode_items

SMALL = RetConfig(text_layers=[0, 1], vision_layers=[0, 1], hidden_size=32, head_dim=16, dropout=0.0,
                  attention_dropout=0.0)  # the test towers have 2 + 2 layers
NO_WORKERS = LoaderOptions(num_workers=0)


def _mini_split(world: Path, folder: Path, n_queries: int = 6) -> list[str]:
    """A few test queries and every test passage, as split 'mini', in the M2KR layout; returns the data options."""
    folder.mkdir(parents=True, exist_ok=True)
    queries = (world / "m2kr/shapes_test.jsonl").read_text().splitlines()[:n_queries]
    (folder / "q_mini.jsonl").write_text("\n".join(queries) + "\n")
    shutil.copy(world / "m2kr/shapes_passages_test.jsonl", folder / "p_mini.jsonl")
    return [f"--queries_file={folder}/q_{{split}}.jsonl", f"--passages_file={folder}/p_{{split}}.jsonl",
            "--image_root", str(world), "--splits", "mini"]


def _run_cache(encoder: Path, data: list[str], out: Path, *extra: str) -> dict:
    return cache.main(["--encoder", str(encoder), *data, "--output_dir", str(out), "--num_workers", "0", *extra])


def test_cache_is_float16_memmap_equal_to_live_towers(shapes_world, dense_checkpoint, tmp_path):
    data = _mini_split(shapes_world, tmp_path / "data")
    _run_cache(dense_checkpoint, data, tmp_path / "cache", "--batch_size", "16")  # several batches per file
    folder = tmp_path / "cache" / "mini"
    source = CachedSource(folder)
    assert isinstance(source.images, np.memmap) and isinstance(source.texts, np.memmap)
    assert source.images.dtype == np.float16 and source.texts.dtype == np.float16
    assert not list(folder.parent.glob(".*"))  # no temporary folder left behind
    # the estimate made before any work is what the files hold
    towers = FrozenTowers(load_dual_encoder(dense_checkpoint))
    shape = cache_shape(towers, json.loads((folder / "texts.json").read_text()),
                        json.loads((folder / "images.json").read_text()))
    on_disk = sum(f.stat().st_size for f in folder.glob("*.npy"))
    assert shape.nbytes <= on_disk < shape.nbytes + 3 * 4096

    # every row, read back by memory map, is what the towers give live (up to float16 rounding)
    live = LiveSource(towers, torch.device("cpu"))
    rows = [json.loads(line) for line in (tmp_path / "data/q_mini.jsonl").read_text().splitlines()]
    passage = json.loads((tmp_path / "data/p_mini.jsonl").read_text().splitlines()[0])
    items = [(r["question"], str(shapes_world / r["img_path"])) for r in rows] + [(passage["passage_content"], None)]
    cached = source.side(items, SMALL)
    loaded = next(iter(item_loader(live, ItemDataset(items, live.load), NO_WORKERS, batch_size=len(items))))
    fresh = live.side(loaded, SMALL)
    assert torch.equal(cached.image_mask, fresh.image_mask) and cached.image_mask[-1] == 0
    torch.testing.assert_close(cached.vision, fresh.vision * fresh.image_mask[:, None, None, None], atol=2e-2, rtol=1e-2)
    length = cached.text.shape[2]
    assert torch.equal(cached.text_attention, fresh.text_attention[:, :length])
    torch.testing.assert_close(cached.text, fresh.text[:, :, :length], atol=2e-2, rtol=1e-2)

    # and so are the cells' encodings of the items, whichever source they read
    model = RetrieverModel(RetrieverConfig(query=SMALL, passage=SMALL), towers.encoder).eval()
    a = encode_items(model.get_query_model(), source, items[:-1], batch_size=4, options=NO_WORKERS)
    b = encode_items(model.get_query_model(), live, items[:-1], batch_size=4, options=NO_WORKERS)
    np.testing.assert_allclose(a, b, atol=1e-2)


def test_cache_is_rebuilt_when_corpus_or_towers_change(shapes_world, dense_checkpoint, tmp_path):
    data = _mini_split(shapes_world, tmp_path / "data")
    assert set(_run_cache(dense_checkpoint, data, tmp_path / "cache")) == {"mini"}
    assert _run_cache(dense_checkpoint, data, tmp_path / "cache") == {}  # up to date: nothing rebuilt

    passages = (tmp_path / "data/p_mini.jsonl").read_text().splitlines()
    (tmp_path / "data/p_mini.jsonl").write_text("\n".join(passages[:-1]) + "\n")  # the corpus list changes
    assert set(_run_cache(dense_checkpoint, data, tmp_path / "cache")) == {"mini"}

    other = tmp_path / "other-towers"  # the same spec, one weight changed
    shutil.copytree(dense_checkpoint, other)
    encoder = load_dual_encoder(other)
    with torch.no_grad():
        encoder.clip.visual.conv1.weight[0, 0, 0, 0] += 0.5
    encoder.save(other)
    stale = CachedSource(tmp_path / "cache" / "mini")
    with pytest.raises(InputError, match="made by other towers"):  # what train/index/search/evaluate open
        CachedSource(tmp_path / "cache" / "mini", made_by=cache_made_by(FrozenTowers(encoder)))
    assert set(_run_cache(other, data, tmp_path / "cache")) == {"mini"}
    rebuilt = CachedSource(tmp_path / "cache" / "mini", made_by=cache_made_by(FrozenTowers(load_dual_encoder(other))))
    assert rebuilt.meta["towers"]["sha256"] != stale.meta["towers"]["sha256"]
    assert not np.array_equal(np.asarray(rebuilt.images[:4]), np.asarray(stale.images[:4]))


def test_too_large_cache_is_refused_before_work(shapes_world, dense_checkpoint, tmp_path):
    data = _mini_split(shapes_world, tmp_path / "data")
    with pytest.raises(InputError, match=r"would take 0\.\d+ GB .*over the limit of 0\.001 GB") as err:
        _run_cache(dense_checkpoint, data, tmp_path / "cache", "--max_cache_gb", "0.001")
    assert err.value.field == "max_cache_gb" and "--features live" in err.value.message
    assert not (tmp_path / "cache").exists()


def test_live_is_the_default_for_pretrained_towers_and_cache_for_the_shapes_towers():
    assert resolve_features("auto", {"pretrained_name": "ViT-L-14", "pretrained": "openai"}) == "live"
    assert resolve_features("auto", {"embed_dim": 64, "image_size": 64, "vision": {}, "text": {}}) == "cache"
    assert resolve_features("cache", {"pretrained_name": "ViT-L-14"}) == "cache"
    with pytest.raises(InputError, match="features"):
        resolve_features("sometimes", {})


def test_corrupt_image_names_the_file_and_leaves_no_cache(shapes_world, dense_checkpoint, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    towers = FrozenTowers(load_dual_encoder(dense_checkpoint))
    good = str(next((shapes_world / "images").glob("*.png")))
    with pytest.raises(InputError, match="cannot decode") as err:
        build_cache(towers, ["a text"], [good, str(bad)], tmp_path / "cache" / "x", cache_made_by(towers),
                    torch.device("cpu"), batch_size=1, options=NO_WORKERS)
    assert err.value.path == str(bad)
    assert not (tmp_path / "cache" / "x").exists() and not list((tmp_path / "cache").glob(".*"))


def test_live_training_reads_images_through_the_loader(shapes_world, dense_checkpoint, tmp_path):
    """features=live: no cache is read (cache_dir does not exist); the towers run on every batch."""
    data = [f"--queries_file={shapes_world}/m2kr/shapes_{{split}}.jsonl",
            f"--passages_file={shapes_world}/m2kr/shapes_passages_{{split}}.jsonl", "--image_root", str(shapes_world)]
    val = train.main(["--encoder", str(dense_checkpoint), *data, "--features", "live", "--cache_dir",
                      str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "run"), "--variants", "ret",
                      "--cell", '{"hidden_size": 32, "head_dim": 16, "dropout": 0.0, "attention_dropout": 0.0}',
                      "--layer_strategy", "all", "--batch_size", "16", "--max_steps", "2", "--max_val_queries", "8",
                      "--num_workers", "1", "--seed", "0"])
    assert set(val["ret"]) >= {"R@1", "R@5", "R@10"}
    assert RetrieverModel.from_pretrained(tmp_path / "run/ret/checkpoint-best") is not None


# -- checkpoints name their frozen towers ------------------------------------------------------------------------


TINY_NAMED = {  # an open_clip model config, registered under a name as ViT-L-14 is: a "pretrained" architecture
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def named_towers(tmp_path_factory) -> Path:
    """A dual-encoder folder of a named open_clip architecture with its own weights (a fine-tuned ViT-L's layout)."""
    folder = tmp_path_factory.mktemp("named")
    (folder / "ret-test-tiny.json").write_text(json.dumps(TINY_NAMED))
    open_clip.add_model_config(folder / "ret-test-tiny.json")
    torch.manual_seed(0)
    encoder = build_dual_encoder({"pretrained_name": "ret-test-tiny"})
    encoder.save(folder / "towers")
    return folder / "towers"


def test_checkpoint_names_pretrained_towers_instead_of_copying_them(named_towers, shapes_world, tmp_path):
    torch.manual_seed(0)
    model = RetrieverModel(RetrieverConfig(query=SMALL, passage=SMALL), load_dual_encoder(named_towers),
                           encoder_dir=named_towers)
    folder = model.save_pretrained(tmp_path / "ret")
    state = torch.load(folder / "model.pt", weights_only=True)
    assert all(k.startswith(("query.", "passage.")) for k in state)  # the cells only
    assert not any("clip" in k or "towers" in k for k in state)
    record = json.loads((folder / TOWERS_FILE).read_text())
    assert record["weights"] == "folder" and record["folder"] == str(named_towers.resolve())
    assert record["sha256"] == model.towers.fingerprint
    weights = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert weights < 1.2 * (folder / "model.pt").stat().st_size + 20_000  # no copy of the towers' weights
    assert not (folder / "encoder" / "model.pt").exists()

    again = RetrieverModel.from_pretrained(folder)
    docs = [["a red circle", str(next((shapes_world / "images").glob("*.png")))], ["only text", ""]]
    for a, b in ((model.get_query_model(), again.get_query_model()), (model.get_passage_model(), again.get_passage_model())):
        a.init_tokenizer_and_image_processor()
        b.init_tokenizer_and_image_processor()
        assert torch.allclose(a.get_ret_features(docs), b.get_ret_features(docs), atol=1e-6)

    changed = load_dual_encoder(named_towers)  # the named towers changed since: refused, not silently used
    with torch.no_grad():
        changed.clip.token_embedding.weight[0, 0] += 1.0
    changed.save(named_towers)
    with pytest.raises(InputError, match="not the ones this model was trained on") as err:
        RetrieverModel.from_pretrained(folder)
    assert err.value.path == str(folder / TOWERS_FILE)


def test_shapes_towers_travel_with_the_checkpoint(dense_checkpoint, tmp_path):
    """Towers built from a spec (trained here, a few MB) are copied, so the folder loads on its own; never in model.pt."""
    model = RetrieverModel(RetrieverConfig(query=SMALL, passage=SMALL), load_dual_encoder(dense_checkpoint))
    folder = model.save_pretrained(tmp_path / "ret")
    assert json.loads((folder / TOWERS_FILE).read_text())["weights"] == "copied"
    assert all(k.startswith(("query.", "passage.")) for k in torch.load(folder / "model.pt", weights_only=True))
    assert json.loads((folder / "retriever.json").read_text())["encoder"] == model.towers.encoder.spec
