"""Smoke run of bench/comgtir_latency.py on a toy corpus: the Python-trie reference decodes the same rankings as
the vectorised decoder, the IVF row carries its recall against flat search, and the JSON, CSV, Markdown and plot
are written (no timing is asserted)."""
from __future__ import annotations

import csv
import json

import pytest

from bench import comgtir_latency
from core.errors import InputError

TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4}


def test_bench_times_both_decoders_and_writes_its_files(tmp_path):
    out = tmp_path / "results"
    rows = comgtir_latency.main(["--sizes", "[200]", "--queries", "3", "--beams", "4", "--levels", "2",
                                 "--codebook_size", "8", "--dim", "16", "--repeats", "1", "--t5", json.dumps(TINY_T5),
                                 "--output_dir", str(out)])
    by_method = {r["method"]: r for r in rows}
    trie = by_method["python trie (no guidance)"]
    assert trie["top1_agree"] == 1.0 and trie["ranking_agree"] == 1.0
    assert trie["slowdown_vs_generative"] > 0
    ivf = by_method["dense-ivf"]
    assert 0.0 <= ivf["recall@1_vs_flat"] <= 1.0 and 0.0 <= ivf["recall@10_vs_flat"] <= 1.0
    report = json.loads((out / "comgtir_latency.json").read_text())
    assert len(report["rows"]) == 5
    assert len(list(csv.DictReader((out / "comgtir_latency.csv").open()))) == 5
    table = (out / "comgtir_latency.md").read_text()
    assert "python trie (no guidance)" in table and "recall@10_vs_flat" in table
    assert (out / "comgtir_latency.png").stat().st_size > 0


def test_an_unknown_vector_kind_fails_before_any_work(tmp_path):
    with pytest.raises(InputError, match="vectors"):
        comgtir_latency.main(["--vectors", "gaussian", "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
