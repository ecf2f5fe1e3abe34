"""Engine v3 hardening (issue 20), as an attacker would try it, on real slices from ../shared.

Every case: one clear line where refused (or a correct result where accepted), nothing outside
OUT touched (sha256 before and after), inputs byte-identical, and a batch that finishes with its
summary and index."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TRAIN_PATIENT, VAL_PATIENTS, tree_hashes
from segengine.engine.cli import main
from segengine.engine.model.spec import shipped_model_path
from segengine.engine.outputs.review_page import INDEX_PAGE as INDEX
from segengine.engine.readers.volume import DEFAULT_LIMITS

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


# ------------------------------------------------------------------ 2. a memory budget checked before decoding
@pytest.fixture()
def decoded(monkeypatch) -> list[Path]:
    """Every slice file whose pixels are decoded (the readers by file ending, recorded)."""
    from segengine.engine.readers import kaggle as io

    seen: list[Path] = []
    for ext, reader in list(io.READERS.items()):
        def record(path, reader=reader):
            seen.append(Path(path))
            return reader(path)
        monkeypatch.setitem(io.READERS, ext, record)
    return seen


def test_multi_page_tiff_slice_is_refused_before_any_page_is_decoded(kaggle_root, tmp_path, decoded):
    import numpy as np
    import tifffile

    root = tmp_path / "root"
    for p in (SMALL, VAL_PATIENTS[0]):
        shutil.copytree(kaggle_root / p, root / p)
    bomb = root / VAL_PATIENTS[0] / f"{VAL_PATIENTS[0]}_5.tif"
    page = tifffile.imread(bomb)
    tifffile.imwrite(bomb, np.stack([page] * 300), compression="zlib")  # a few MB on disk, 59 MB decoded
    inputs = tree_hashes(root)
    res = _run("--patients", str(root), "--out", str(tmp_path / "out"))
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert f"{bomb}: 300 pages in one slice file, expected one image per slice" in res.output
    assert "done 1" in res.output and "failed 1" in res.output and (tmp_path / "out" / INDEX).is_file()
    assert bomb not in decoded and not any(VAL_PATIENTS[0] in p.name for p in decoded)  # refused from headers
    assert tree_hashes(root) == inputs


def test_patient_over_the_default_budget_is_refused_from_its_headers(kaggle_root, tmp_path, decoded):
    """90 real slices tiled to 1024 x 1024: within --max-side and --max-slices, 2.5 GB (3 B decoded + 20 B working per pixel, 3.4 MB model grid per slice) through the pipeline."""
    import numpy as np
    import tifffile

    from segengine.engine.readers import kaggle as io

    big = tmp_path / "big" / "BIG"
    big.mkdir(parents=True)
    for n in range(1, 91):
        src = tifffile.imread(kaggle_root / SMALL / f"{SMALL}_{(n - 1) % 23 + 1}.tif")
        tifffile.imwrite(big / f"BIG_{n}.tif", np.tile(src, (4, 4, 1)), compression="zlib")
    res = _run("--patient", str(big), "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert "needs about 2.5 GB of memory (90 slices of 1024x1024), more than the limit of 2 GB per patient; " \
           "raise it with --max-memory 2.5" in text
    assert decoded == []  # not one pixel decoded
    _, images, masks = io.list_slices(big)
    io.check_headers(big, images, masks, io.SliceLimits(max_memory=int(2.5e9)))  # the raised limit admits it


def test_max_memory_names_the_limit_and_the_raised_limit_is_enough(root, tmp_path):
    out = tmp_path / "out"
    res = _run("--patient", str(root / SMALL), "--out", str(out), "--max-memory", "0.05")
    assert res.exit_code == 2 and "more than the limit of 0.05 GB per patient" in res.output, res.output
    raised = res.output.split("raise it with --max-memory ")[1].split()[0]
    ok = _run("--patient", str(root / SMALL), "--out", str(out), "--max-memory", raised)
    assert ok.exit_code == 0 and f"{SMALL}: 23 slices" in ok.output, ok.output


def _forged_nifti(path: Path, shape, dtype) -> Path:
    """A NIfTI whose header claims ``shape`` x ``dtype`` over a few bytes of data (nibabel reads lazily)."""
    import nibabel as nib
    import numpy as np

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.eye(4), code="scanner")
    hdr.set_sform(np.eye(4), code="scanner")
    hdr["vox_offset"] = 352
    path.write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 4096)
    return path


def test_float64_nifti_within_the_side_limits_is_refused_by_the_budget(kaggle_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(kaggle_root / SMALL, root / SMALL)
    _forged_nifti(root / "huge.nii", (512, 512, 512, 3), "float64")
    _forged_nifti(root / "huge2.nii", (512, 512, 512, 3), "float64")
    res = _run("--patients", str(root), "--out", str(tmp_path / "out"))
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert res.output.count("more than the limit of 2 GB per patient") == 4  # log line + summary line, each case
    assert "512 slices of 512x512, float64 voxels" in res.output and "done 1" in res.output and "failed 2" in res.output
    single = _run("--patient", str(root / "huge.nii"), "--out", str(tmp_path / "out2"))
    assert single.exit_code == 2 and len(single.output.strip().splitlines()) == 1, single.output


def _report(patient: str, **extra) -> dict:
    return {"patient": patient, "slices": 20, "tumor_slices": [3, 4], "tumor_volume_px": 120,
            "review": {"flag": False, "reasons": []}, **extra}


def test_report_bounds_what_it_reads_and_writes(tmp_path):
    out = tmp_path / "out"
    for name, rep in [("A", _report("A")), ("BIG", _report("BIG", pad="x" * (2 << 20))),
                      ("LOUD", _report("LOUD", review={"flag": True, "reasons": ["y" * 20000] * 40}))]:
        (out / name).mkdir(parents=True)
        (out / name / "report.json").write_text(json.dumps(rep))
    res = _cli("report", str(out))
    assert res.exit_code == 0 and "(2 patients, 1 flagged" in res.output, res.output
    page = (out / INDEX).read_text()
    assert "BIG: the report is 2,097,2" in page and "more than the limit of 1,048,576" in page
    assert len(page) < 60_000  # 40 reasons of 20,000 characters are not all put on the page


# ------------------------------------------------------------------ 3. no blocking opens
def _model_copy(tmp_path: Path) -> Path:
    from conftest import copy_model

    return copy_model(MODEL, tmp_path / "model", exports=True)


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def _weights_fifo(tmp_path, root):
    w = _model_copy(tmp_path)
    _fifo(w)
    return ["run", "--model", str(w), "--patient", str(root / SMALL), "--out", str(tmp_path / "o")]


def _weights_dev_zero(tmp_path, root):
    w = _model_copy(tmp_path)
    _dev_zero(w)
    return ["run", "--model", str(w), "--patient", str(root / SMALL), "--out", str(tmp_path / "o")]


def _card_fifo(tmp_path, root):
    w = _model_copy(tmp_path)
    _fifo(w.with_suffix(".json"))
    return ["run", "--model", str(w), "--patient", str(root / SMALL), "--out", str(tmp_path / "o")]


def _sidecar_dev_zero(tmp_path, root):
    w = _model_copy(tmp_path)
    _dev_zero(w.with_name(w.stem + ".onnx.json"))
    return ["run", "--model", str(w), "--backend", "onnxruntime", "--patient", str(root / SMALL),
            "--out", str(tmp_path / "o")]


def _export_fifo(tmp_path, root):
    w = _model_copy(tmp_path)
    _fifo(w.with_name(w.stem + ".onnx"))
    return ["run", "--model", str(w), "--backend", "onnxruntime", "--patient", str(root / SMALL),
            "--out", str(tmp_path / "o")]


def _ensemble_member_fifo(tmp_path, root):
    w = _model_copy(tmp_path)
    _fifo(w.with_name("member.pt"))
    manifest = w.with_name("two.ensemble.json")
    manifest.write_text(json.dumps({"kind": "ensemble", "name": "two", "members": [w.name, "member.pt"]}))
    return ["run", "--ensemble", str(manifest), "--patient", str(root / SMALL), "--out", str(tmp_path / "o")]


def _patients_file_fifo(tmp_path, root):
    _fifo(tmp_path / "list.txt")
    return ["evaluate", "--data", str(root), "--pred", str(root), "--patients-file", str(tmp_path / "list.txt")]


def _predicted_mask_fifo(tmp_path, root):
    pred = tmp_path / "pred" / SMALL
    pred.mkdir(parents=True)
    for m in (root / SMALL).glob("*_mask.tif"):
        shutil.copy(m, pred / m.name)
    _fifo(pred / f"{SMALL}_3_mask.tif")
    return ["evaluate", "--data", str(root), "--pred", str(pred.parent)]


def _nifti_dev_zero(tmp_path, root):
    _dev_zero(tmp_path / "case.nii.gz")
    return ["run", "--model", str(MODEL), "--patient", str(tmp_path / "case.nii.gz"), "--out", str(tmp_path / "o")]


BLOCKING = [
    (_weights_fifo, "model file is a FIFO, socket or device, not a regular file"),
    (_weights_dev_zero, "model file is a FIFO, socket or device, not a regular file"),
    (_card_fifo, "model card is a FIFO, socket or device, not a regular file"),
    (_sidecar_dev_zero, "sidecar is a FIFO, socket or device, not a regular file"),
    (_export_fifo, "onnx export is a FIFO, socket or device, not a regular file"),
    (_ensemble_member_fifo, "member member.pt is not a model file beside the manifest"),
    (_patients_file_fifo, "patient list is a FIFO, socket or device, not a regular file"),
    (_predicted_mask_fifo, "predicted mask is a FIFO, socket or device, not a regular file"),
    (_nifti_dev_zero, "not a NIfTI file"),
]


@pytest.mark.parametrize("make, words", BLOCKING, ids=[m.__name__.strip("_") for m, _ in BLOCKING])
def test_files_that_would_block_are_refused_in_one_line(root, tmp_path, make, words):
    import subprocess
    import sys

    argv = make(tmp_path, root)
    exe = Path(sys.executable).with_name("segengine")
    proc = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=120)  # a hang fails here
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("workers, threads, cpus, words", [
    (3, 1, 2, "--workers 3 x --threads 1 needs 3 CPUs, but the Ray cluster has 2; use --workers 2 or fewer"),
    (1, 4, 2, "needs 4 CPUs, but the Ray cluster has 2; use --threads 2 or fewer"),
    (2, 1, 2, None), (1, 2, 2, None),
])
def test_ray_workers_are_checked_against_the_cluster_cpus(workers, threads, cpus, words):
    from segengine.engine.core.errors import BackendUnavailable
    from segengine.engine.job.ray_runner import check_workers

    if words is None:
        check_workers(workers, threads, cpus)
        return
    with pytest.raises(BackendUnavailable, match=re.escape(words)):
        check_workers(workers, threads, cpus)


# ------------------------------------------------------------------ 4. a batch survives any single patient
def _zero_slice_case(folder: Path) -> None:
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((40, 48, 0), np.int16), np.eye(4)), str(folder / "zc_flair.nii.gz"))


def test_zero_slice_nifti_in_a_batch_is_that_patients_line(root, tmp_path):
    _zero_slice_case(root / "zc")
    inputs = tree_hashes(root)
    res = _run("--patients", str(root), "--out", str(tmp_path / "out"))
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "zc_flair.nii.gz: empty volume of shape (40, 48, 0)" in res.output
    assert "done 1" in res.output and "failed 1" in res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [SMALL, INDEX] and tree_hashes(root) == inputs


@pytest.mark.parametrize("argv", [["evaluate", "--pred", "{pred}"], ["evaluate", "--model", str(MODEL)],
                                  ["validate", "--backend", "onnxruntime", "--model", str(MODEL)]],
                         ids=["evaluate-pred", "evaluate-model", "validate"])
def test_zero_slice_nifti_in_evaluate_and_validate_is_one_line(root, tmp_path, argv):
    _zero_slice_case(root / "zc")
    res = _cli(*[a.replace("{pred}", str(root)) for a in argv], "--data", str(root))
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert "empty volume of shape (40, 48, 0)" in text and "Traceback" not in text and len(text.splitlines()) == 1


@pytest.mark.parametrize("when", ["before-its-read", "after-its-lock"])
def test_patient_deleted_while_queued_is_that_patients_line(kaggle_root, tmp_path, monkeypatch, when):
    """The input folder vanishes while the patient waits: before its read (a failure), or after
    its job found results in OUT (a skip, reported by the job's id: the folder is gone)."""
    import segengine.engine.job.patient_job as runner

    root = tmp_path / "root"
    for p in (SMALL, VAL_PATIENTS[0]):
        shutil.copytree(kaggle_root / p, root / p)
    out = tmp_path / "out"
    if when == "before-its-read":
        real = runner.preprocess_patient

        def delete_the_next_patient(vol, *a):
            shutil.rmtree(root / VAL_PATIENTS[0], ignore_errors=True)  # queued behind this one
            return real(vol, *a)

        monkeypatch.setattr(runner, "preprocess_patient", delete_the_next_patient)
    else:
        (out / VAL_PATIENTS[0]).mkdir(parents=True)
        (out / VAL_PATIENTS[0] / "report.json").write_text(json.dumps(_report(VAL_PATIENTS[0])))
        real_start = runner.PatientJob.start

        def start_then_vanish(job):
            if job.patient_id == VAL_PATIENTS[0]:
                shutil.rmtree(root / VAL_PATIENTS[0])
            return real_start(job)

        monkeypatch.setattr(runner.PatientJob, "start", start_then_vanish)
    res = _run("--patients", str(root), "--out", str(out))
    assert "Traceback" not in res.output and "done 1" in res.output, res.output
    if when == "before-its-read":
        assert res.exit_code == 1 and f"failed: {VAL_PATIENTS[0]}: {root / VAL_PATIENTS[0]}: no such folder" in res.output
    else:
        assert res.exit_code == 0 and "skipped 1 (results exist)" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted([SMALL, INDEX] + ([VAL_PATIENTS[0]] if when != "before-its-read" else []))


@pytest.mark.parametrize("bad", ["[1, 2]", '"text"', json.dumps(_report("B", tumor_slices=5)),
                                 json.dumps(_report("B", metrics=[0.5])), json.dumps(_report("B", review="yes")),
                                 json.dumps(_report("B", metrics={"dsc": "high"})), "{ truncated", "\xff\xfe"],
                         ids=["list", "string", "tumor_slices-int", "metrics-list", "review-str", "dsc-str",
                              "truncated", "not-utf8"])
def test_a_bad_report_in_out_never_breaks_the_index_of_a_later_run(root, tmp_path, bad):
    out = tmp_path / "out"
    (out / "B").mkdir(parents=True)
    (out / "B" / "report.json").write_bytes(bad.encode("latin-1"))
    res = _run("--patients", str(root), "--out", str(out))
    assert res.exit_code == 0 and "done 1" in res.output and "Traceback" not in res.output, res.output
    page = (out / INDEX).read_text()
    assert "1 patients" in page and "1 unreadable report(s): B: " in page
    again = _cli("report", str(out))
    assert again.exit_code == 0 and "(1 patients" in again.output, again.output


def test_non_ascii_patient_on_an_ascii_terminal(kaggle_root, tmp_path):
    import subprocess
    import sys

    name = "Müller_ü"
    p = tmp_path / "root" / name
    p.mkdir(parents=True)
    for f in (kaggle_root / SMALL).iterdir():
        shutil.copy(f, p / f.name.replace(SMALL, name))
    exe = Path(sys.executable).with_name("segengine")
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C", "LANG": "C"}
    for args in (["--patient", str(p)], ["--patients", str(p.parent), "--overwrite"]):
        proc = subprocess.run([str(exe), "run", "--model", str(MODEL), "--threads", "1", *args,
                               "--out", str(tmp_path / "out")], capture_output=True, env=env, timeout=300)
        text = (proc.stdout + proc.stderr).decode("ascii")  # nothing but ASCII reached the terminal
        assert proc.returncode == 0 and "Traceback" not in text, text
        assert "M\\xfcller_\\xfc: 23 slices" in text
    assert (tmp_path / "out" / name / "report.json").is_file()


# ------------------------------------------------------------------ 5. refuse instead of guessing
def _scaled_case(kaggle_root, tmp_path, slope: float, inter: float) -> Path:
    import struct

    from segengine.bench.nifti_agreement import kaggle_to_input_grid, save_nifti
    from segengine.engine.readers.registry import read_patient

    vol = read_patient(kaggle_root / SMALL)
    data, affine = kaggle_to_input_grid(vol.image)
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "case.nii"
    save_nifti(data, affine, path, "int16", 1.0)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<ff", raw, 112, slope, inter)  # scl_slope, scl_inter as a forged header holds them
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("slope, inter, ok", [(-2.0, 0.0, False), (float("inf"), 0.0, False),
                                              (float("-inf"), 0.0, False), (2.0, float("inf"), False),
                                              (0.0, 0.0, True), (3.5, -100.0, True)],
                         ids=["negative", "inf", "-inf", "inter-inf", "unset", "positive"])
def test_nifti_scaling_that_is_not_finite_and_positive_is_refused(kaggle_root, tmp_path, slope, inter, ok):
    from segengine.engine.readers.registry import read_patient

    case = _scaled_case(kaggle_root, tmp_path, slope, inter)
    before = tree_hashes(tmp_path)
    if ok:  # a linear rescale with a positive slope gives the same 8-bit volume
        assert (read_patient(case).image == read_patient(_scaled_case(kaggle_root, tmp_path / "u", 1, 0)).image).all()
        return
    res = _run("--patient", str(case), "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert ("header scaling scl_slope=" in text or "invalid intercept" in text) and len(text.splitlines()) == 1, text
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out" / "case").exists()


def _pred_of_truth(root: Path, tmp_path: Path) -> Path:
    pred = tmp_path / "pred" / SMALL
    pred.mkdir(parents=True)
    for m in (root / SMALL).glob("*_mask.tif"):
        shutil.copy(m, pred / m.name)
    return pred.parent


@pytest.mark.parametrize("content, words", [
    (f"{SMALL}\n# again\n {SMALL} \n", f"patient {SMALL} is listed twice"),
    ("# only comments\n\n   \n", "patient list names no patient"),
    (b"\xff\xfe\x00bad", "patient list is not UTF-8 text"),
], ids=["duplicate", "comments-only", "not-utf8"])
def test_bad_patient_lists_are_one_line(root, tmp_path, content, words):
    lst = tmp_path / "list.txt"
    lst.write_bytes(content if isinstance(content, bytes) else content.encode())
    res = _cli("evaluate", "--data", str(root), "--pred", str(_pred_of_truth(root, tmp_path)), "--patients-file", str(lst))
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert words in text and len(text.splitlines()) == 1 and "Traceback" not in text, text


def test_report_on_a_folder_without_results_writes_nothing(root):
    before = tree_hashes(root)
    for folder in (root, root / SMALL):
        res = _cli("report", str(folder))
        assert res.exit_code == 2 and "no patient results" in res.output and "nothing written" in res.output
        assert not (folder / INDEX).exists()
    assert tree_hashes(root) == before


# ------------------------------------------------------------------ 6. tracebacks and terminal injection
@pytest.mark.parametrize("argv, words", [
    (["bench", "--backends", "bogus", "--model", str(MODEL)], "unknown backend 'bogus'"),
    (["bench", "--backends", "torch,", "--batch-sizes", "8,0", "--model", str(MODEL)], "batch sizes must be 1 or more"),
    (["cv", "compare", "{tmp}/missing", "{tmp}/empty"], "missing: no cv.json"),
    (["cv", "compare", "{tmp}/empty", "{tmp}/empty"], "empty: no cv.json"),
    (["cv", "compare", "{tmp}/braces", "{tmp}/braces"], "no scored variants in this cv.json"),
    (["cv", "--out", "{tmp}/cv", "--folds", "0", "--data", "{data}"], "--folds 0: need 2 <= folds"),
], ids=["bench-backends", "bench-batch-0", "cv-compare-missing", "cv-compare-empty", "cv-compare-no-variants",
        "cv-folds-0"])
def test_bad_arguments_are_one_line_exit_2(tmp_path, argv, words):
    import subprocess
    import sys

    from conftest import SHARED

    (tmp_path / "empty").mkdir()
    (tmp_path / "braces").mkdir()
    (tmp_path / "braces" / "cv.json").write_text("{}")
    subs = {"{tmp}": str(tmp_path), "{data}": str(SHARED / "data" / "lgg")}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        args.append(a)
    proc = subprocess.run([str(Path(sys.executable).with_name("segengine")), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1, err


EVIL = "evil\x1b]0;pwned\x07\x1b[2J\rdone 9, skipped 0\u202e"


def test_control_characters_in_names_are_escaped_in_every_line(root, tmp_path):
    """A folder name that re-titles the terminal, clears it and forges a "done" line reaches it escaped."""
    (root / EVIL).mkdir()
    (root / EVIL / "README").write_text("no slices here: this patient is refused, by its folder's name")
    outs = [_run("--patients", str(root), "--out", str(tmp_path / "out")),
            _run("--patient", str(root / EVIL), "--out", str(tmp_path / "out2")),
            _cli("report", str(root / EVIL))]
    for res in outs:
        assert res.exit_code in (1, 2) and "Traceback" not in res.output, res.output
        assert not any(c in res.output for c in "\x1b\x07\r\u202e"), repr(res.output)
        # click itself drops CSI sequences (ESC [2J) on a non-terminal; everything else arrives escaped
        assert "evil\\x1b]0;pwned\\x07" in res.output and "\\rdone 9, skipped 0\\u202e" in res.output, res.output
    assert "done 1" in outs[0].output and "failed 1" in outs[0].output


def test_the_stream_escapes_names_but_keeps_a_progress_bars_redraw():
    import io

    from segengine.engine.core.terminal import SafeTextStream, printable

    assert printable(EVIL) == "evil\\x1b]0;pwned\\x07\\x1b[2J\\rdone 9, skipped 0\\u202e"
    assert printable("TCGA_CS_4941 Müller\tok\n") == "TCGA_CS_4941 Müller\tok\n"
    raw = io.StringIO()
    stream = SafeTextStream(raw)
    stream.write("\rpatients:  50%|#####     | 1/2")  # tqdm redraws its line with a leading carriage return
    stream.write(f"segengine: failed {EVIL}: no slices\n")
    assert raw.getvalue() == ("\rpatients:  50%|#####     | 1/2"
                              "segengine: failed evil\\x1b]0;pwned\\x07\\x1b[2J\\rdone 9, skipped 0\\u202e: no slices\n")
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    SafeTextStream(ascii_out).write("Müller: 23 slices\n")
    ascii_out.flush()
    assert ascii_out.buffer.getvalue() == b"M\\xfcller: 23 slices\n"


@pytest.mark.parametrize("command", ["run", "evaluate", "validate"])
def test_max_memory_default_is_the_limits_default(command):
    from segengine.engine.readers.volume import DEFAULT_LIMITS, DEFAULT_MAX_MEMORY_GB

    option = next(o for o in main.commands[command].params if o.name == "max_memory")
    assert option.default == DEFAULT_MAX_MEMORY_GB and DEFAULT_LIMITS.max_memory == int(DEFAULT_MAX_MEMORY_GB * 1e9)


# The quality estimate (issue 23) added review fields the pages format as numbers and read as a
# dict; the schema check (issue 20) must hold them too, or one planted report crashes the index.
@pytest.mark.parametrize("review", [{"expected_dsc": "high", "interval": [0.7, 0.9], "flag": False},
                                    {"expected_dsc": 0.85, "interval": ["a", "b"], "flag": False},
                                    {"expected_dsc": 0.85, "interval": [0.7], "flag": False},
                                    {"expected_dsc": 0.85, "interval": 0.7, "flag": False},
                                    {"expected_dsc": None, "features": [1, 2], "flag": None},
                                    {"expected_dsc": True, "flag": False},
                                    {"expected_dsc": 0.85, "interval": [0.7, 0.9], "flag": "no"}],
                         ids=["dsc-str", "interval-strs", "interval-short", "interval-number", "features-list",
                              "dsc-bool", "flag-str"])
def test_a_bad_quality_estimate_in_a_report_is_unreadable_not_a_crash(tmp_path, review):
    out = tmp_path / "out"
    good = {"expected_dsc": 0.912, "interval": [0.85, 0.97], "flag": False, "reasons": [],
            "calibration": "out-of-fold", "features": {"copied_channels": []}}
    for name, rep in [("A", _report("A", review=good)), ("B", _report("B", review=review))]:
        (out / name).mkdir(parents=True)
        (out / name / "report.json").write_text(json.dumps(rep))
    res = _cli("report", str(out))
    assert res.exit_code == 0 and "(1 patients" in res.output and "Traceback" not in res.output, res.output
    page = (out / INDEX).read_text()
    assert "1 unreadable report(s): B: review" in page and "expected DSC 0.912" in page


def _strip_table_bomb(path: Path, strips: int) -> None:
    """A real slice rewritten as one page whose StripOffsets/StripByteCounts claim ``strips`` entries
    (8 bytes a strip on disk): parsing the header alone takes tens of bytes a strip in memory."""
    import struct

    import numpy as np
    import tifffile

    rgb = tifffile.imread(path)
    h, w, _ = rgb.shape
    tags = [(256, 4, 1, w), (257, 4, 1, h), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, strips, "offsets"),
            (277, 3, 1, 3), (278, 4, 1, 1), (279, 4, strips, "counts")]
    ifd = 8 + 2 + 12 * len(tags) + 4
    pix = ifd + 8 * strips
    where = {"offsets": ifd, "counts": ifd + 4 * strips}
    out = bytearray(b"II*\0" + struct.pack("<IH", 8, len(tags)))
    for tag, typ, count, val in tags:
        val = where.get(val, val)
        out += struct.pack("<HHI", tag, typ, count) + struct.pack("<HH" if typ == 3 else "<I", *((val, 0) if typ == 3 else (val,)))
    out += struct.pack("<I", 0)
    offsets = pix + np.minimum(np.arange(strips, dtype=np.int64), h - 1) * w * 3
    out += offsets.astype("<u4").tobytes() + np.full(strips, w * 3, "<u4").tobytes() + rgb.tobytes()
    path.write_bytes(bytes(out))


def test_a_slice_file_larger_than_any_slice_is_refused_before_its_header_is_parsed(kaggle_root, tmp_path, monkeypatch):
    from segengine.engine.readers import kaggle as io

    parsed = []
    for ext, reader in list(io.HEADER_READERS.items()):
        monkeypatch.setitem(io.HEADER_READERS, ext, lambda p, reader=reader: parsed.append(p) or reader(p))
    bomb = tmp_path / f"{SMALL}_1.tif"
    shutil.copy(kaggle_root / SMALL / bomb.name, bomb)
    _strip_table_bomb(bomb, 5_000_000)  # 40 MB: ~0.4 GB to parse its header with the fast path, ~0.25 GB with tifffile
    with pytest.raises(io.SliceLimitError, match=r"40,\d{3},\d{3} bytes, more than a slice of at most 1024x1024 "
                                                 r"pixels takes \(\d"):
        io.check_slice_size(bomb, DEFAULT_LIMITS)
    assert parsed == []
    shutil.copy(kaggle_root / SMALL / bomb.name, bomb)
    assert io.check_slice_size(bomb, DEFAULT_LIMITS) == (256, 256, 3) and parsed == [bomb]


@pytest.mark.parametrize("extra", [{"probabilities": "probs.nii.gz"}, {"probabilities": {"file": 5}},
                                   {"dicom": [1, 2]}, {"dicom": {"seg": "seg.dcm"}}, {"dicom": {"seg": {"file": ["a"]}}}],
                         ids=["probabilities-str", "probabilities-file-int", "dicom-list", "dicom-seg-str",
                              "dicom-seg-file-list"])
def test_a_bad_link_field_in_a_report_is_unreadable_not_a_crash(tmp_path, extra):
    """The patient page links the DICOM SEG and the probability map named in report.json; a
    planted report naming them with other types must not crash the re-rendering of the pages."""
    from segengine.engine.outputs.review_page import REVIEW_DIR, VIEWER_DATA

    out = tmp_path / "out"
    for name, rep in [("A", _report("A")), ("B", _report("B", **extra))]:
        (out / name / REVIEW_DIR).mkdir(parents=True)
        (out / name / REVIEW_DIR / VIEWER_DATA).write_text("{}")  # B has a page: it is re-rendered from its report
        (out / name / "report.json").write_text(json.dumps(rep))
    res = _cli("report", str(out))
    assert res.exit_code == 0 and "(1 patients" in res.output and "Traceback" not in res.output, res.output
    assert "1 unreadable report(s): B: " in (out / INDEX).read_text()
