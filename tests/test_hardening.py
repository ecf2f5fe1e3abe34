"""Engine v3 hardening (issue 20), as an attacker would try it, on real slices from ../shared.

Every case: one clear line where refused (or a correct result where accepted), nothing outside
OUT touched (sha256 before and after), inputs byte-identical, and a batch that finishes with its
summary and index."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TRAIN_PATIENT, VAL_PATIENTS, tree_hashes
from segengine.engine.cli import main
from segengine.engine.model import shipped_model_path
from segengine.engine.review_page import INDEX_PAGE as INDEX

MODEL = Path(os.environ.get("SEGENGINE_TEST_MODEL", shipped_model_path()))
SMALL = TRAIN_PATIENT  # 23 slices: the cheapest real patient to segment


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _run(*args: str):
    return _cli("run", "--model", str(MODEL), "--threads", "1", *args)


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.fixture()
def root(kaggle_root, tmp_path) -> Path:
    r = tmp_path / "root"
    shutil.copytree(kaggle_root / SMALL, r / SMALL)
    return r


@pytest.fixture()
def victim(tmp_path) -> Path:
    """A folder outside OUT that a planted entry points at: it must stay byte-identical."""
    v = tmp_path / "victim"
    (v / "old").mkdir(parents=True)
    (v / "old" / "report.json").write_text('{"patient": "someone else"}')
    (v / "precious.txt").write_text("do not touch\n")
    (v / "report.json").write_text(json.dumps({"patient": SMALL, "slices": 1}))
    return v


# ------------------------------------------------------------------ 1. nothing planted in OUT reaches outside it
def _lock_links_to_an_input_slice(out, victim, root):
    os.symlink(root / SMALL / f"{SMALL}_1.tif", out / f".{SMALL}.segengine-lock")


def _lock_links_to_a_file_outside(out, victim, root):
    os.symlink(victim / "precious.txt", out / f".{SMALL}.segengine-lock")


def _lock_is_a_hard_link_to_an_input_slice(out, victim, root):
    os.link(root / SMALL / f"{SMALL}_2.tif", out / f".{SMALL}.segengine-lock")


def _lock_is_a_fifo(out, victim, root):
    os.mkfifo(out / f".{SMALL}.segengine-lock")


def _old_links_to_a_folder_outside(out, victim, root):  # was "restored" into OUT, then deleted by --overwrite
    os.symlink(victim, out / f".{SMALL}.old-abcd1234", target_is_directory=True)


def _old_planted_folder_with_a_linked_old(out, victim, root):
    (out / f".{SMALL}.old-abcd1234").mkdir()
    os.symlink(victim / "old", out / f".{SMALL}.old-abcd1234" / "old", target_is_directory=True)


def _partial_links_to_a_folder_outside(out, victim, root):
    os.symlink(victim, out / f".{SMALL}.partial-abcd1234", target_is_directory=True)


def _result_folder_links_outside(out, victim, root):
    os.symlink(victim, out / SMALL, target_is_directory=True)


# (plant, exit code of `run --patients`, words in the output)
PLANTS = [
    (_lock_links_to_an_input_slice, 1, "lock file is a symbolic link, not one segengine made; left alone"),
    (_lock_links_to_a_file_outside, 1, "lock file is a symbolic link"),
    (_lock_is_a_hard_link_to_an_input_slice, 1, "lock file is a hard link to another file"),
    (_lock_is_a_fifo, 1, "lock file is a FIFO, socket or device"),
    (_old_links_to_a_folder_outside, 0, f"left .{SMALL}.old-abcd1234 alone (a symbolic link)"),
    (_old_planted_folder_with_a_linked_old, 0, f"left .{SMALL}.old-abcd1234 alone (not made by segengine)"),
    (_partial_links_to_a_folder_outside, 0, f"left .{SMALL}.partial-abcd1234 alone (a symbolic link)"),
    (_result_folder_links_outside, 1, "a symbolic link where this patient's results go, not a folder segengine made"),
]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("plant, code, words", PLANTS, ids=[p[0].__name__.strip("_") for p in PLANTS])
def test_entries_planted_in_out_are_never_followed(root, victim, tmp_path, plant, code, words, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    plant(out, victim, root)
    planted = {p.name: os.readlink(p) if p.is_symlink() else None for p in out.iterdir()}
    inputs, outside = tree_hashes(root), tree_hashes(victim)
    res = _run("--patients", str(root), "--out", str(out), *(["--overwrite"] if overwrite else []))
    assert res.exit_code == code, res.output
    assert words in res.output and "Traceback" not in res.output, res.output
    assert tree_hashes(root) == inputs and tree_hashes(victim) == outside  # nothing outside OUT touched
    for name, target in planted.items():  # the planted entry is left as it was
        assert (out / name).is_symlink() == (target is not None) and (target is None or os.readlink(out / name) == target)
    assert (out / INDEX).is_file() and "done" in res.output  # the batch finished with its summary and index
    if code == 0:
        report = json.loads((out / SMALL / "report.json").read_text())
        assert report["patient"] == SMALL and report["slices"] == 23 and (out / SMALL).is_dir()
        assert not (out / SMALL).is_symlink() and not (out / SMALL / ".segengine-owner").exists()


def test_report_never_follows_a_result_folder_link(victim, tmp_path):
    """`segengine report` reads no report.json and writes no review.html through a linked OUT/<id>."""
    out = tmp_path / "out"
    (out / "real").mkdir(parents=True)
    (out / "real" / "report.json").write_text(json.dumps({"patient": "real", "slices": 3, "tumor_slices": []}))
    os.symlink(victim, out / SMALL, target_is_directory=True)
    (victim / "review").mkdir()
    (victim / "review" / "viewer.js").write_text("x")
    outside = tree_hashes(victim)
    res = _cli("report", str(out))
    assert res.exit_code == 0 and "(1 patients" in res.output, res.output
    assert tree_hashes(victim) == outside and not (victim / "review.html").exists()
    page = (out / INDEX).read_text()
    assert "1 unreadable report" in page and "a symbolic link, not a result folder" in page


def test_single_patient_with_a_linked_result_folder_is_one_line(root, victim, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / SMALL, target_is_directory=True)
    outside = tree_hashes(victim)
    res = _run("--patient", str(root / SMALL), "--out", str(out), "--overwrite")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "a symbolic link where this patient's results go" in res.output, res.output
    assert tree_hashes(victim) == outside and os.readlink(out / SMALL) == str(victim)
