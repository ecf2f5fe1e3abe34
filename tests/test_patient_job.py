"""The patient job under attack: overlapping OUT, odd ids and files, limits, full disks, signals,
killed writers and concurrent runs. Every case: one line, the right exit code, nothing partial
in OUT, every input byte-identical (sha256 before and after). Real slices from ../shared."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from conftest import TRAIN_PATIENT, VAL_PATIENTS, copy_model, tree_hashes
from segengine.engine.readers import kaggle as io
from segengine.engine.cli import main
from segengine.engine.model.spec import shipped_model_path
from segengine.engine.core.fsguard import mark_owned
from segengine.engine.outputs.results_dir import TEMP_ENTRY, atomic_dir, recover_interrupted
from segengine.engine.core.errors import PatientBusyError
from segengine.engine.outputs.results_dir import PatientLock, tidy_out
from segengine.engine.outputs.review_page import INDEX_PAGE as INDEX
from segengine.engine.outputs.masks import write_mask_slices
from segengine.engine.readers.registry import read_patient

MODEL = Path(os.environ.get("SEGENGINE_TEST_MODEL", shipped_model_path()))
SMALL = TRAIN_PATIENT  # 23 slices: the cheapest real patient to segment
EXE = Path(sys.executable).with_name("segengine")


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _run(*args: str):
    return _cli("run", "--model", str(MODEL), *args)


def _leftovers(out: Path) -> list[str]:
    """Temp folders, lock files or anything hidden in OUT."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.exists() else []


def _one_line(res, words: str) -> None:
    text = res.output.strip()
    assert words in text and "Traceback" not in text, text
    assert len(text.splitlines()) == 1, text


@pytest.fixture()
def root(kaggle_root, tmp_path) -> Path:
    """ROOT/<small patient>, a private copy."""
    r = tmp_path / "root"
    shutil.copytree(kaggle_root / SMALL, r / SMALL)
    return r


# ------------------------------------------------------------------ ill cases as one table
def _slice(p: Path, n: int = 5) -> Path:
    return p / f"{p.name}_{n}.tif"


def _mask(p: Path, n: int = 5) -> Path:
    return p / f"{p.name}_{n}_mask.tif"


def _out_is_the_input(p, out):  # the data-loss case: OUT/<id> == ROOT/<id>
    return ["--patient", str(p), "--out", str(p.parent), "--overwrite"]


def _out_entry_links_to_the_input(p, out):
    out.mkdir()
    (out / p.name).symlink_to(p, target_is_directory=True)
    return ["--patient", str(p), "--out", str(out), "--overwrite"]


def _slice_links_into_out(p, out):  # replacing OUT/<id> would delete a file the input points at
    (out / p.name).mkdir(parents=True)
    kept = out / p.name / "kept.tif"
    shutil.move(_slice(p), kept)
    _slice(p).symlink_to(kept)
    return ["--patient", str(p), "--out", str(out), "--overwrite"]


def _dot_patient_id(p, out):
    for f in list(p.iterdir()):
        f.rename(p / f.name.replace(p.name, ".."))
    return []


def _huge_header(p, out):  # 20000 x 20000 claimed by a 300-byte file: refused without decoding
    tifffile.imwrite(_slice(p), np.zeros((64, 64, 3), np.uint8), compression="zlib")
    with tifffile.TiffFile(_slice(p), mode="r+b") as tf:
        tf.pages[0].tags["ImageWidth"].overwrite(20000)
        tf.pages[0].tags["ImageLength"].overwrite(20000)
    return []


def _tiny_slice(p, out):
    tifffile.imwrite(_slice(p), tifffile.imread(_slice(p))[:3, :3])
    return []


def _too_many_slices(p, out):
    return ["--max-slices", "10"]


def _smaller_max_side(p, out):
    return ["--max-side", "128"]


def _grayscale(p, out):
    tifffile.imwrite(_slice(p), tifffile.imread(_slice(p))[..., 1])  # FLAIR only
    return []


def _nonbinary_mask(p, out):
    m = tifffile.imread(_mask(p))
    m[:4, :4] = 128  # besides 0 and 255 below
    m[4:8, :4] = 255
    tifffile.imwrite(_mask(p), m)
    return []


def _fifo_slice(p, out):
    _slice(p).unlink()
    os.mkfifo(_slice(p))
    return []


def _dangling_link_slice(p, out):
    _slice(p).unlink()
    _slice(p).symlink_to(p / "gone.tif")
    return []


def _model_edit(tmp_path: Path, edit) -> Path:
    w = copy_model(MODEL, tmp_path / "model", exports=True)
    edit(w)
    return w


def _corrupt_sidecar(p, out):
    w = _model_edit(out.parent, lambda w: w.with_name(w.stem + ".onnx.json").write_text('{"kind": "onnx", '))
    return ["--model", str(w), "--backend", "onnxruntime"]


def _sidecar_without_sha(p, out):
    """Issue 30: a sidecar whose export hash was removed would skip the export's file check."""
    def edit(w):
        side = w.with_name(w.stem + ".onnx.json")
        side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "sha256"}))
    return ["--model", str(_model_edit(out.parent, edit)), "--backend", "onnxruntime"]


def _sidecar_wrong_types(p, out):
    def edit(w):
        side = w.with_name(w.stem + ".onnx.json")
        side.write_text(json.dumps({**json.loads(side.read_text()), "source_sha256": 12345}))
    return ["--model", str(_model_edit(out.parent, edit)), "--backend", "onnxruntime"]


def _card_input_size(p, out):
    def edit(w):
        card = json.loads(w.with_suffix(".json").read_text())
        w.with_suffix(".json").write_text(json.dumps({**card, "input_size": 100000}))
    return ["--model", str(_model_edit(out.parent, edit)), "--backend", "torch"]


def _card_edit(**arch):
    def edit(p, out):
        def change(w):
            card = json.loads(w.with_suffix(".json").read_text())
            card["architecture"].update(arch)
            w.with_suffix(".json").write_text(json.dumps(card))
        return ["--model", str(_model_edit(out.parent, change)), "--backend", "torch"]
    edit.__name__ = "_card_" + "_".join(f"{k}_{v}" for k, v in arch.items())
    return edit


# (damage, words): each damages ROOT/<patient> (or OUT) and returns extra args, or a full argv, for `run`
CASES = [
    (_out_is_the_input, "is the input"),
    (_out_entry_links_to_the_input, "is the input"),
    (_slice_links_into_out, "contains the input"),
    (_dot_patient_id, "starts with '.'"),
    (_huge_header, "20000x20000 pixels, larger than the limit of 1024"),
    (_tiny_slice, "3x3 pixels, smaller than the limit of 32"),
    (_too_many_slices, "23 slices, more than the limit of 10"),
    (_smaller_max_side, "larger than the limit of 128"),
    (_grayscale, "grayscale slice, expected 3 color channels (pre-contrast, FLAIR, post-contrast)"),
    (_nonbinary_mask, "expected a binary mask: 0 for background and one value"),
    (_fifo_slice, "not a regular file (FIFO"),
    (_dangling_link_slice, "dangling symbolic link"),
    (_corrupt_sidecar, "unreadable sidecar"),
    (_sidecar_wrong_types, "source_sha256 must be a SHA-256"),
    (_sidecar_without_sha, "sha256 must be a SHA-256 (64 lowercase hex digits), got 'None'"),
    (_card_input_size, "input_size = 100000 is outside 32..1024"),
    (_card_edit(base_channels=1000000), "base_channels = 1000000 is outside 1..256"),
    (_card_edit(base_channels="16"), "base_channels is '16' (str), expected int"),
    (_card_edit(deep_supervision=1), "deep_supervision is 1 (int), expected bool"),
    (_card_edit(width=3), "has no parameter 'width'"),
]


@pytest.mark.parametrize("damage, words", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_ill_case_is_one_line_and_touches_nothing(root, tmp_path, damage, words):
    patient = root / SMALL
    out = tmp_path / "out"
    extra = damage(patient, out)
    argv = extra if extra and extra[0] == "--patient" else ["--patient", str(patient), "--out", str(out), *extra]
    before = tree_hashes(root)
    out_before = tree_hashes(out) if out.exists() else {}
    res = _run(*argv) if "--model" not in argv else _cli("run", *argv)
    assert res.exit_code == 2, res.output
    _one_line(res, words)
    assert tree_hashes(root) == before  # every input byte-identical
    if out.exists() and out != root:
        assert tree_hashes(out) == out_before and not _leftovers(out)


def test_data_loss_case_keeps_every_input_byte(kaggle_root, tmp_path):
    """`run --patient ROOT/P --out ROOT --overwrite` used to replace P's slices by results; also via --patients."""
    root = tmp_path / "root"
    shutil.copytree(kaggle_root / SMALL, root / SMALL)
    before = tree_hashes(root)
    for argv in (["--patient", str(root / SMALL), "--out", str(root), "--overwrite"],
                 ["--patient", str(root / SMALL) + "/", "--out", str(root / SMALL / ".."), "--overwrite"],
                 ["--patients", str(root), "--out", str(root), "--overwrite"]):
        res = _run(*argv)
        assert res.exit_code == 2 and "input" in res.output and "Traceback" not in res.output, res.output
    assert tree_hashes(root) == before


# ------------------------------------------------------------------ io rules on real slices
def test_macos_metadata_files_are_not_slices(kaggle_root, tmp_path):
    p = tmp_path / SMALL
    shutil.copytree(kaggle_root / SMALL, p)
    (p / f"._{SMALL}_1.tif").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    pid, images, _ = io.list_slices(p)
    assert pid == SMALL and len(images) == 23


@pytest.mark.parametrize("values, ok", [((0,), True), ((0, 255), True), ((0, 1), True), ((7,), True),
                                        ((0, 1, 255), False), ((0, 128, 255), False)])
def test_mask_values(kaggle_root, tmp_path, values, ok):
    p = tmp_path / SMALL
    shutil.copytree(kaggle_root / SMALL, p)
    m = np.zeros((256, 256), np.uint8)
    for i, v in enumerate(values):
        m[i * 10 : i * 10 + 10] = v
    tifffile.imwrite(_mask(p), m)
    if ok:
        vol = read_patient(p)
        assert set(np.unique(vol.mask[4])) == ({0, 255} if any(values) else {0})
    else:
        with pytest.raises(io.SliceFormatError, match="binary mask"):
            read_patient(p)


def test_folder_name_and_slice_prefix_differ_resume_uses_the_id(kaggle_root, tmp_path):
    """Skip/resume and results use one id (the slices' prefix), whatever the folder is called."""
    root = tmp_path / "root"
    shutil.copytree(kaggle_root / SMALL, root / "renamed-folder")
    out = tmp_path / "out"
    first = _run("--patients", str(root), "--out", str(out))
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.iterdir()) == [SMALL, INDEX]
    report = (out / SMALL / "report.json").read_bytes()
    again = _run("--patients", str(root), "--out", str(out))
    assert again.exit_code == 0 and "done 0, skipped 1 (results exist)" in again.output, again.output
    single = _run("--patient", str(root / "renamed-folder"), "--out", str(out))
    assert single.exit_code == 2 and "results exist" in single.output
    assert (out / SMALL / "report.json").read_bytes() == report


# ------------------------------------------------------------------ batches survive bad patients
def test_batch_goes_on_past_a_patient_over_the_limits(kaggle_root, tmp_path):
    root = tmp_path / "root"
    for p in (SMALL, VAL_PATIENTS[0]):
        shutil.copytree(kaggle_root / p, root / p)
    _huge_header(root / VAL_PATIENTS[0], None)
    before = tree_hashes(root)
    res = _run("--patients", str(root), "--out", str(tmp_path / "out"))
    assert res.exit_code == 1 and "done 1" in res.output and "failed 1" in res.output
    assert "larger than the limit" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [SMALL, INDEX]
    assert tree_hashes(root) == before


def test_full_disk_stops_the_batch_and_keeps_what_completed(kaggle_root, tmp_path, monkeypatch):
    """ENOSPC while writing the second patient: the first stays complete, nothing partial, the third never starts."""
    import segengine.engine.outputs.writer as outputs

    root = tmp_path / "root"
    patients = sorted([SMALL, *VAL_PATIENTS])
    for p in patients:
        shutil.copytree(kaggle_root / p, root / p)
    real = write_mask_slices
    calls = []

    def fill_disk_on_second(folder, pid, numbers, mask):
        calls.append(pid)
        if len(calls) == 2:
            real(folder, pid, numbers[:2], mask[:2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(folder, pid, numbers, mask)

    monkeypatch.setattr(outputs, "write_mask_slices", fill_disk_on_second)
    out = tmp_path / "out"
    res = _run("--patients", str(root), "--out", str(out))
    assert res.exit_code == 1, res.output
    assert "no space left on device" in res.output and str(out) in res.output
    assert "done 1" in res.output and "not started 1 (stopped: disk full)" in res.output
    assert "Traceback" not in res.output and calls == patients[:2]
    assert sorted(p.name for p in out.iterdir()) == [patients[0], INDEX]  # complete first patient only, no temp folder
    assert (out / patients[0] / "report.json").exists()


def test_full_disk_single_patient_is_one_line(root, tmp_path, monkeypatch):
    import segengine.engine.outputs.writer as outputs

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs, "write_mask_slices", full)
    out = tmp_path / "out"
    res = _run("--patient", str(root / SMALL), "--out", str(out))
    assert res.exit_code == 1
    _one_line(res, f"{out}: no space left on device")
    assert list(out.iterdir()) == []


@pytest.fixture()
def tiny_disk(tmp_path):
    """A real 3 MB tmpfs: room for one patient's results, not for two."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {res.stderr.strip()[:80]}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_replace_on_a_really_full_disk_keeps_the_old_result(root, tiny_disk):
    out = tiny_disk / "out"
    first = _run("--patient", str(root / SMALL), "--out", str(out))
    assert first.exit_code == 0, first.output
    kept = tree_hashes(out / SMALL)
    res = _run("--patient", str(root / SMALL), "--out", str(out), "--overwrite")  # old + new do not fit
    assert res.exit_code == 1
    _one_line(res, f"{out}: no space left on device")
    assert tree_hashes(out / SMALL) == kept and sorted(p.name for p in out.iterdir()) == [SMALL, INDEX]


def test_memory_error_is_one_line_and_the_batch_goes_on(kaggle_root, tmp_path, monkeypatch):
    import segengine.engine.job.patient_job as runner

    root = tmp_path / "root"
    for p in (SMALL, VAL_PATIENTS[0]):
        shutil.copytree(kaggle_root / p, root / p)
    real = runner.preprocess_patient

    def oom_on_small(vol, *a):
        if vol.patient_id == SMALL:
            raise MemoryError
        return real(vol, *a)

    monkeypatch.setattr(runner, "preprocess_patient", oom_on_small)
    out = tmp_path / "out"
    res = _run("--patients", str(root), "--out", str(out))
    assert res.exit_code == 1 and "out of memory" in res.output and "done 1" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == [VAL_PATIENTS[0], INDEX]


# ------------------------------------------------------------------ output paths checked first
@pytest.mark.parametrize("argv, words", [
    (["bench", "--json", "{missing}/b.json", "--backends", "torch"], "does not exist"),
    (["bench", "--plot", "{tmp}", "--backends", "torch"], "names a folder"),
    (["validate", "--data", "{tmp}", "--backend", "onnxruntime", "--json", "{file}/v.json"], "is not a folder"),
    (["evaluate", "--data", "{tmp}", "--pred", "{tmp}", "--out", "{file}/eval"], "not writable"),
], ids=["bench-json", "bench-plot", "validate-json", "evaluate-out"])
def test_unwritable_output_paths_fail_before_the_work(tmp_path, argv, words):
    (tmp_path / "a-file").write_text("x")
    subs = {"{missing}": str(tmp_path / "missing"), "{tmp}": str(tmp_path), "{file}": str(tmp_path / "a-file")}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        args.append(a)
    res = _cli(*args)
    assert res.exit_code == 2
    _one_line(res, words)


# ------------------------------------------------------------------ signals, locks, umask
def test_sigterm_while_writing_exits_143_and_leaves_nothing(root, tmp_path, monkeypatch):
    import segengine.engine.outputs.writer as outputs

    real = write_mask_slices

    def write_some_then_sigterm(folder, pid, numbers, mask):
        real(folder, pid, numbers[:3], mask[:3])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns

    monkeypatch.setattr(outputs, "write_mask_slices", write_some_then_sigterm)
    out = tmp_path / "out"
    res = _run("--patient", str(root / SMALL), "--out", str(out))
    assert res.exit_code == 143
    _one_line(res, "terminated")
    assert list(out.iterdir()) == []


def test_sigterm_to_the_console_script(root, tmp_path):
    """What Ray, schedulers and `timeout` do: SIGTERM to a running `segengine run`."""
    out = tmp_path / "out"
    proc = subprocess.Popen([str(EXE), "run", "--model", str(MODEL), "--patient", str(root / SMALL), "--out", str(out),
                             "--gif"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / f".{SMALL}.segengine-lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(out.iterdir()) == []


def test_locked_patient_is_skipped_and_says_who_holds_it(root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with PatientLock(out, SMALL):
        single = _run("--patient", str(root / SMALL), "--out", str(out))
        batch = _run("--patients", str(root), "--out", str(out))
        with pytest.raises(PatientBusyError):
            PatientLock(out, SMALL).acquire()
    assert single.exit_code == 1
    _one_line(single, f"another segengine process (pid {os.getpid()}) is writing this patient")
    assert batch.exit_code == 0 and "skipped 1 (another process is writing them)" in batch.output
    assert [p.name for p in out.iterdir()] == [INDEX]  # the lock file goes with its holder; the batch wrote its page


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)])
def test_result_folders_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path, "P", overwrite=False) as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "P").stat().st_mode & 0o777 == mode


def test_threads_are_bounded_before_numpy_loads():
    code = ("import os, sys\nfrom segengine.engine.cli import main\n"
            "try:\n    main(['run', '--threads', '3', '--help'])\nexcept SystemExit:\n    pass\n"
            "print([os.environ[v] for v in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS')], "
            "'numpy' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().splitlines()[-1] == "['3', '3', '1'] False"  # numpy's BLAS stays on one thread (cli.BLAS_ENV_VARS)


# ------------------------------------------------------------------ interrupted replaces
def _make(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(text)
    return folder


def _made_by_engine(folder: Path) -> Path:
    """What atomic_dir leaves of a temp folder when killed: the folder with its owner marker."""
    m = TEMP_ENTRY.match(folder.name)
    folder.mkdir(parents=True, exist_ok=True)
    mark_owned(folder, m.group("name"), m.group("kind"))
    return folder


@pytest.mark.parametrize("state, expected", [
    ("killed-between-renames", "old"),     # final gone, previous result set aside: put back
    ("killed-after-new-in", "new"),        # final in place: the set-aside copy may go
    ("killed-while-writing", "old"),       # a partial folder: removed, final untouched
    ("killed-before-anything-aside", "old"),
], ids=lambda v: v)
def test_recovery_of_every_interrupted_replace(tmp_path, state, expected):
    out = tmp_path
    if state == "killed-between-renames":
        _make(_made_by_engine(out / ".P.old-abcd1234") / "old", "old")
        _make(_made_by_engine(out / ".P.partial-efgh5678"), "new")
    elif state == "killed-after-new-in":
        _make(out / "P", "new")
        _make(_made_by_engine(out / ".P.old-abcd1234") / "old", "old")
    elif state == "killed-while-writing":
        _make(out / "P", "old")
        _make(_made_by_engine(out / ".P.partial-efgh5678"), "ha")
    else:
        _make(out / "P", "old")
        _made_by_engine(out / ".P.old-abcd1234")
    _make(_made_by_engine(out / ".P.partial-x.partial-abcd1234"), "another patient's id that merely looks alike")
    recover_interrupted(out, "P")
    assert (out / "P" / "report.json").read_text() == expected
    assert sorted(p.name for p in out.iterdir()) == [".P.partial-x.partial-abcd1234", "P"]


def test_writer_killed_between_the_two_renames_is_recovered_by_the_next_run(root, tmp_path):
    out = tmp_path / "out"
    first = _run("--patient", str(root / SMALL), "--out", str(out))
    assert first.exit_code == 0, first.output
    original = tree_hashes(out / SMALL)
    killer = f"""
import os, signal, sys
real = os.replace
def replace(src, dst):
    real(src, dst)
    if ".old-" in str(dst):  # the previous result is aside, the new one not yet in: die here
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from segengine.engine.cli import main
sys.argv = ["segengine", "run", "--model", {str(MODEL)!r}, "--patient", {str(root / SMALL)!r}, "--out", {str(out)!r},
            "--overwrite"]
main()
"""
    proc = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / SMALL).exists() and any(".old-" in n for n in _leftovers(out))  # the window really was hit
    again = _run("--patient", str(root / SMALL), "--out", str(out))
    assert again.exit_code == 2 and "results exist" in again.output, again.output
    assert "restored the previous result" in again.output
    assert tree_hashes(out / SMALL) == original and not _leftovers(out)


def test_tidy_leaves_a_live_writer_alone(tmp_path):
    _make(_made_by_engine(tmp_path / ".P.partial-abcd1234"), "being written")
    with PatientLock(tmp_path, "P"):
        assert tidy_out(tmp_path) == []
        assert (tmp_path / ".P.partial-abcd1234").exists()
    assert tidy_out(tmp_path) and not _leftovers(tmp_path)


# ------------------------------------------------------------------ four runs on one OUT
def test_four_concurrent_runs_on_one_out(kaggle_root, tmp_path):
    root = tmp_path / "root"
    patients = sorted([SMALL, VAL_PATIENTS[0]])
    for p in patients:
        shutil.copytree(kaggle_root / p, root / p)
    before = tree_hashes(root)
    out = tmp_path / "out"
    overwrite = [False, True, False, True]
    procs = [subprocess.Popen([str(EXE), "run", "--model", str(MODEL), "--patients", str(root), "--out", str(out),
                               "--backend", "onnxruntime", "--threads", "1", *(["--overwrite"] if ow else [])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for ow in overwrite]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0 and "Traceback" not in se, se
    assert sorted(p.name for p in out.iterdir()) == [*patients, INDEX]  # no temp folder or lock left
    for p in patients:
        report = json.loads((out / p / "report.json").read_text())
        masks = sorted((out / p).glob("*_mask.tif"))
        assert report["patient"] == p and len(masks) == report["slices"] == len(list((root / p).glob("*_mask.tif")))
        # a run without --overwrite writes a patient only when no result existed: at most one such writer
        wrote = [ow for ow, (so, se) in zip(overwrite, results)
                 if any(line.startswith(f"{p}: ") and "slices, tumor" in line for line in (so + se).splitlines())]
        assert 1 <= len(wrote) and wrote.count(False) <= 1
    assert tree_hashes(root) == before


# ------------------------------------------------------------------ CI never skips the real-data suite
@pytest.mark.parametrize("ci, code, words", [("true", 1, "shared data not found"), ("", 0, "1 skipped")],
                         ids=["ci-fails", "local-skips"])
def test_missing_shared_data_fails_under_ci(tmp_path, ci, code, words):
    """A clone without ../shared beside it: under CI=true the real-data tests must fail, not skip."""
    tests = tmp_path / "clone" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), tests / "conftest.py")
    (tests / "test_uses_data.py").write_text("def test_real(kaggle_root):\n    assert kaggle_root.is_dir()\n")
    env = {**os.environ, "CI": ci}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)], cwd=tests.parent,
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == code, res.stdout + res.stderr
    assert words in res.stdout


def test_evaluate_refuses_a_huge_prediction_before_decoding(root, tmp_path):
    pred = tmp_path / "pred" / SMALL
    pred.mkdir(parents=True)
    for m in (root / SMALL).glob("*_mask.tif"):
        shutil.copy(m, pred / m.name)
    ok = _cli("evaluate", "--data", str(root), "--pred", str(pred.parent))
    assert ok.exit_code == 0 and "1.0000" in ok.output, ok.output  # ground truth scored against itself
    _huge_header(pred, None)
    (pred / f"{SMALL}_5.tif").rename(pred / f"{SMALL}_5_mask.tif")
    res = _cli("evaluate", "--data", str(root), "--pred", str(pred.parent))
    assert res.exit_code == 2
    _one_line(res, "20000x20000 differs from the ground truth 256x256")


@pytest.mark.parametrize("layout", ["kaggle", "nifti"])
def test_a_patient_is_opened_once(kaggle_root, tmp_path, monkeypatch, layout):
    """`run --patient` checks a patient's headers once (before the model loads) and reads it
    without checking them again: one header pass per patient, whatever the layout."""
    from segengine.engine.readers import nifti

    if layout == "kaggle":
        source, target, name = kaggle_root / SMALL, io, "check_headers"
    else:
        source = tmp_path / "case.nii.gz"
        nib_case(read_patient(kaggle_root / SMALL), source)
        target, name = nifti, "_open_case"
    real, calls = getattr(target, name), []
    monkeypatch.setattr(target, name, lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    real_listing, listings = io.list_slices, []
    monkeypatch.setattr(io, "list_slices", lambda folder: listings.append(folder) or real_listing(folder))
    res = _run("--patient", str(source), "--out", str(tmp_path / "out"), "--backend", "torch", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert calls == [source]
    assert listings == ([source] if layout == "kaggle" else [])  # a slice folder is listed once, id included


def nib_case(vol, path: Path) -> None:
    """A 4D NIfTI case (x, y, z, 3) holding a Kaggle patient's slices."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.image.transpose(2, 1, 0, 3)), np.eye(4)), str(path))
