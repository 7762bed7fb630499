"""GenIR's own loop (`loop: genir`) end to end with tiny random models of the real classes: a Gemma-3 chat VLM that
plays every role of the user, loaded once, a Stable Diffusion pipeline loaded by path and a BLIP retriever (no
trained encoder needed); the split loop sharing the VLM with its refiner; and the bad inputs the real config can
meet (a model that is no chat VLM, a pipeline that returns another image size than asked)."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.errors import InputError
from mir.records import RecordStore
from tests.tiny_models import save_tiny_causal_lm, save_tiny_gemma3, save_tiny_qwen2vl


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory) -> Path:
    return save_tiny_gemma3(tmp_path_factory.mktemp("genir_vlm") / "tiny-gemma3")


@pytest.fixture
def tiny_sd(tiny_sd_pipeline) -> Path:
    return tiny_sd_pipeline


@pytest.fixture
def load_counts(monkeypatch) -> dict[str, int]:
    """How often each transformers class loads weights during the test."""
    import transformers

    counts = {"vlm": 0, "causal_lm": 0}
    for key, cls in (("vlm", transformers.AutoModelForImageTextToText), ("causal_lm", transformers.AutoModelForCausalLM)):
        real = cls.from_pretrained.__func__

        def counted(klass, *args, _real=real, _key=key, **kwargs):
            counts[_key] += 1
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(counted))
    return counts


def loop_argv(shapes_world: Path, retriever: Path, out: Path, **overrides) -> list[str]:
    args = {"dialogues_json": shapes_world / "chatir" / "dialogues_test.json",
            "search_space_json": shapes_world / "chatir" / "search_space_test.json", "image_root": shapes_world,
            "dense_checkpoint": retriever, "output_dir": out, "n_targets": 2, "rounds": 1, "gen_steps": 2,
            "gen_size": 32, "user_max_new_tokens": 4, "caption_max_new_tokens": 6, "batch_size": 2, "seed": 0,
            "loop": "genir", "refiner": "user", **overrides}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def test_genir_loop_captions_compares_and_rewrites_with_one_vlm(shapes_world, tiny_blip_retrieval, tiny_gemma, tiny_sd,
                                                                load_counts, tmp_path, monkeypatch):
    from mir import genir, text_only
    from mir import vlm_roles

    seen: list[tuple[str, int]] = []  # (role, images per item): which role ran and what it was shown
    for role in ("caption", "compare", "critique", "rewrite"):
        real = getattr(vlm_roles.GenIRRoles, role)

        def spy(self, targets, *args, _real=real, _role=role, **kwargs):
            seen.append((_role, len(targets)))
            return _real(self, targets, *args, **kwargs)

        monkeypatch.setattr(vlm_roles.GenIRRoles, role, spy)
    out = tmp_path / "mir"
    genir.main(loop_argv(shapes_world, tiny_blip_retrieval, out, user=f"vlm:{tiny_gemma}", generator=tiny_sd))
    assert load_counts == {"vlm": 1, "causal_lm": 0}  # one VLM for caption, comparison and rewrite
    assert seen == [("caption", 2), ("compare", 2), ("rewrite", 2)]  # batched over both targets
    rows = RecordStore(out / "genir" / "records.jsonl").rows
    assert len(rows) == 4 and all(r["loop"] == "genir" and r["refiner"] == f"vlm:{tiny_gemma}" for r in rows)
    first, second = ({r["target"]: r for r in rows if r["round"] == k} for k in (0, 1))
    captions = json.loads((out / "genir" / "captions.json").read_text())
    for c in captions:
        # Round 0 searches with the VLM's caption, round 1 with its rewrite: the caption is the query.
        assert first[c["img"]]["query"] == c["captions"][0] and second[c["img"]]["query"] == c["captions"][1]
        assert first[c["img"]]["next_state"] == c["captions"][1] and first[c["img"]]["feedback"]
        assert (out / first[c["img"]]["image"]).is_file()
    dialogues = json.loads((shapes_world / "chatir" / "dialogues_test.json").read_text())
    assert all(c["captions"][0] != d["dialog"][0] for c, d in zip(captions, dialogues))  # not the dataset's utterance

    seen.clear()
    text_only.main(loop_argv(shapes_world, tiny_blip_retrieval, out, user=f"vlm:{tiny_gemma}", text_feedback="critic"))
    assert load_counts == {"vlm": 2, "causal_lm": 0}  # a new run loads it once more, no refiner copy
    assert seen == [("caption", 2), ("critique", 2), ("rewrite", 2)]
    t = RecordStore(out / "text-only" / "records.jsonl").rows
    assert all("question" not in r and r["feedback"] for r in t if r["round"] == 0)


def test_genir_prediction_shows_the_top1_even_once_found(shapes_world, tiny_blip_retrieval, tiny_gemma, load_counts,
                                                         tmp_path, monkeypatch):
    from mir import prediction
    from mir.retrieval import DenseSearcher

    real = DenseSearcher.rank_texts

    def target_first(self, queries, targets, topk=2):  # the first target ranks first: found at round 0
        ranks, tops = real(self, queries, targets, topk)
        tops[0] = [targets[0]] + [t for t in tops[0] if t != targets[0]][: topk - 1]
        return ranks, tops

    monkeypatch.setattr(DenseSearcher, "rank_texts", target_first)
    out = tmp_path / "mir"
    prediction.main(loop_argv(shapes_world, tiny_blip_retrieval, out, user=f"vlm:{tiny_gemma}"))
    assert load_counts == {"vlm": 1, "causal_lm": 0}
    rows = [r for r in RecordStore(out / "prediction" / "records.jsonl").rows if r["round"] == 0]
    assert rows[0]["shown"] == rows[0]["target"] and rows[0]["feedback"]  # GenIR shows the top-1, whatever it is
    assert rows[1]["shown"] != rows[1]["target"]


def test_split_loop_refiner_shares_the_users_vlm_and_reads_the_question(shapes_world, tiny_blip_retrieval, tiny_gemma,
                                                                       load_counts, tmp_path, monkeypatch):
    from mir import text_only
    from mir.refiner import LLMRefiner

    prompts: list[str] = []
    real = LLMRefiner.prompt
    monkeypatch.setattr(LLMRefiner, "prompt", lambda self, *a: prompts.append(real(self, *a)) or prompts[-1])
    out = tmp_path / "mir"
    text_only.main(loop_argv(shapes_world, tiny_blip_retrieval, out, user=f"vlm:{tiny_gemma}", loop="split",
                             refiner=tiny_gemma))
    assert load_counts == {"vlm": 1, "causal_lm": 0}  # the refiner rewrites with the user's VLM, no second copy
    rows = [r for r in RecordStore(out / "text-only" / "records.jsonl").rows if r["round"] == 0]
    assert len(prompts) == 2 and all(r["question"] in p and r["feedback"] in p for r, p in zip(rows, prompts))


def test_genir_loop_settings_are_checked_before_anything_loads(shapes_world, tiny_blip_retrieval, tmp_path, load_counts):
    from mir import genir, text_only

    base = dict(shapes_world=shapes_world, retriever=tiny_blip_retrieval, out=tmp_path / "mir")
    with pytest.raises(InputError, match="user"):
        genir.main(loop_argv(**base, user="runs/some/mtst"))
    with pytest.raises(InputError, match="refiner"):
        genir.main(loop_argv(**base, user="vlm:org/vlm", refiner="shapes"))
    with pytest.raises(InputError, match="text_feedback"):
        text_only.main(loop_argv(**base, user="vlm:org/vlm", loop="split", refiner="shapes", text_feedback="critic"))
    assert load_counts == {"vlm": 0, "causal_lm": 0}


def test_a_model_that_is_no_chat_vlm_is_refused_before_its_weights_load(tmp_path, load_counts):
    from core.vlm import ChatVLM

    with pytest.raises(InputError, match="model_type") as err:
        ChatVLM.from_pretrained(str(save_tiny_causal_lm(tmp_path / "llama")))  # a text-only LM
    assert "llama" in str(err.value) and "vision-language" in str(err.value)
    folder = save_tiny_qwen2vl(tmp_path / "qwen-base")
    for name in ("chat_template.jinja", "chat_template.json"):  # a base VLM without a chat template
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "processor_config.json").read_text()) if (folder / "processor_config.json").is_file() else None
    if config is not None and "chat_template" in config:
        del config["chat_template"]
        (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="chat_template") as err:
        ChatVLM.from_pretrained(str(folder))
    assert str(folder) in str(err.value)
    assert load_counts["vlm"] == 0


class _FixedSizePipe:
    """Stands in for a diffusers pipeline that returns 24 px images whatever size it is asked for."""

    def __init__(self):
        self.calls: list[str] = []

    def to(self, device):
        self.calls.append("to")
        return self

    def enable_model_cpu_offload(self, device=None):
        self.calls.append(f"offload:{device}")

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, height, width, **kwargs):
        return types.SimpleNamespace(images=[Image.new("RGB", (24, 24)) for _ in prompt])


def test_a_generator_that_returns_another_size_is_an_input_error():
    from mir.generator import DiffusersGenerator

    gen = DiffusersGenerator("org/fixed-size", steps=1, size=32, device=torch.device("cpu"), pipeline=_FixedSizePipe())
    with pytest.raises(InputError, match="gen_size") as err:
        gen.generate(["a red circle"], [0])
    assert "org/fixed-size" in str(err.value) and "32x32" in str(err.value) and "24x24" in str(err.value)
    gen.size = 24
    assert gen.generate(["a red circle"], [0])[0].size == (24, 24)


def test_cpu_offload_replaces_the_move_to_the_card_and_needs_cuda():
    from mir.generator import DiffusersGenerator

    pipe = _FixedSizePipe()
    DiffusersGenerator("org/sd", device=torch.device("cuda"), pipeline=pipe, cpu_offload=True)
    assert pipe.calls == ["offload:cuda"]  # never moved whole to the card
    pipe = _FixedSizePipe()
    DiffusersGenerator("org/sd", device=torch.device("cuda"), pipeline=pipe)
    assert pipe.calls == ["to"]
    with pytest.raises(InputError, match="gen_cpu_offload"):
        DiffusersGenerator("org/sd", device=torch.device("cpu"), pipeline=_FixedSizePipe(), cpu_offload=True)


def test_coco_config_runs_genir_loop_and_shapes_keeps_the_split_loop():
    from core.config import parse_config
    from mir.loop import MIRConfig

    root = Path(__file__).parents[2] / "configs" / "mir"
    coco = parse_config(MIRConfig, ["--config", str(root / "coco_genir.yaml")])
    shapes = parse_config(MIRConfig, ["--config", str(root / "shapes.yaml")])
    assert (coco.loop, coco.text_feedback, coco.gen_cpu_offload) == ("genir", "critic", False)
    assert coco.refiner == coco.user.removeprefix("vlm:")  # one model for every role
    assert (shapes.loop, shapes.text_feedback) == ("split", "questions")
