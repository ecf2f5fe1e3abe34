"""bench/gpu_check.py's CPU side (issue 33, item 7): arguments, bad input as one line, the patient
copies of the scaling table, and a dry run on the CPU with the JSON's shape."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import VAL_PATIENTS
from segengine.bench import gpu_check
from segengine.engine.inference import gpu


def test_arguments_and_dry_run_trimming(tmp_path):
    a = gpu_check.parse_args([str(tmp_path), "--workers", "16,1,4,4", "--batch-sizes", "128,1,32"])
    assert a.workers == [1, 4, 16] and a.batch_sizes == [1, 32, 128] and a.device == "cuda" and a.copies is None
    d = gpu_check.parse_args([str(tmp_path), "--dry-run", "--device", "cpu"])
    assert d.workers == [1] and d.batch_sizes == [1, 32] and d.copies == 1


@pytest.mark.parametrize("args", [["--workers", "1,x"], ["--workers", "0"], ["--copies", "0"], ["--device", "tpu"]])
def test_bad_arguments_exit_2(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args([str(tmp_path), *args])
    assert exc.value.code == 2


def test_missing_folder_is_one_line(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "nope"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such folder" in err[0]


def test_empty_folder_is_one_line(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: ")


@pytest.mark.skipif(gpu.why_no_cuda() is None, reason="CUDA is usable here")
def test_cuda_device_without_cuda_is_one_line(kaggle_root, capsys):
    assert gpu_check.main([str(kaggle_root), "--json", "/dev/null"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cpu" in err[0]


def test_copies_get_their_own_patient_ids(kaggle_root, tmp_path):
    from segengine.engine.readers.registry import list_patients, unique_patient_ids

    made = gpu_check.copy_patients([kaggle_root / VAL_PATIENTS[0]], 3, tmp_path / "c")
    ids = unique_patient_ids(list_patients(tmp_path / "c"))
    assert len(made) == 3 and sorted(ids.values()) == [f"{VAL_PATIENTS[0]}c{k}" for k in range(3)]


def test_dry_run_on_the_cpu_writes_the_json(kaggle_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(kaggle_root / VAL_PATIENTS[1], data / VAL_PATIENTS[1])
    out = tmp_path / "check.json"
    code = gpu_check.main([str(data), "--device", "cpu", "--dry-run", "--batch-sizes", "1,2", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["schema"] == gpu_check.SCHEMA and result["dry_run"] and result["patients"] == [VAL_PATIENTS[1]]
    assert set(result) >= {"machine", "verdicts", "bench", "auto", "cold_start", "scaling", "model", "seconds"}
    assert result["machine"]["device"] == "cpu" and "cuda" in result["machine"]
    assert [r["batch_size"] for r in result["bench"] if r["backend"] == "torch"] == [1, 2]
    assert result["cold_start"]["exit"] == 0 and result["cold_start"]["resolved_backend"] == result["auto"]
    row, = result["scaling"]
    assert row["workers"] == 1 and row["done"] == 1 and row["patients_per_s"] > 0 and row["backend"] == result["auto"]
