"""ReT's model: the user-facing API, save/load, the gates' masking, MaxSim and the loss against brute force."""
from __future__ import annotations

import json

import pytest
import torch

from core.encoders import load_dual_encoder
from core.errors import InputError
from retriever.ret.model import (RetConfig, RetrieverConfig, RetrieverModel, SideInputs, contrastive_loss, maxsim)
from retriever.ret.retrieval import exact_topk, maxsim_scores

SMALL = RetConfig(text_layers=[0, 1], vision_layers=[0, 1], hidden_size=32, head_dim=16, dropout=0.0,
                  attention_dropout=0.0)  # the test towers have 2 + 2 layers


@pytest.fixture(scope="module")
def retriever(dense_checkpoint):
    torch.manual_seed(0)
    encoder = load_dual_encoder(dense_checkpoint)
    return RetrieverModel(RetrieverConfig(encoder=encoder.spec, query=SMALL, passage=SMALL), encoder).eval()


def _docs(world):
    rows = [json.loads(line) for line in (world / "m2kr/shapes_test.jsonl").read_text().splitlines()[:3]]
    return [[r["question"], str(world / r["img_path"])] for r in rows]


def test_get_ret_features_shape_and_norm(retriever, shapes_world):
    q = retriever.get_query_model()
    q.init_tokenizer_and_image_processor()
    docs = _docs(shapes_world) + [["only text", ""], ["", str(shapes_world / "images/test_00000.png")]]
    feats = q.get_ret_features(docs)
    assert feats.shape == (5, 32, 128)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(5, 32), atol=1e-5)
    p = retriever.get_passage_model()
    p.init_tokenizer_and_image_processor()
    assert not torch.allclose(p.get_ret_features(docs[:1]), feats[:1])  # separate cells per side


def test_missing_image_is_one_clear_error(retriever):
    q = retriever.get_query_model()
    q.init_tokenizer_and_image_processor()
    with pytest.raises(InputError) as err:
        q.get_ret_features([["a question", "/nowhere/missing.png"]])
    assert err.value.path == "/nowhere/missing.png" and "image" in err.value.field


def test_masked_modality_has_no_effect(retriever, shapes_world):
    """R4-R6: with m_V = 0 the image cannot change the state (the reference masks the black image this way)."""
    q = retriever.get_query_model()
    q.init_tokenizer_and_image_processor()
    docs = _docs(shapes_world)
    inputs = q.prepare([[docs[0][0], docs[0][1]], [docs[0][0], docs[1][1]]])
    inputs.image_mask = torch.zeros(2)
    with torch.no_grad():
        out = q.encode(inputs)
    assert torch.allclose(out[0], out[1], atol=1e-5)
    inputs.image_mask = torch.ones(2)
    with torch.no_grad():
        out = q.encode(inputs)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_save_and_from_pretrained_round_trip(retriever, shapes_world, tmp_path):
    folder = retriever.save_pretrained(tmp_path / "ret")
    again = RetrieverModel.from_pretrained(folder)
    docs = _docs(shapes_world)
    for a, b in ((retriever.get_query_model(), again.get_query_model()),
                 (retriever.get_passage_model(), again.get_passage_model())):
        a.init_tokenizer_and_image_processor()
        b.init_tokenizer_and_image_processor()
        assert torch.allclose(a.get_ret_features(docs), b.get_ret_features(docs), atol=1e-6)
    with pytest.raises(InputError):
        RetrieverModel.from_pretrained(tmp_path / "nothing")


def test_maxsim_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(3, 4, 8, generator=g), torch.randn(5, 6, 8, generator=g)
    brute = torch.tensor([[sum(max(float(q[a, i] @ p[b, j]) for j in range(6)) for i in range(4)) for b in range(5)]
                          for a in range(3)])
    assert torch.allclose(maxsim(q, p), brute, atol=1e-4)
    assert torch.allclose(maxsim_scores(q, p), brute, atol=1e-4)
    scores, rows = exact_topk(q.numpy(), p.numpy(), 2, block=2)
    assert (rows == brute.topk(2, dim=1).indices.numpy()).all()


def test_contrastive_loss_by_hand():
    q = torch.nn.functional.normalize(torch.randn(4, 2, 8), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(4, 3, 8), dim=-1)
    expected = 0.5 * (torch.nn.functional.cross_entropy(maxsim(q, p), torch.arange(4)) +
                      torch.nn.functional.cross_entropy(maxsim(p, q), torch.arange(4)))
    assert torch.allclose(contrastive_loss(q, p), expected)
    # a duplicated positive id shares the target mass instead of becoming a negative
    dup = contrastive_loss(q, q, labels=[0, 0, 1, 2])
    assert torch.isfinite(dup)


def test_single_side_inputs_allow_absent_modality(retriever):
    q = retriever.get_query_model()
    b = 2
    text = torch.randn(b, 2, 5, q.towers.text_width)
    inputs = SideInputs(text, torch.ones(b, 5, dtype=torch.bool), None, torch.ones(b), torch.zeros(b))
    with torch.no_grad():
        assert q.encode(inputs).shape == (b, 32, 128)
