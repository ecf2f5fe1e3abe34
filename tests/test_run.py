"""`segengine run` end to end on real patients, and every bad input as a table."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as imageio
import nibabel as nib
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from conftest import VAL_PATIENTS, copy_model, tree_hashes
from segengine.engine.cli import main
from segengine.engine.model.spec import sha256_file, shipped_model_path
from segengine.engine.outputs.masks import write_mask_slices

MODEL = Path(os.environ.get("SEGENGINE_TEST_MODEL", shipped_model_path()))


def _run(args):
    return CliRunner().invoke(main, ["run", "--model", str(MODEL), *args])


def _mask_stack(folder: Path, patient: str, n: int) -> np.ndarray:
    """Slices 1..n of ``patient``'s <patient>_<k>_mask.tif files in ``folder``, decoded, in slice order."""
    return np.stack([tifffile.imread(folder / f"{patient}_{k}_mask.tif") for k in range(1, n + 1)])


def _dice(a, b):
    a, b = a > 0, b > 0
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2 * (a & b).sum() / s


@pytest.fixture(scope="module")
def run_out(kaggle_root, tmp_path_factory):
    """One --patients run over the two validation patients (shared by the checks below)."""
    root = tmp_path_factory.mktemp("runroot")
    for p in VAL_PATIENTS:
        shutil.copytree(kaggle_root / p, root / p)
    out = tmp_path_factory.mktemp("runout") / "out"
    before = tree_hashes(root)
    res = _run(["--patients", str(root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return root, out, res.output, before


@pytest.mark.parametrize("patient", VAL_PATIENTS)
def test_run_writes_every_output(run_out, patient):
    root, out, _, _ = run_out
    folder = out / patient
    slices = sorted(p for p in (root / patient).glob("*.tif") if not p.name.endswith("_mask.tif"))
    for s in slices:
        m = tifffile.imread(folder / s.name.replace(".tif", "_mask.tif"))
        assert m.dtype == np.uint8 and m.shape == tifffile.imread(s).shape[:2]
        assert set(np.unique(m)) <= {0, 255}
    masks = _mask_stack(folder, patient, len(slices))
    # the NIfTI holds the same voxels as the tifs: stored (x = column, y = row, z = slice)
    nii = np.asanyarray(nib.load(str(folder / f"{patient}_mask.nii.gz")).dataobj)
    assert nii.shape == (256, 256, len(slices))
    np.testing.assert_array_equal(nii.transpose(2, 1, 0), masks > 0)
    overlay = imageio.imread(folder / "overlay.png")
    assert overlay.ndim == 3 and overlay.shape[2] in (3, 4) and overlay.std() > 10  # a decodable, non-blank picture
    report = json.loads((folder / "report.json").read_text())
    assert report["slices"] == len(slices) and report["model_sha256"] == sha256_file(MODEL)
    assert set(report["timings_s"]) >= {"read", "preprocess", "infer", "postprocess", "write"}
    # the areas reported are the pixels of the mask files, slice by slice
    assert report["tumor_area_px_per_slice"] == {str(n): int((m > 0).sum()) for n, m in enumerate(masks, 1)}
    assert report["tumor_volume_px"] == int((masks > 0).sum())


@pytest.mark.parametrize("patient", VAL_PATIENTS)
def test_report_dsc_equals_an_independent_computation(run_out, patient):
    root, out, _, _ = run_out
    pred = np.stack([tifffile.imread(p) for p in sorted((out / patient).glob("*_mask.tif"), key=lambda p: int(p.stem.split("_")[-2]))])
    truth = np.stack([tifffile.imread(p) for p in sorted((root / patient).glob("*_mask.tif"), key=lambda p: int(p.stem.split("_")[-2]))])
    report = json.loads((out / patient / "report.json").read_text())
    assert report["metrics"]["dsc"] == pytest.approx(_dice(pred, truth), abs=1e-9)
    if MODEL == shipped_model_path():
        assert report["metrics"]["dsc"] >= 0.8  # the shipped model segments real validation patients


def test_inputs_are_never_modified(run_out, kaggle_root):
    root, _, _, before = run_out
    assert tree_hashes(root) == before and len(before) > 2 * len(VAL_PATIENTS)
    for p in VAL_PATIENTS:
        assert tree_hashes(root / p) == tree_hashes(kaggle_root / p)


def test_single_patient_and_overwrite(kaggle_root, tmp_path):
    out = tmp_path / "out"
    args = ["--patient", str(kaggle_root / VAL_PATIENTS[1]), "--out", str(out), "--gif"]
    res = _run(args)
    assert res.exit_code == 0, res.output
    # the patient's line, then the review page's path (issue 31)
    assert res.output.count("\n") == 2 and VAL_PATIENTS[1] in res.output and "DSC" in res.output
    assert res.output.splitlines()[-1] == f"review page: {out / 'index.html'}"
    n = len([p for p in (kaggle_root / VAL_PATIENTS[1]).glob("*.tif") if not p.name.endswith("_mask.tif")])
    gif = imageio.imread(out / VAL_PATIENTS[1] / "slices.gif", index=None)  # every frame decoded
    assert gif.shape[:3] == (n, 256, 256)  # one frame a slice, at the slices' size
    again = _run(args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert _run(args + ["--overwrite"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [VAL_PATIENTS[1], "index.html"]  # no temp folders left


# ------------------------------------------------------------------ bad input: one line, exit 2
def _damage_rgba(d):
    tifffile.imwrite(next(d.glob("*_5.tif")), np.zeros((256, 256, 4), np.uint8))


def _damage_16bit(d):
    tifffile.imwrite(next(d.glob("*_5.tif")), np.zeros((256, 256, 3), np.uint16))


def _damage_size(d):
    tifffile.imwrite(next(d.glob("*_5.tif")), np.zeros((200, 256, 3), np.uint8))


def _damage_truncate(d):
    f = next(d.glob("*_5.tif"))
    f.write_bytes(f.read_bytes()[:1000])


def _damage_text(d):
    next(d.glob("*_5.tif")).write_text("not an image")


def _damage_gap(d):
    next(d.glob("*_5.tif")).unlink()
    next(d.glob("*_5_mask.tif")).unlink()


def _damage_duplicate(d):
    src = next(d.glob("*_5.tif"))
    shutil.copy(src, src.with_name(src.name.replace("_5.tif", "_05.tif")))


def _damage_empty(d):
    for f in d.iterdir():
        f.unlink()


BAD_PATIENTS = [
    (_damage_rgba, "RGBA"), (_damage_16bit, "8-bit"), (_damage_size, "differs"), (_damage_truncate, "not a readable image"),
    (_damage_text, "not a readable image"), (_damage_gap, "missing"), (_damage_duplicate, "duplicate"),
    (_damage_empty, "no image slices"),
]


@pytest.mark.parametrize("damage, words", BAD_PATIENTS, ids=[d.__name__[8:] for d, _ in BAD_PATIENTS])
def test_bad_patient_folder(patient_copy, tmp_path, damage, words):
    damage(patient_copy)
    res = _run(["--patient", str(patient_copy), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert words in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _model_copy(tmp_path, edit):
    w = copy_model(MODEL, tmp_path / "model", exports=True)
    edit(w)
    return w


def _corrupt_weights(w):
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))


def _mismatched_card(w):
    card = json.loads(w.with_suffix(".json").read_text())
    card["sha256"] = "0" * 64
    w.with_suffix(".json").write_text(json.dumps(card))


def _truncated_weights(w):
    w.write_bytes(w.read_bytes()[:100])


def _card_matches(w):
    """Re-sign the card so the checksum passes and the next check (torch.load, state dict) is reached."""
    from segengine.engine.model.spec import sha256_file

    card = json.loads(w.with_suffix(".json").read_text())
    card["sha256"] = sha256_file(w)
    w.with_suffix(".json").write_text(json.dumps(card))


def _signed_garbage_weights(w):
    w.write_bytes(b"PK\x03\x04 not a torch archive" * 10)
    _card_matches(w)


def _signed_wrong_architecture(w):
    import torch

    from segengine.engine.model.network import ResUNet

    torch.save({"state_dict": ResUNet(base_channels=8, deep_supervision=False).state_dict()}, w)
    _card_matches(w)


BAD_MODELS = [(_corrupt_weights, "SHA-256"), (_mismatched_card, "SHA-256"), (_truncated_weights, "SHA-256"),
              (_signed_garbage_weights, "not a loadable PyTorch weights file"),
              (_signed_wrong_architecture, "do not fit architecture")]


@pytest.mark.parametrize("edit, words", BAD_MODELS, ids=[e.__name__[1:] for e, _ in BAD_MODELS])
def test_bad_model_file(kaggle_root, tmp_path, edit, words):
    weights = _model_copy(tmp_path, edit)
    res = CliRunner().invoke(main, ["run", "--model", str(weights), "--backend", "torch", "--patient",
                                    str(kaggle_root / VAL_PATIENTS[0]), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_model_file(kaggle_root, tmp_path):
    res = CliRunner().invoke(main, ["run", "--model", str(tmp_path / "none.pt"), "--patient",
                                    str(kaggle_root / VAL_PATIENTS[0]), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "not found" in res.output


@pytest.mark.parametrize("case", ["missing-dir", "dir-is-file", "out-not-writable", "out-inside-input", "backend-unavailable", "backend-unknown"])
def test_bad_invocation(kaggle_root, patient_copy, tmp_path, case):
    dirpath, out, extra = patient_copy, tmp_path / "out", []
    if case == "missing-dir":
        dirpath = tmp_path / "absent"
    elif case == "dir-is-file":
        dirpath = next(patient_copy.glob("*_1.tif"))
    elif case == "out-not-writable":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where a folder should be")
        out = blocker / "out"
    elif case == "out-inside-input":
        out = patient_copy / "results"
    elif case == "backend-unavailable":
        extra = ["--backend", "tensorrt"]
    else:
        extra = ["--backend", "magic"]
    res = _run(["--patient", str(dirpath), "--out", str(out), *extra])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    expected = {"missing-dir": "no such folder", "dir-is-file": "not a folder", "out-not-writable": "not writable",
                "out-inside-input": "inside the input", "backend-unavailable": "available:", "backend-unknown": "magic"}[case]
    assert expected in res.output
    assert tree_hashes(patient_copy) == tree_hashes(kaggle_root / VAL_PATIENTS[0])


def test_one_bad_patient_is_skipped_others_complete(kaggle_root, tmp_path):
    root = tmp_path / "root"
    for p in VAL_PATIENTS:
        shutil.copytree(kaggle_root / p, root / p)
    _damage_rgba(root / VAL_PATIENTS[0])
    res = _run(["--patients", str(root), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "failed 1" in res.output and "RGBA" in res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [VAL_PATIENTS[1], "index.html"]


def test_interrupted_patient_leaves_nothing(kaggle_root, tmp_path, monkeypatch):
    import segengine.engine.outputs.writer as outputs

    real = write_mask_slices

    def write_some_then_die(folder, pid, numbers, mask):
        real(folder, pid, numbers[:3], mask[:3])
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "write_mask_slices", write_some_then_die)
    out = tmp_path / "out"
    res = _run(["--patient", str(kaggle_root / VAL_PATIENTS[0]), "--out", str(out)])
    assert res.exit_code == 130
    assert list(out.iterdir()) == []


def test_main_command_as_a_subprocess(kaggle_root, tmp_path):
    """The README's command, as a user types it: the console script, the shipped model."""
    exe = Path(sys.executable).with_name("segengine")
    res = subprocess.run([str(exe), "run", "--patient", str(kaggle_root / VAL_PATIENTS[0]), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # its masks, decoded, segment the patient as the ground truth does; its line and report say so
    patient = kaggle_root / VAL_PATIENTS[0]
    n = len([p for p in patient.glob("*.tif") if not p.name.endswith("_mask.tif")])
    pred = _mask_stack(tmp_path / "o" / VAL_PATIENTS[0], VAL_PATIENTS[0], n)
    truth = _mask_stack(patient, VAL_PATIENTS[0], n)
    dsc = _dice(pred, truth)
    assert dsc >= 0.8
    report = json.loads((tmp_path / "o" / VAL_PATIENTS[0] / "report.json").read_text())
    assert report["metrics"]["dsc"] == pytest.approx(dsc, abs=1e-9) and report["model_sha256"] == sha256_file(shipped_model_path())
    assert VAL_PATIENTS[0] in res.stdout and f"DSC {dsc:.4f}" in res.stdout, res.stdout
