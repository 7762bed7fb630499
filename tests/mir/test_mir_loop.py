"""The MIR loop end to end on the tiny world: all modes, records per (target, round), report rows, resume after a kill."""
from __future__ import annotations

import json

import pytest

from core.errors import InputError
from mir import genir, image_query, prediction, report, text_only
from mir.records import RecordStore

VOLATILE = ("seconds_retrieve", "seconds_generate", "seconds_user", "seconds_refine", "generated_now")


def loop_args(world, dense_checkpoint, generator, user, out, **kw):
    args = {"dialogues_json": world / "chatir" / "dialogues_test.json",
            "search_space_json": world / "chatir" / "search_space_test.json", "image_root": world,
            "dense_checkpoint": dense_checkpoint, "generator": generator / "checkpoint-best", "user": user,
            "output_dir": out, "n_targets": 6, "rounds": 2, "gen_steps": 3, "batch_size": 4, "seed": 0, **kw}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def mir_run(shapes_world, dense_checkpoint, mir_generator, tiny_user, tmp_path_factory):
    out = tmp_path_factory.mktemp("mir") / "mir"
    args = loop_args(shapes_world, dense_checkpoint, mir_generator, tiny_user, out)
    for entry in (genir, prediction, text_only, image_query):
        entry.main(args)
    return out, args


def test_every_mode_records_every_target_and_round(mir_run, shapes_world, tmp_path):
    out, _ = mir_run
    for mode in ("genir", "prediction", "text-only", "image-query"):
        rows = RecordStore(out / mode / "records.jsonl").rows
        assert len(rows) == 6 * 3
        assert {(r["target"], r["round"]) for r in rows} == {(t, k) for t in {r["target"] for r in rows} for k in range(3)}
    g = RecordStore(out / "genir" / "records.jsonl").rows
    assert all((out / r["image"]).is_file() and r["gen_seed"] and "rank_image" in r for r in g)
    assert all(r["feedback"] for r in g if r["round"] < 2) and all(r["feedback"] == "" for r in g if r["round"] == 2)
    t = RecordStore(out / "text-only" / "records.jsonl").rows
    assert all(r["question"].startswith("what is in the") for r in t if r["round"] < 2)
    dialogues = json.loads((out / "text-only" / "dialogues.json").read_text())
    assert len(dialogues) == 6 and all(len(d["dialog"]) == 3 for d in dialogues)

    summary = tmp_path / "results.json"
    table = report.main(["--output_dir", str(out), "--image_root", str(shapes_world), "--summary", str(summary)])
    rows = json.loads(summary.read_text())["mir"]
    for name in ("genir", "prediction", "text-only"):
        h = rows[name]["Hits@10"]
        assert len(h) == 3 and all(0 <= a <= b <= 100 for a, b in zip(h, h[1:])) and rows[name]["N"] == 6
    assert "image-query, no feedback (ablation)" in table
    assert (out / "hits_at_10.png").is_file() and (out / "dialogues_genir.png").is_file()


def test_killed_run_resumes_at_first_unfinished_round(mir_run, shapes_world, dense_checkpoint, mir_generator, tiny_user):
    out, args = mir_run
    path = out / "genir" / "records.jsonl"
    full = path.read_text().splitlines()
    # keep round 0 and part of round 1, plus half a line, as a kill mid-write leaves it
    path.write_text("\n".join(full[:8]) + "\n" + full[8][:40])
    genir.main(args)
    again = path.read_text().splitlines()
    assert len(again) == len(full)
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in VOLATILE}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, again))) == sorted(map(json.dumps, map(strip, full)))


def test_rerun_with_other_settings_is_refused(mir_run):
    out, args = mir_run
    changed = list(args)
    changed[changed.index("--seed") + 1] = "1"
    with pytest.raises(InputError, match="seed"):
        genir.main(changed)


def test_stored_dialogues_replay_under_chatir_protocol(mir_run, shapes_world, dense_checkpoint, tmp_path):
    """A run's dialogues.json is ChatIR's layout; round 0 of the replay is the loop's round 0 (same first query)."""
    from mir import evaluate_dialogues

    out, _ = mir_run
    metrics = evaluate_dialogues.main([
        "--dialogues_json", str(out / "text-only" / "dialogues.json"),
        "--search_space_json", str(shapes_world / "chatir" / "search_space_test.json"), "--image_root", str(shapes_world),
        "--dense_checkpoint", str(dense_checkpoint), "--output_dir", str(tmp_path / "replay")])
    rows = RecordStore(out / "text-only" / "records.jsonl").rows
    loop_r0 = 100 * sum(r["rank"] < 10 for r in rows if r["round"] == 0) / 6
    assert len(metrics["Hits@10"]) == 3 and metrics["Hits@10"][0] == pytest.approx(loop_r0) and metrics["N"] == 6
