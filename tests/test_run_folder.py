"""The one policy for an existing run folder (core.run_folder): same config resumes or reuses, another config is
refused with the keys that differ, `--overwrite` starts afresh, and the step budget and logging may change."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.checkpoint import LAST
from core.config import save_config
from core.errors import InputError
from core.run_folder import open_run_folder


@dataclass
class Run:
    lr: float = 1e-3
    seed: int = 0
    max_steps: int = 10
    log_every: int = 5
    overwrite: bool = False


def _made(folder, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    save_config(Run(**kw), folder / "config.yaml")
    return folder


def test_an_empty_folder_starts_fresh(tmp_path):
    start = open_run_folder(tmp_path / "run", Run())
    assert start.fresh and not start.reuse_finished


def test_the_same_config_resumes_and_reuses_a_finished_run(tmp_path):
    start = open_run_folder(_made(tmp_path / "run"), Run())
    assert not start.fresh and start.changed == {} and start.reuse_finished


def test_another_config_is_refused_naming_every_key_that_differs(tmp_path):
    run = _made(tmp_path / "run")
    with pytest.raises(InputError, match=r"config.yaml: lr: .*lr: 0.001 -> 0.01; seed: 0 -> 3.*--overwrite true"):
        open_run_folder(run, Run(lr=1e-2, seed=3))


def test_a_new_step_budget_is_honoured_and_reopens_a_finished_run(tmp_path):
    start = open_run_folder(_made(tmp_path / "run"), Run(max_steps=20))
    assert not start.fresh and start.changed == {"max_steps": (10, 20)} and not start.reuse_finished


def test_a_new_logging_interval_keeps_a_finished_run_finished(tmp_path):
    start = open_run_folder(_made(tmp_path / "run"), Run(log_every=1))
    assert start.changed == {"log_every": (5, 1)} and start.reuse_finished


def test_overwrite_empties_the_folder_and_starts_fresh(tmp_path):
    run = _made(tmp_path / "run")
    (run / LAST).mkdir()
    (run / LAST / "model.pt").write_text("old")
    start = open_run_folder(run, Run(lr=1e-2, overwrite=True), overwrite=True)
    assert start.fresh and run.is_dir() and not any(run.iterdir())


def test_overwrite_clears_only_on_rank_zero(tmp_path, monkeypatch):
    run = _made(tmp_path / "run")
    monkeypatch.setenv("RANK", "1")
    assert open_run_folder(run, Run(overwrite=True), overwrite=True).fresh
    assert (run / "config.yaml").is_file()  # rank 0 clears; the other ranks only agree that the run starts afresh


def test_a_folder_from_before_the_policy_is_read_from_its_checkpoint(tmp_path):
    # older trainers saved the resolved config only inside checkpoint-last/
    _made(tmp_path / "run" / LAST)
    with pytest.raises(InputError, match=f"{LAST}/config.yaml: seed"):
        open_run_folder(tmp_path / "run", Run(seed=1))
    assert not open_run_folder(tmp_path / "run", Run()).fresh


def test_an_option_the_saved_config_has_and_the_trainer_dropped_is_ignored(tmp_path):
    run = _made(tmp_path / "run")
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "resume: true\n")
    assert open_run_folder(run, Run()).changed == {}


def test_a_broken_saved_config_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("lr: [1,\n")
    with pytest.raises(InputError, match="config.yaml: the saved config is not valid YAML"):
        open_run_folder(run, Run())
