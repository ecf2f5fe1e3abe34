"""Engine hardening, round 4 (issue 30), on real slices from ../shared and real DICOM.

One rule per class, in the module that owns it; each case is a row of a table (MONAI style):
refused with one clear line on stderr and a non-zero exit (never a traceback), nothing partial
written, inputs byte-identical, nothing outside OUT touched."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TRAIN_PATIENT, VAL_PATIENTS, tree_hashes
from segengine.engine.cli import main
from segengine.engine.model.spec import shipped_model_path

MODEL = Path(os.environ.get("SEGENGINE_TEST_MODEL", shipped_model_path()))
SMALL = TRAIN_PATIENT  # 23 slices: the cheapest real patient to segment
SEGENGINE = Path(sys.executable).with_name("segengine")


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_line_refusal(res, code: int = 2) -> str:
    """A CliRunner result that is one `segengine: error:` line and exit ``code``, no traceback."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "Traceback" not in res.output
    errors = [ln for ln in lines if ln.startswith("segengine: error:") or ln.startswith("Error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def root(kaggle_root, tmp_path) -> Path:
    r = tmp_path / "root"
    shutil.copytree(kaggle_root / SMALL, r / SMALL)
    return r


# ------------------------------------------------------------------ 1. no writes outside OUT through third-party telemetry
def _run_onnxruntime(root: Path, out: Path) -> list[str]:
    return [str(SEGENGINE), "run", "--model", str(MODEL), "--threads", "1", "--backend", "onnxruntime",
            "--patient", str(root / SMALL), "--out", str(out)]


def _import_engine_then_onnxruntime(root: Path, out: Path) -> list[str]:
    # a script (or an export, bench or Ray worker process) that imports the engine, then ONNX Runtime itself
    return [sys.executable, "-c", "import segengine.engine.readers.volume, onnxruntime; "
            "onnxruntime.InferenceSession"]


@pytest.mark.parametrize("command", [_run_onnxruntime, _import_engine_then_onnxruntime])
def test_onnxruntime_writes_nothing_under_home_or_tmpdir(command, root, tmp_path):
    """ONNX Runtime's telemetry (1DS) writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ and
    $TMPDIR/.ses through a planted symbolic link; turned off where segengine.engine is imported."""
    home, tmpdir, out = tmp_path / "home", tmp_path / "tmpdir", tmp_path / "out"
    home.mkdir()
    tmpdir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch\n")
    os.symlink(victim, tmpdir / ".ses")
    before = tree_hashes(root)
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmpdir))
    proc = subprocess.run(command(root, out), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "do not touch\n"
    assert sorted(p.name for p in tmpdir.iterdir()) == [".ses"]
    assert list(home.rglob("*")) == [], sorted(map(str, home.rglob("*")))
    assert tree_hashes(root) == before


# ------------------------------------------------------------------ 2. output files: regular or absent, never replaced when special
def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def _link_to_a_fifo(path: Path) -> None:
    os.mkfifo(path.with_name("elsewhere.fifo"))
    os.symlink(path.with_name("elsewhere.fifo"), path)


BENCH = ["bench", "--backends", "torch", "--batch-sizes", "1", "--warmup", "0", "--iterations", "1", "--no-reference",
         "--threads", "1"]


def _unblock_later(fifo: Path):
    """A writer that opens the FIFO (what the code before this rule did) would block forever: after a
    while, open it for reading so such a test fails instead of hanging."""
    import threading

    def drain():
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass

    timer = threading.Timer(60, drain)
    timer.daemon = True
    timer.start()
    return timer


@pytest.mark.parametrize("command, name", [
    ([*BENCH, "--json", "{path}"], "b.json"),
    ([*BENCH, "--plot", "{path}"], "b.png"),
    (["validate", "--data", "{root}", "--backend", "onnxruntime", "--json", "{path}"], "v.json"),
    (["evaluate", "--data", "{root}", "--pred", "{root}", "--out", "{dir}"], "metrics.json"),
    (["evaluate", "--data", "{root}", "--pred", "{root}", "--out", "{dir}"], "dsc.png"),
], ids=["bench-json", "bench-plot", "validate-json", "evaluate-metrics", "evaluate-dsc"])
@pytest.mark.parametrize("plant", [_fifo, _socket, _link_to_a_fifo], ids=["fifo", "socket", "link-to-fifo"])
def test_special_output_file_is_refused_not_replaced(command, name, plant, root, tmp_path):
    target_dir = tmp_path / "outs"
    target_dir.mkdir()
    plant(target_dir / name)
    kind_before = os.lstat(target_dir / name).st_mode
    before = tree_hashes(root)
    subs = {"{path}": str(target_dir / name), "{root}": str(root), "{dir}": str(target_dir)}
    args = [subs.get(a, a) for a in command] + ([] if command[0] == "evaluate" else ["--model", str(MODEL)])
    timer = _unblock_later(target_dir / name)
    try:
        line = _one_line_refusal(_cli(*args))
    finally:
        timer.cancel()
    assert "not a regular file" in line and name in line, line
    assert os.lstat(target_dir / name).st_mode == kind_before  # still the FIFO/socket/link it was
    assert tree_hashes(root) == before


def test_plot_is_written_under_exactly_the_given_name(root, tmp_path):
    """--plot X writes the PNG at X (savefig alone would write X.png, a name never given)."""
    out = tmp_path / "plots"
    out.mkdir()
    res = _cli("bench", "--model", str(MODEL), "--data", str(root), "--num-patients", "1", "--backends", "torch",
               "--batch-sizes", "1", "--threads", "1", "--warmup", "0", "--iterations", "1", "--no-reference",
               "--plot", str(out / "chart"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["chart"]
    assert (out / "chart").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ 5. wrong results silently
@pytest.fixture(scope="module")
def small_segmentation(kaggle_root):
    """TRAIN_PATIENT read and segmented by the shipped model (torch): the real image, probabilities, mask."""
    from segengine.engine.inference import registry
    from segengine.engine.job.patient_job import segment
    from segengine.engine.model.spec import load_model_spec
    from segengine.engine.readers.registry import read_patient

    volume = read_patient(kaggle_root / SMALL)
    with registry.create("torch", load_model_spec(MODEL), threads=1) as backend:
        seg = segment(volume, backend)
    return volume.image, seg.prob, seg.mask


def _contrast_curved_input(image, prob, mask):  # a display curve (gamma 2) on every sequence
    # the shipped plan v2 model compares scale-free contrast (a darker or 12-bit scan is no anomaly);
    # a curve that squeezes the head's mean against its bright level is one
    curved = np.rint(255.0 * (image.astype(np.float64) / 255.0) ** 2.0).astype(image.dtype)
    return curved, prob, mask, "contrast unlike the training patients'"


def _half_the_mass_removed(image, prob, mask):  # post-processing kept only the upper half of the tumor's slices
    tumor = np.flatnonzero(mask.any(axis=(1, 2)))
    kept = mask.copy()
    kept[tumor[len(tumor) // 2]:] = False
    return image, prob, kept, "post-processing removed"



@pytest.mark.parametrize("mode, ensemble, tta", [("single", None, False), ("tta", None, True),
                                                 ("ensemble", True, False)])
@pytest.mark.parametrize("anomaly", [_contrast_curved_input, _half_the_mass_removed])
def test_an_anomaly_flags_the_patient_in_every_mode(small_segmentation, anomaly, mode, ensemble, tta):
    """Each mode's calibration weighs intensity and removed mass differently (--tta's and the
    ensemble's barely): the anomaly itself sets the flag, with its reason, in every mode."""
    from segengine.engine.inference.ensemble import load_plan
    from segengine.engine.postprocessing.quality import Review, summary_text

    image, prob, mask, words = anomaly(*small_segmentation)
    review = Review.for_plan(load_plan(None if ensemble else str(MODEL), ensemble, tta))
    assert review.mode == mode and review.model is not None
    out = review.assess(image, prob, mask, views_agreement=None if mode == "single" else 0.98)
    assert out["flag"] is True, out
    assert any(words in r for r in out["reasons"]), out["reasons"]
    assert "REVIEW" in summary_text(out)
    # the same patient unchanged is not flagged for it
    plain = review.assess(*small_segmentation, views_agreement=None if mode == "single" else 0.98)
    assert not any(words in r for r in plain["reasons"])


def test_an_anomaly_flags_even_an_uncalibrated_mode(small_segmentation):
    from segengine.engine.postprocessing.quality import assess, quality_features

    image, prob, mask, _ = _half_the_mass_removed(*small_segmentation)
    out = assess(quality_features(image, prob, mask), None, "ensemble")
    assert out["expected_dsc"] is None and out["flag"] is True and "uncalibrated" in out["note"]


@pytest.fixture(scope="module")
def small_study(kaggle_root, tmp_path_factory):
    """TRAIN_PATIENT as a real DICOM study (tests/dicom_study.py: one MR series per channel)."""
    from dicom_study import make_study

    dest = tmp_path_factory.mktemp("small-dicom") / "study"
    return dest, make_study(kaggle_root / TRAIN_PATIENT, dest, "per-series", "identity", 0.0)


def _rescale_every_flair_image(folder: Path, study, slope, intercept) -> None:
    import pydicom

    for p in study.files["flair"]:
        mine = folder / p.relative_to(study.folder)
        ds = pydicom.dcmread(mine)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(mine, enforce_file_format=True)


# (slope, intercept, refused with these words or None: read back exactly as the plain study)
RESCALES = [(1, 1e10, "RescaleIntercept 1e+10"), (1, -1e10, "RescaleIntercept -1e+10"),
            (1e-300, 0, "RescaleSlope 1e-300"), (-1e-300, 0, "RescaleSlope -1e-300"), (1e30, 0, "RescaleSlope 1e+30"),
            (0.5, 2e5, None), (1, -4e6, None)]


@pytest.mark.parametrize("slope, intercept, words", RESCALES, ids=[f"{s:g}-{i:g}" for s, i, _ in RESCALES])
def test_dicom_rescale_is_bounded_and_exact(small_study, tmp_path, slope, intercept, words):
    from segengine.engine.readers.registry import read_patient

    src, study = small_study
    folder = tmp_path / "study"
    shutil.copytree(src, folder)
    _rescale_every_flair_image(folder, study, slope, intercept)
    before = tree_hashes(folder)
    if words is None:  # min..max per series: any affine rescale within the bounds gives the same image
        np.testing.assert_array_equal(read_patient(folder).image, read_patient(src).image)
        return
    out = tmp_path / "out"
    line = _one_line_refusal(_cli("run", "--model", str(MODEL), "--threads", "1", "--patient", str(folder),
                                  "--out", str(out)))
    assert words in line and "give no usable image" in line, line
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], ["index.html"])
    assert tree_hashes(folder) == before


def _kaggle_named(patient_id: str, folder_name: str | None = None):
    def make(kaggle_root: Path, dest_root: Path, small_study) -> Path:
        """A real patient's slices renamed to ``patient_id``_<n>.tif in ROOT/``folder_name``."""
        src, dest = kaggle_root / SMALL, dest_root / (folder_name or patient_id)
        dest.mkdir(parents=True)
        for f in src.iterdir():
            shutil.copy(f, dest / f.name.replace(src.name, patient_id, 1))
        return dest
    return make


def _dicom_study_named(patient_id: str):
    def make(kaggle_root: Path, dest_root: Path, small_study) -> Path:
        dest = dest_root / patient_id  # a study's id is its folder's name
        shutil.copytree(small_study[0], dest)
        return dest
    return make


@pytest.mark.parametrize("patient_id, make", [
    ("index.html", _kaggle_named("index.html")), ("INDEX.HTML", _kaggle_named("INDEX.HTML")),
    ("case.nii.gz", _kaggle_named("case.nii.gz", "slices")), ("index.html", _dicom_study_named("index.html")),
], ids=["kaggle-index.html", "kaggle-INDEX.HTML", "kaggle-case.nii.gz", "dicom-index.html"])
def test_a_patient_id_naming_an_out_file_is_refused(kaggle_root, small_study, tmp_path, patient_id, make):
    """OUT/index.html (the review page) and OUT/<case>.nii.gz (nnU-Net-layout predictions) are OUT's own
    files: a patient with such an id would turn them into its folder."""
    folder = make(kaggle_root, tmp_path / "root", small_study)
    before = tree_hashes(folder)
    out = tmp_path / "out"
    line = _one_line_refusal(_cli("run", "--model", str(MODEL), "--threads", "1", "--patient", str(folder),
                                  "--out", str(out)))
    assert f"patient id {patient_id!r}" in line and "writes in OUT" in line, line
    assert not out.exists() or not any(p.is_dir() for p in out.iterdir())
    assert tree_hashes(folder) == before


def test_reserved_names_cover_the_review_page():
    from segengine.engine.outputs.review_page import INDEX_PAGE
    from segengine.engine.readers.volume import RESERVED_OUT_NAMES

    assert INDEX_PAGE in RESERVED_OUT_NAMES


@pytest.mark.parametrize("argv", [
    ["evaluate", "--data", "{root}", "--pred", "{root}", "--threshold", "nan"],
    ["evaluate", "--data", "{root}", "--pred", "{root}", "--threshold", "inf"],
    ["evaluate", "--data", "{root}", "--pred", "{root}", "--max-memory", "nan"],
    ["evaluate", "--data", "{root}", "--model", "{model}", "--threshold", "NaN"],
    ["run", "--patient", "{patient}", "--out", "{out}", "--max-memory", "nan"],
    ["run", "--patient", "{patient}", "--out", "{out}", "--max-memory", "-nan"],
    ["validate", "--data", "{root}", "--backend", "onnxruntime", "--max-memory", "nan"],
], ids=["evaluate-threshold-nan", "evaluate-threshold-inf", "evaluate-max-memory-nan", "evaluate-model-threshold-nan",
        "run-max-memory-nan", "run-max-memory-minus-nan", "validate-max-memory-nan"])
def test_nan_and_inf_are_refused_in_every_float_option(root, tmp_path, argv):
    subs = {"{root}": str(root), "{model}": str(MODEL), "{patient}": str(root / SMALL), "{out}": str(tmp_path / "out")}
    before = tree_hashes(root)
    res = _cli(*[subs.get(a, a) for a in argv])
    line = _one_line_refusal(res)
    assert "is not a finite number" in line or "not in the range" in line, line
    assert not (tmp_path / "out").exists()
    assert tree_hashes(root) == before


# ------------------------------------------------------------------ 4./6. dataset.json read with a cap, never a traceback
@pytest.fixture(scope="module")
def nnunet_case(kaggle_root, tmp_path_factory) -> Path:
    """TRAIN_PATIENT as an nnU-Net-named case (<case>_0000/_0001/_0002.nii.gz, FLAIR first per its dataset.json)."""
    from segengine.bench.nifti_agreement import write_three_files
    from segengine.engine.readers.registry import read_patient

    base = tmp_path_factory.mktemp("nnunet")
    write_three_files(read_patient(kaggle_root / SMALL).image, base / "nii3", "nii3")
    case = base / "case"
    case.mkdir()
    for i, seq in enumerate(["flair", "pre", "post"]):
        shutil.copy(base / "nii3" / f"nii3_{seq}.nii.gz", case / f"case_{i:04d}.nii.gz")
    return case


CHANNELS = {"0": "FLAIR", "1": "T1", "2": "T1Gd"}


def _padded_past_the_cap(path: Path) -> None:  # valid JSON, 17 MiB of it: read whole before
    from segengine.engine.readers.nnunet import DATASET_JSON_MAX_BYTES

    path.write_text(json.dumps({"channel_names": CHANNELS}) + " " * (DATASET_JSON_MAX_BYTES + (1 << 20)))


def _nested_deeply(path: Path) -> None:  # RecursionError in json.loads before
    path.write_text('{"channel_names": ' + "[" * 200_000 + "]" * 200_000 + "}")


@pytest.mark.parametrize("make, words", [(_padded_past_the_cap, "more than the limit"),
                                         (_nested_deeply, "nested too deeply")], ids=["17-MiB", "nested"])
def test_dataset_json_is_read_with_a_cap(nnunet_case, tmp_path, make, words):
    case = tmp_path / "case"
    shutil.copytree(nnunet_case, case)
    make(case / "dataset.json")
    before = tree_hashes(case)
    out = tmp_path / "out"
    line = _one_line_refusal(_cli("run", "--model", str(MODEL), "--threads", "1", "--patient", str(case),
                                  "--out", str(out)))
    assert "dataset.json" in line and words in line, line
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], ["index.html"])
    assert tree_hashes(case) == before


# ------------------------------------------------------------------ 6. tracebacks
@pytest.fixture(scope="module")
def small_result(kaggle_root, tmp_path_factory) -> Path:
    """OUT holding TRAIN_PATIENT's real result (torch)."""
    out = tmp_path_factory.mktemp("small-result") / "out"
    res = _cli("run", "--model", str(MODEL), "--threads", "1", "--backend", "torch", "--patient",
               str(kaggle_root / SMALL), "--out", str(out))
    assert res.exit_code == 0, res.output
    return out


def _unreadable(folder: Path, monkeypatch) -> None:
    """``folder`` without read or search permission; as root (who reads everything) its entries fail as they
    would for anyone else: EACCES from lstat, stat and open below it."""
    folder.chmod(0)
    if os.geteuid() != 0:
        return
    import errno

    inside = str(folder) + os.sep

    def guarded(real):
        def call(path, *args, **kwargs):
            if str(path).startswith(inside):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, *args, **kwargs)
        return call

    for name in ("lstat", "stat", "open", "scandir", "listdir"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name)))


def test_report_lists_an_unreadable_patient_folder_instead_of_a_traceback(small_result, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(small_result, out)
    (out / "LOCKED").mkdir()
    (out / "LOCKED" / "report.json").write_text("{}")
    try:
        _unreadable(out / "LOCKED", monkeypatch)
        res = _cli("report", str(out))
    finally:
        monkeypatch.undo()
        (out / "LOCKED").chmod(0o755)
    assert res.exit_code == 0 and "Traceback" not in res.output, (res.output, res.exception)
    assert "(1 patients, " in res.output
    page = (out / "index.html").read_text()
    assert "1 unreadable report(s): LOCKED: cannot be read" in page and SMALL in page


def _list_fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "train.txt")
    return tmp / "train.txt"


def _list_missing(tmp: Path) -> Path:
    return tmp / "no-such-list.txt"


def _list_naming_an_absent_patient(tmp: Path) -> Path:
    (tmp / "train.txt").write_text(f"{SMALL}\nTCGA_XX_0000_19000101\n")
    return tmp / "train.txt"


@pytest.mark.parametrize("make, words", [(_list_fifo, "not a regular file"), (_list_missing, "No such file"),
                                         (_list_naming_an_absent_patient, "TCGA_XX_0000_19000101")],
                         ids=["fifo", "missing", "absent-patient"])
def test_train_refuses_bad_patient_lists_in_one_line(kaggle_root, tmp_path, make, words):
    lists = tmp_path / "lists"
    lists.mkdir()
    train_list = make(lists)
    (lists / "val.txt").write_text(VAL_PATIENTS[0] + "\n")
    run = tmp_path / "run"
    before = tree_hashes(kaggle_root)
    proc = subprocess.run([str(SEGENGINE), "train", "--data", str(kaggle_root), "--out", str(run), "--train-list",
                           str(train_list), "--val-list", str(lists / "val.txt"), "--steps", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and words in err, err
    assert err.startswith("segengine train: error:")
    assert not run.exists()
    assert tree_hashes(kaggle_root) == before


# ------------------------------------------------------------------ 3. OpenVINO's compiled-model cache: regular files only
def _blob_fifo(blob: Path) -> None:
    os.mkfifo(blob)


def _blob_link_to_a_fifo(blob: Path) -> None:
    os.mkfifo(blob.with_name("elsewhere"))
    os.symlink(blob.with_name("elsewhere"), blob)


@pytest.mark.parametrize("plant", [_blob_fifo, _blob_link_to_a_fifo], ids=["fifo", "link-to-fifo"])
def test_a_fifo_in_the_openvino_cache_does_not_hang_the_run(root, tmp_path, plant):
    pytest.importorskip("openvino")
    cache = tmp_path / "cache"
    env = {**os.environ, "SEGENGINE_CACHE_DIR": str(cache)}

    def run(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(SEGENGINE), "run", "--model", str(MODEL), "--threads", "1", "--backend", "openvino",
                               "--patient", str(root / SMALL), "--out", str(out)],
                              capture_output=True, text=True, env=env, timeout=180)  # a hang fails here

    first = run(tmp_path / "first")
    assert first.returncode == 0, first.stderr
    blobs = sorted((cache / "openvino").glob("*.blob"))
    assert blobs, sorted((cache / "openvino").iterdir())
    for blob in blobs:
        blob.unlink()
        plant(blob)
    before = tree_hashes(root)
    second = run(tmp_path / "second")
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr
    masks = sorted(p.name for p in (tmp_path / "first" / SMALL).glob("*_mask.tif"))
    assert masks and all(_sha(tmp_path / "first" / SMALL / m) == _sha(tmp_path / "second" / SMALL / m) for m in masks)
    for blob in blobs:  # compiled without the cache: the planted entries left as they were
        assert not os.path.isfile(blob) and os.path.lexists(blob)
    assert tree_hashes(root) == before


# ------------------------------------------------------------------ 4. DICOM headers and Deflated payloads: memory checked before
def _deflated(path: Path, extra_zeros: int = 0) -> None:
    """Rewrite a real DICOM file in the Deflated transfer syntax (with ``extra_zeros`` bytes of a private
    OB value: megabytes that deflate to kilobytes)."""
    import pydicom

    ds = pydicom.dcmread(path)
    if extra_zeros:
        block = ds.private_block(0x0009, "SEGENGINE TEST", create=True)
        block.add_new(0x10, "OB", bytes(extra_zeros))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def _tiny_private_elements(path: Path, n: int) -> None:
    """``n`` private elements of 2 bytes each, in front of the pixel data of a real explicit-VR file
    (groups 7FD1..7FDF: creators, then elements; 10 bytes each on disk)."""
    import struct

    data = path.read_bytes()
    at = data.rindex(b"\xe0\x7f\x10\x00")  # the PixelData element
    parts, left = [], n
    for group in range(0x7FD1, 0x7FE0, 2):
        if left <= 0:
            break
        parts += [struct.pack("<HH2sH", group, c, b"LO", 8) + b"SEGTEST " for c in range(0x10, 0x100)]
        count = min(left, 0xF000)
        parts += [struct.pack("<HH2sH", group, e, b"LO", 2) + b"AB" for e in range(0x1000, 0x1000 + count)]
        left -= count
    path.write_bytes(data[:at] + b"".join(parts) + data[at:])


def test_deflated_study_within_the_budget_reads_back_the_same_slices(small_study, tmp_path):
    from segengine.engine.readers.registry import read_patient

    src, study = small_study
    folder = tmp_path / "study"
    shutil.copytree(src, folder)
    for p in study.files["flair"][:3]:
        _deflated(folder / p.relative_to(study.folder))
    np.testing.assert_array_equal(read_patient(folder).image, read_patient(src).image)


@pytest.mark.parametrize("edit, flags, words", [
    (lambda p: _deflated(p, 80_000_000), ["--max-memory", "0.06"], "a Deflated DICOM file that inflates to more than 0.06 GB"),
    (lambda p: _tiny_private_elements(p, 130_000), [], "a DICOM header of more than 1,048,576 bytes"),
], ids=["deflate-bomb", "130k-tiny-elements"])
def test_dicom_headers_are_read_within_a_cap(small_study, tmp_path, edit, flags, words):
    src, study = small_study
    folder = tmp_path / "study"
    shutil.copytree(src, folder)
    edit(folder / study.files["flair"][4].relative_to(study.folder))
    before = tree_hashes(folder)
    out = tmp_path / "out"
    line = _one_line_refusal(_cli("run", "--model", str(MODEL), "--threads", "1", "--patient", str(folder),
                                  "--out", str(out), *flags))
    assert words in line, line
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], ["index.html"])
    assert tree_hashes(folder) == before


# ------------------------------------------------------------------ class 7: explicit backend over a FAIL member
def test_explicit_backend_with_a_failed_ensemble_member_is_refused(kaggle_root, tmp_path):
    """An ensemble run on a backend that one member's recorded verdict FAILED is one line, exit 2,
    nothing written; auto (which never picks it) still runs. The FAIL is planted in a copy."""
    from segengine.engine.inference.ensemble import shipped_ensemble_path

    manifest = shipped_ensemble_path()
    folder = tmp_path / "models"
    folder.mkdir()
    doc = json.loads(manifest.read_text())
    for member in doc["members"]:
        stem = member[: -len(".pt")]
        for f in manifest.parent.glob(stem + "*"):
            shutil.copy(f, folder / f.name)
    shutil.copy(manifest, folder / manifest.name)
    stem = doc["members"][0][: -len(".pt")]
    side_path = folder / f"{stem}.int8.onnx.json"
    side = json.loads(side_path.read_text())
    from segengine.engine.inference.verdict import verdict_key

    side[verdict_key("onnxruntime-int8")]["passed"] = False  # ONNX Runtime's verdict on the INT8 file
    side_path.write_text(json.dumps(side))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--patient", str(kaggle_root / VAL_PATIENTS[1]), "--out", str(out),
                                    "--ensemble", str(folder / manifest.name), "--backend", "onnxruntime-int8",
                                    "--threads", "1"])
    assert res.exit_code == 2, res.output
    assert "failed `segengine validate` for ensemble member" in res.output and stem in res.output
    assert len(res.output.strip().splitlines()) == 1 and not any(out.rglob("*.*"))


@pytest.mark.parametrize("command", [["run", "--patient", "P"], ["evaluate", "--data", "D"]])
def test_empty_out_is_refused_not_the_current_folder(command, tmp_path, monkeypatch):
    """``--out ""`` would be "." to click.Path: refused in one line before anything is read."""
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, [*command, "--out", ""])
    assert res.exit_code == 2 and "is empty: name the output folder" in res.output
    assert list(tmp_path.iterdir()) == []


def test_threads_beyond_the_cores_are_capped_with_a_note(kaggle_root, tmp_path):
    from segengine.engine.cli import available_cores

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--patient", str(kaggle_root / VAL_PATIENTS[1]), "--out", str(out),
                                    "--backend", "torch", "--threads", "256"])
    assert res.exit_code == 0, res.output
    cores = available_cores()
    if cores < 256:
        assert f"--threads 256 is more than the {cores} cores available here; using {cores}" in res.output
    assert json.loads(next(out.rglob("report.json")).read_text())["backend"] == "torch"
