"""The streamed image path (core.data) and the on-disk embedding shards (core.io): images are opened per item,
a bad file is reported with its path and the split file that lists it, each rank gets its share of the epoch's
batches (a resumed epoch replays the rest), and embeddings come back by memory map from one or several shards."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import (EpochBatchSampler, ImageCaptionPairs, ImageDataset, LoaderOptions, epoch_batches,
                       load_karpathy, make_loader, verify_images)
from core.errors import InputError
from core.io import EmbeddingWriter, load_embeddings, open_embeddings, save_embeddings, ShardedRows
from retriever.dense import encode


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)


def _write_split(tmp_path, n=6, truncate=()):
    root = tmp_path / "images"
    root.mkdir()
    images = []
    for i in range(n):
        path = root / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(path)
        if i in truncate:
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
        images.append({"filename": f"{i}.png", "imgid": i, "split": "train", "sentences": [{"raw": f"c{i}"}]})
    (tmp_path / "data.json").write_text(json.dumps({"images": images}))
    return tmp_path / "data.json", root


@pytest.mark.parametrize("workers", [0, 1])
def test_images_come_in_order_from_the_loader(tmp_path, workers):
    js, root = _write_split(tmp_path)
    recs = load_karpathy(js, root, "train")
    loader = make_loader(ImageDataset([r.path for r in recs], _to_tensor), LoaderOptions(num_workers=workers),
                         batch_size=4)
    red = torch.cat([b[:, 0, 0, 0] for b in loader])
    assert red.tolist() == [i * 20 for i in range(6)]


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_png_is_reported_with_its_path_and_split_file(tmp_path, workers):
    js, root = _write_split(tmp_path, truncate=(3,))
    recs = load_karpathy(js, root, "train")
    loader = make_loader(ImageDataset([r.path for r in recs], _to_tensor, listed_in=js),
                         LoaderOptions(num_workers=workers), batch_size=2)
    with pytest.raises(InputError) as err:
        list(loader)
    assert str(root / "3.png") in str(err.value) and str(js) in str(err.value)
    assert "cannot decode" in str(err.value)


def test_verify_images_lists_every_bad_file(tmp_path):
    js, root = _write_split(tmp_path, truncate=(1, 4))
    recs = load_karpathy(js, root, "train")
    with pytest.raises(InputError, match="2 of 6 images cannot be decoded") as err:
        verify_images([r.path for r in recs], js, LoaderOptions(num_workers=1))
    assert "1.png" in str(err.value) and "4.png" in str(err.value) and "0.png" not in str(err.value)
    verify_images([r.path for r in recs if r.imgid not in (1, 4)], js)  # the good ones pass


def test_ranks_share_each_global_batch_and_a_resumed_epoch_replays_the_rest():
    n, batch, seed, epoch = 50, 8, 3, 2
    expected = epoch_batches(n, batch, seed, epoch)
    ranks = [EpochBatchSampler(n, batch, seed, rank, 2) for rank in range(2)]
    for s in ranks:
        s.set_epoch(epoch)
    for global_batch, a, b in zip(expected, *ranks):
        assert [i for _, i in a + b] == list(global_batch)  # rank 0 then rank 1: the global batch, in order
        assert {e for e, _ in a + b} == {epoch}
    resumed = EpochBatchSampler(n, batch, seed)
    resumed.set_epoch(epoch, skip=4)
    assert [[i for _, i in b] for b in resumed] == [list(b) for b in expected[4:]]
    assert len(resumed) == len(expected) - 4


def test_caption_choice_follows_the_epoch_carried_with_the_index(shapes_world):
    recs = load_karpathy(shapes_world / "dataset_shapes.json", shapes_world / "images", "train")[:20]
    pairs = ImageCaptionPairs(recs, _to_tensor, seed=0)
    first = [pairs[(0, i)][1] for i in range(20)]
    assert first == [pairs.caption(0, i) for i in range(20)]
    assert first != [pairs[(1, i)][1] for i in range(20)]  # another epoch, other captions


def test_one_shard_reads_back_as_a_float16_memory_map(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    save_embeddings(tmp_path / "e", x, list(range(10)), made_by={"model": "m"})
    view, ids = open_embeddings(tmp_path / "e")
    assert isinstance(view, np.memmap) and view.dtype == np.float16 and ids == list(range(10))
    np.testing.assert_allclose(load_embeddings(tmp_path / "e")[0], x, atol=2e-3)


def test_rank_shards_read_back_as_one_matrix_without_joining(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    writers = [EmbeddingWriter(tmp_path / "e", n, 4, rank, 2) for rank, n in enumerate((6, 4))]
    writers[0].write(x[:3])
    writers[0].write(x[3:6])
    writers[1].write(x[6:])
    writers[1].close(list(range(6, 10)))
    writers[0].close(list(range(6)))
    view, ids = open_embeddings(tmp_path / "e")
    assert isinstance(view, ShardedRows) and view.shape == (10, 4) and ids == list(range(10))
    np.testing.assert_array_equal(view[[9, 0, 6, 5]], x[[9, 0, 6, 5]])
    np.testing.assert_array_equal(view[4:8], x[4:8])
    np.testing.assert_array_equal(np.concatenate(list(view.blocks(rows=3))), x)


def test_a_rewrite_unlists_the_earlier_shards_until_every_rank_has_closed(tmp_path):
    x = np.ones((4, 4), np.float32)
    for rank in (0, 1):
        writer = EmbeddingWriter(tmp_path / "e", 2, 4, rank, 2)
        writer.write(x[:2])
        writer.close([rank * 2, rank * 2 + 1], made_by={"model": "old"})
    EmbeddingWriter(tmp_path / "e", 2, 4, 0, 2)  # a new run starts writing
    with pytest.raises(InputError, match="embedding file not found"):
        open_embeddings(tmp_path / "e")


def test_unfinished_shard_is_never_read(tmp_path):
    writer = EmbeddingWriter(tmp_path / "e", 5, 4)
    writer.write(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="2 rows written, 5 expected"):
        writer.close(list(range(5)))
    with pytest.raises(InputError, match="embedding file not found"):
        open_embeddings(tmp_path / "e")


def test_encode_writes_float16_shards_and_keeps_a_split_made_by_the_same_model(dense_run, shapes_world, tmp_path):
    args = ["--checkpoint", str(dense_run / "checkpoint-best"), "--data_json", str(shapes_world / "dataset_shapes.json"),
            "--image_root", str(shapes_world / "images"), "--splits", "[test]", "--output_dir", str(tmp_path / "emb")]
    encode.main(args)
    view, ids = open_embeddings(tmp_path / "emb" / "image_test")
    assert view.dtype == np.float16 and len(ids) == 120
    reference, ref_ids = load_embeddings(dense_run / "emb" / "image_test")
    np.testing.assert_allclose(np.asarray(view, np.float32), reference, atol=2e-3)
    stamp = (tmp_path / "emb" / "image_test.npy").stat().st_mtime_ns
    encode.main(args)
    assert (tmp_path / "emb" / "image_test.npy").stat().st_mtime_ns == stamp  # kept, not encoded again
