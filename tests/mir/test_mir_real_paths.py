"""The MIR stage's real-model code paths with tiny randomly initialised models of the real classes (no hub):
the chat-VLM simulated user (Qwen2-VL multi-image, LLaVA side by side), a diffusers text-to-image pipeline
loaded by path, and the causal-LM refiner; and one loop run wiring all three together."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import InputError
from core.vlm import ChatVLM, needs_special_tokens, side_by_side
from mir.generator import DiffusersGenerator, load_generator
from mir.refiner import LLMRefiner
from mir.user import VLMUser, load_user
from tests.tiny_models import save_tiny_causal_lm, save_tiny_gemma3, save_tiny_llava, save_tiny_qwen2vl

RED, BLUE = Image.new("RGB", (64, 64), (220, 30, 30)), Image.new("RGB", (48, 64), (30, 30, 220))


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return save_tiny_qwen2vl(tmp_path_factory.mktemp("mir_vlm") / "tiny-qwen2-vl")


@pytest.fixture
def tiny_pipeline(tiny_sd_pipeline) -> Path:
    return tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("mir_lm") / "tiny-lm")


def test_vlm_user_compares_and_answers_from_pixels(tiny_vlm):
    user = load_user(f"vlm:{tiny_vlm}", max_new_tokens=5)
    assert isinstance(user, VLMUser) and user.model_id == f"vlm:{tiny_vlm}" and user.vlm.multi_image
    chat = user.vlm.chat_text(2, user.compare_prompt())
    assert chat.count("<|image_pad|>") == 2 and "second image is the image I am looking for" in chat
    said = user.compare([RED, BLUE, RED], [BLUE, RED, RED], seed=3)
    assert len(said) == 3 and all(isinstance(t, str) and t for t in said)
    assert said == user.compare([RED, BLUE, RED], [BLUE, RED, RED], seed=3)  # greedy: the same words again
    answers = user.answer([(0, 0), "what is in the middle?"], [BLUE, RED], seed=3)
    assert len(answers) == 2 and all(isinstance(t, str) and t for t in answers)
    assert answers == user.answer([(0, 0), "what is in the middle?"], [BLUE, RED], seed=3)
    assert user.compare([], []) == [] and user.answer([], []) == []
    with pytest.raises(ValueError):
        user.compare([RED], [BLUE, RED])


def test_sampling_vlm_is_fixed_by_its_seed_and_leaves_the_global_rng_alone(tiny_vlm):
    vlm = ChatVLM.from_pretrained(str(tiny_vlm), device=torch.device("cpu"), max_new_tokens=6, do_sample=True)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = vlm.chat([[RED]], ["what is in the middle?"], seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the seed's effect stays inside the call
    assert a == vlm.chat([[RED]], ["what is in the middle?"], seed=1)
    outs = {tuple(vlm.chat([[RED]], ["what is in the middle?"], seed=s)) for s in range(6)}
    assert len(outs) > 1  # sampling does use the seed


def test_one_image_vlm_sees_the_pair_side_by_side(tmp_path):
    canvas = side_by_side(RED, BLUE)
    assert canvas.size == (64 + 48, 64) and canvas.getpixel((100, 10)) == (30, 30, 220)
    user = load_user(f"vlm:{save_tiny_llava(tmp_path / 'llava')}", max_new_tokens=4)
    assert not user.vlm.multi_image and "left half" in user.compare_prompt()
    assert user.vlm.chat_text(1, user.compare_prompt()).count("<image>") == 1
    assert len(user.compare([RED, BLUE], [BLUE, RED], seed=0)) == 2
    with pytest.raises(ValueError, match="side_by_side"):
        user.vlm.chat([[RED, BLUE]], ["x"])


def test_gemma3_user_reads_bos_once(tmp_path):
    user = load_user(f"vlm:{save_tiny_gemma3(tmp_path / 'gemma3')}", max_new_tokens=4)
    assert type(user.vlm.model).__name__ == "Gemma3ForConditionalGeneration" and user.vlm.multi_image
    text = user.vlm.chat_text(2, user.compare_prompt())
    assert text.startswith("<bos><start_of_turn>user") and text.count("<start_of_image>") == 2
    tok = user.vlm.processor.tokenizer
    ids = user.vlm.processor(text=[text], images=[[RED, BLUE]], add_special_tokens=needs_special_tokens(tok, text))
    assert ids["input_ids"][0][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<start_of_turn>")]  # one BOS
    said = user.compare([RED, BLUE], [BLUE, RED], seed=0)
    assert len(said) == 2 and said == user.compare([RED, BLUE], [BLUE, RED], seed=0)
    assert len(user.answer([(1, 1)], [RED])) == 1


def test_load_user_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(InputError, match="vlm"):
        load_user(f"vlm:{tmp_path / 'missing'}")
    with pytest.raises(InputError):  # a plain folder is read as a modification-text generator: refused, no fallback
        load_user(str(tmp_path))


def test_diffusers_pipeline_by_path_is_seeded_per_image(tiny_pipeline):
    gen = load_generator(str(tiny_pipeline), steps=2, guidance=3.0, size=32, batch_size=2)
    assert isinstance(gen, DiffusersGenerator) and gen.model_id == str(tiny_pipeline)
    prompts = ["a red circle", "a blue square", "a red circle"]
    images = gen.generate(prompts, [1, 2, 1])
    assert len(images) == 3 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    px = [np.asarray(im).astype(int) for im in images]
    again = np.asarray(gen.generate(["a red circle"], [1])[0]).astype(int)
    assert np.array_equal(px[2], again)  # same (prompt, seed), same batch size: the same pixels
    # In another batch the pipeline's batched kernels may round differently: at most a grey level apart.
    assert np.abs(px[0] - again).max() <= 2 and np.abs(px[0] - px[2]).max() <= 2
    assert not np.array_equal(px[0], np.asarray(gen.generate(["a red circle"], [7])[0]))  # another seed
    assert not np.array_equal(px[0], px[1])


def test_load_generator_refuses_a_folder_that_is_no_pipeline(tmp_path):
    with pytest.raises(InputError, match="model_index.json"):
        load_generator(str(tmp_path), steps=2, guidance=1.0, size=32)


def test_llm_refiner_rewrites_with_the_chat_template(tiny_lm):
    refiner = LLMRefiner(str(tiny_lm), max_new_tokens=8)
    assert refiner.start("a red circle") == "a red circle"
    prompt = refiner.prompt("a red circle", "make it blue")
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    text, missed = refiner.refine("a red circle", "make it blue")
    assert isinstance(text, str) and text and missed == 0
    assert refiner.refine("a red circle", "make it blue") == (text, 0)  # greedy
    assert refiner.refine("a red circle", "  ") == ("a red circle", 0)  # no feedback keeps the query


def test_loop_runs_with_the_real_model_paths(shapes_world, dense_checkpoint, tiny_vlm, tiny_pipeline, tiny_lm, tmp_path):
    """genir and text-only rounds with the diffusers pipeline, the chat-VLM user and the LM refiner together."""
    from mir import genir, text_only
    from mir.records import RecordStore

    args = {"dialogues_json": shapes_world / "chatir" / "dialogues_test.json",
            "search_space_json": shapes_world / "chatir" / "search_space_test.json", "image_root": shapes_world,
            "dense_checkpoint": dense_checkpoint, "generator": tiny_pipeline, "user": f"vlm:{tiny_vlm}",
            "refiner": tiny_lm, "output_dir": tmp_path / "mir", "n_targets": 2, "rounds": 1, "gen_steps": 2,
            "gen_size": 32, "user_max_new_tokens": 5, "batch_size": 2, "seed": 0}
    argv = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    for entry in (genir, text_only):
        entry.main(argv)
    rows = RecordStore(tmp_path / "mir" / "genir" / "records.jsonl").rows
    assert len(rows) == 4 and all(r["user"] == f"vlm:{tiny_vlm}" and r["refiner"] == str(tiny_lm) for r in rows)
    assert all(r["feedback"] and isinstance(r["next_state"], str) for r in rows if r["round"] == 0)
    assert all((tmp_path / "mir" / r["image"]).is_file() for r in rows)
    t = RecordStore(tmp_path / "mir" / "text-only" / "records.jsonl").rows
    assert all(r["question"].startswith("what is in the") and r["feedback"] for r in t if r["round"] == 0)
