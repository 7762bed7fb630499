import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import core

from core.config import (build_config, dataclass_keys, load_saved_config, nested_keys, parse_config,
                         save_config)
from core.errors import InputError


@dataclass
class Demo:
    name: str = "x"
    steps: int = 10
    lr: float = 1e-3
    resume: bool = False
    splits: list[str] = field(default_factory=lambda: ["train"])
    model: dict = field(default_factory=dict)


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nlr: 0.5\nmodel: {width: 8}\n")
    cfg = parse_config(Demo, ["--config", str(path), "--steps", "7", "--resume", "--splits", "train,val"])
    assert (cfg.steps, cfg.lr, cfg.resume, cfg.splits, cfg.model) == (7, 0.5, True, ["train", "val"], {"width": 8})


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 5\n")
    with pytest.raises(InputError, match=r"c\.yaml: stepz: unknown key"):
        parse_config(Demo, ["--config", str(path)])


def test_unknown_option_on_command_line():
    with pytest.raises(InputError, match="command line: stepz: unknown option"):
        parse_config(Demo, ["--stepz", "3"])


def test_wrong_type_is_an_error():
    with pytest.raises(InputError, match="steps: must be a int"):
        parse_config(Demo, ["--steps", "many"])


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        parse_config(Demo, ["--config", str(tmp_path / "none.yaml")])


def test_saved_config_round_trips(tmp_path):
    cfg = build_config(Demo, {"steps": 3, "model": {"a": 1}})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_saved_config(Demo, tmp_path / "config.yaml") == cfg


def test_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\n")
    assert parse_config(Demo, ["--config", str(path)]).lr == 1e-5
    assert parse_config(Demo, ["--lr", "2e-3"]).lr == 2e-3


def test_str_option_takes_the_command_line_text_as_it_is():
    # YAML would read "" as null and "0" as a number; a str setting keeps the text
    assert parse_config(Demo, ["--name", ""]).name == ""
    assert parse_config(Demo, ["--name", "0"]).name == "0"


def test_a_saved_config_is_written_with_what_made_the_run(tmp_path):
    save_config(build_config(Demo, {}), tmp_path / "config.yaml")
    made = json.loads((tmp_path / "provenance.json").read_text())
    assert made["libraries"]["torch"] == torch.__version__.split("+")[0]
    assert made["command"] == [sys.executable, *sys.argv]
    if made["git"]["commit"] is not None:  # a git checkout (CI's is one)
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(core.__file__).parent).stdout.strip()
        assert made["git"]["commit"] == head and isinstance(made["git"]["dirty"], bool)


@dataclass
class Commented:
    # the optimiser's peak learning rate,
    # reached after the warmup
    lr: float = 1e-3
    steps: int = 10  # optimizer steps
    bare: int = 0


@dataclass
class CommentedMore(Commented):
    steps: int = 20  # steps of this stage


def test_help_prints_each_fields_comment_from_the_source():
    from core.config import help_text

    text = help_text(CommentedMore)
    assert "--lr float = 0.001  # the optimiser's peak learning rate, reached after the warmup" in text
    assert "--steps int = 20  # steps of this stage" in text  # the subclass's own comment
    assert "--bare int = 0\n" in text + "\n" and "bare int = 0  #" not in text


@dataclass
class Spec:
    layers: int = 2
    width: int = 8


@dataclass
class WithSpec:
    model: dict = field(default_factory=dict, metadata=nested_keys(
        lambda: {"embed_dim": None, "pretrained": None, "vision": dataclass_keys(Spec)}))


def test_a_typo_inside_a_model_spec_names_the_file_and_the_key_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {embed_dim: 8, pretrianed: openai}\n")
    with pytest.raises(InputError, match=r"c\.yaml: model\.pretrianed: unknown key; known keys here: embed_dim, "):
        parse_config(WithSpec, ["--config", str(path)])
    with pytest.raises(InputError, match=r"command line: model\.vision\.d_modle: unknown key"):
        parse_config(WithSpec, ["--model", '{"vision": {"layers": 2, "d_modle": 4}}'])
    assert parse_config(WithSpec, ["--model", '{"vision": {"layers": 3}}']).model == {"vision": {"layers": 3}}
