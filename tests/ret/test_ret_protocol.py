"""The M2KR protocol against hand computations: Recall@K over positive ids, Pseudo Recall@K over answer strings
(string and dict answers, as M2KR and ReT-M2KR write them), a positive missing from the corpus counted as a miss."""
from __future__ import annotations

import json

import pytest

from core.errors import InputError
from retriever.ret.data import load_m2kr
from retriever.ret.model import RetrieverConfig
from retriever.ret.protocol import M2KR_KS, contains_answer, m2kr_metrics, pseudo_recall

PASSAGES = [
    {"passage_id": "p1", "passage_text": "A racket sport: TENNIS is played on a court.", "passage_image_path": None},
    {"passage_id": "p2", "passage_text": "The tower opened in 1889 in Paris's neighbour city.", "passage_image_path": None},
    {"passage_id": "p3", "passage_text": "Nothing relevant here.", "passage_image_path": None},
]
QUERIES = [  # ReT-M2KR spelling: data_id, passage_id (the positives), answer
    {"data_id": "q1", "question": "What sport?", "passage_id": ["p2"], "answer": ["Tennis"]},
    {"data_id": "q2", "question": "When did it open?", "passage_id": "p3",
     "answer": [{"wikidata": 1889, "range": [1880, 1890]}]},
    {"data_id": "q3", "question": "Which city?", "passage_id": ["p9"], "answer": ["  Rome "]},  # p9 is not in the corpus
]
RANKED = [["p1", "p2", "p3"], ["p3", "p1", "p2"], ["p2", "p3", "p1"]]


@pytest.fixture
def split(tmp_path):
    q, p = tmp_path / "q.jsonl", tmp_path / "p.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in QUERIES))
    p.write_text("".join(json.dumps(r) + "\n" for r in PASSAGES))
    return load_m2kr(q, p, tmp_path)


def test_recall_and_pseudo_recall_by_hand(split):
    assert [x.answers for x in split.queries] == [("Tennis",), ("1889",), ("  Rome ",)]
    assert split.missing_positives == 1
    metrics = m2kr_metrics(RANKED, split.queries, {x.passage_id: x.text for x in split.passages}, ks=(1, 2, 3))
    # Recall: q1's positive p2 is 2nd, q2's p3 is 1st, q3's p9 is never retrieved.
    assert metrics["R@1"] == pytest.approx(100 / 3) and metrics["R@2"] == pytest.approx(200 / 3)
    assert metrics["R@3"] == pytest.approx(200 / 3)
    # Pseudo: q1 "tennis" is in p1 (1st, case-insensitive); q2's dict answer "1889" is in p2 (3rd); q3 "rome" nowhere
    # (its missing positive changes nothing here).
    assert metrics["PR@1"] == pytest.approx(100 / 3) and metrics["PR@2"] == pytest.approx(100 / 3)
    assert metrics["PR@3"] == pytest.approx(200 / 3)


def test_pseudo_recall_matches_the_reference_normalisation():
    assert contains_answer("The EIFFEL tower", ["  eiffel "])  # stripped, lower-cased, substring
    assert contains_answer("photosynthesis", ["synthesis"])  # substring, not whole words, as the reference
    assert not contains_answer("Eiffel", ["eiffel tower"])
    scores = pseudo_recall([["x", "y answer"], ["no"]], [["Answer"], []], ks=(1, 2))
    assert scores == {"PR@1": 0.0, "PR@2": 50.0}  # a query without answers is a miss


def test_no_answers_means_no_pseudo_recall(split):
    bare = [type(q)(q.question_id, q.question, q.instruction, q.image, q.positives) for q in split.queries]
    metrics = m2kr_metrics(RANKED, bare, {x.passage_id: x.text for x in split.passages})
    assert set(metrics) == {f"R@{k}" for k in M2KR_KS} | {f"R@{k} 95% CI" for k in (1, 10)}


def test_dict_answer_without_wikidata_is_one_clear_error(tmp_path):
    q, p = tmp_path / "q.jsonl", tmp_path / "p.jsonl"
    q.write_text(json.dumps({**QUERIES[1], "answer": [{"range": [1, 2]}]}) + "\n")
    p.write_text("".join(json.dumps(r) + "\n" for r in PASSAGES))
    with pytest.raises(InputError) as err:
        load_m2kr(q, p, tmp_path)
    assert err.value.path == str(q) and "answers" in err.value.field and "wikidata" in err.value.message


def test_use_instruction_travels_with_the_retriever_config():
    cfg = RetrieverConfig(use_instruction=True)
    assert RetrieverConfig.from_dict(cfg.to_dict()).use_instruction is True
    assert RetrieverConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "use_instruction"}).use_instruction is False
