"""ChatIR layout: the loader on a fixture in ChatIR's exact format, its errors, the protocol, and the Shapes task files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from core.errors import InputError
from mir.chatir import chatir_query, dialogue_rounds, load_chatir


def write_chatir_fixture(root: Path) -> tuple[Path, Path]:
    """Three COCO-style images, ChatIR's Search_Space_val_50k.json and VisDial_v1.0_queries_val.json layouts."""
    (root / "unlabeled2017").mkdir(parents=True)
    names = [f"unlabeled2017/{i:012d}.jpg" for i in (139, 285, 632)]
    for i, n in enumerate(names):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / n)
    space = root / "Search_Space_val_50k.json"
    space.write_text(json.dumps(names))
    dialogs = root / "VisDial_v1.0_queries_val.json"
    dialogs.write_text(json.dumps([
        {"img": names[1], "dialog": ["a man riding a bike", "is it sunny? yes", "any cars? no"]},
        {"img": names[0], "dialog": ["a cat on a couch", "what colour is the cat? black", "is it asleep? yes"]},
    ]))
    return dialogs, space


def test_loads_chatir_layout_and_protocol(tmp_path):
    dialogs, space = write_chatir_fixture(tmp_path)
    data = load_chatir(dialogs, space, tmp_path)
    assert len(data.search_space) == 3 and data.dialogues[0].img == "unlabeled2017/000000000285.jpg"
    assert chatir_query(data.dialogues[0].dialog, 0) == "a man riding a bike"
    assert chatir_query(data.dialogues[0].dialog, 2) == "a man riding a bike, is it sunny? yes, any cars? no"
    assert dialogue_rounds(data.dialogues) == 2
    with pytest.raises(InputError):
        chatir_query(data.dialogues[0].dialog, 3)


def test_bad_chatir_files_name_file_and_field(tmp_path):
    dialogs, space = write_chatir_fixture(tmp_path)
    rows = json.loads(dialogs.read_text())
    rows[1]["img"] = "unlabeled2017/missing.jpg"
    dialogs.write_text(json.dumps(rows))
    with pytest.raises(InputError, match=r"\[1\]\.img"):
        load_chatir(dialogs, space, tmp_path)
    rows[1] = {"img": rows[0]["img"], "dialog": []}
    dialogs.write_text(json.dumps(rows))
    with pytest.raises(InputError, match=r"\[1\]\.dialog"):
        load_chatir(dialogs, space, tmp_path)
    (tmp_path / "unlabeled2017" / "000000000632.jpg").unlink()
    rows[1]["dialog"] = ["x"]
    dialogs.write_text(json.dumps(rows))
    with pytest.raises(InputError, match="image file not found"):
        load_chatir(dialogs, space, tmp_path)


def test_shapes_world_writes_vague_first_queries(shapes_world):
    for split in ("val", "test"):
        data = load_chatir(shapes_world / "chatir" / f"dialogues_{split}.json",
                           shapes_world / "chatir" / f"search_space_{split}.json", shapes_world)
        assert len(data.dialogues) == len(data.search_space)
        assert all(len(d.dialog) == 1 for d in data.dialogues)
    scenes = {r["filename"]: r["scene"] for r in json.loads((shapes_world / "scenes.json").read_text())["images"]}
    # Vague: one object named, never all of size, colour and position together.
    from mir.refiner import parse_caption

    for d in data.dialogues:
        state = parse_caption(d.dialog[0])
        assert len(state.objects) == 1
        o = state.objects[0]
        assert sum(v is not None for v in (o.size, o.colour, o.cell)) <= 2
        assert o.shape in {obj["shape"] for obj in scenes[Path(d.img).name]["objects"]}
