"""Smoke test of ``segengine bench``: one real patient, one timed iteration, batch 1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TRAIN_PATIENT as PATIENT  # first folder of kaggle_root in sorted order
from conftest import copy_model


@pytest.fixture(scope="module")
def model_path(random_model, tmp_path_factory) -> Path:
    return copy_model(random_model, tmp_path_factory.mktemp("model"))  # weights and card only: no exports


@pytest.fixture(scope="module")
def result(model_path, kaggle_root) -> dict:
    from segengine.bench.bench import run_bench

    lines: list[str] = []
    res = run_bench(model_path, data_root=kaggle_root, patients=1, backends=("torch", "tensorrt"), batch_sizes=(1,),
                    threads=1, warmup=0, iterations=1, end_to_end=True, reference="model",
                    reference_batch_size=1, reference_warmup=0, reference_iterations=1, log=lines.append)
    res["_log"] = lines
    return res


def test_result_structure(result):
    for key in ("schema", "machine", "settings", "model", "peak", "model_only", "end_to_end", "reference", "notes"):
        assert key in result
    json.dumps(result)  # JSON-serializable as is
    m = result["machine"]
    for key in ("cpu_model", "cores", "cpu_count", "python", "versions", "gpu"):
        assert key in m
    assert result["settings"]["patients"] == [PATIENT]
    assert result["settings"]["input"]["source"] == "real"
    assert result["model"]["flops_per_slice"] > 1e8
    peak = result["peak"]
    assert "x 32" in peak["formula"]
    if peak["gflops"]:
        assert peak["gflops"] == pytest.approx(peak["cores"] * peak["ghz"] * 32)

    (torch_row,) = [r for r in result["model_only"] if r["backend"] == "torch"]
    assert torch_row["status"] == "ok" and torch_row["batch_size"] == 1 and torch_row["iterations"] == 1
    assert set(torch_row["latency_ms"]) >= {"p50", "p95", "p99", "mean"}
    assert torch_row["throughput_slices_s"] > 0 and torch_row["gflops_achieved"] > 0
    assert torch_row["speedup_vs_reference"] > 0
    if peak["gflops"]:
        assert torch_row["pct_of_peak"] > 0

    (e2e,) = [r for r in result["end_to_end"] if r["backend"] == "torch"]
    assert e2e["status"] == "ok" and e2e["patients"] == [PATIENT]
    assert set(e2e["stages_s"]) == {"read", "preprocess", "infer", "postprocess", "write"}
    assert e2e["per_patient_s"] >= sum(e2e["stages_s"].values()) * 0.99
    assert e2e["amortized"]["per_patient_s"] > 0 and e2e["load_s"] >= 0

    ref = result["reference"]
    assert 20e9 < ref["flops_per_slice"] < 28e9  # the 32-channel reference U-Net: ~24 GFLOP per slice
    assert ref["model_only"]["per_slice_ms"] > 0
    assert ref["end_to_end"] is None  # reference="model" skips its end-to-end run
    assert any("weights" in n for n in result["notes"])


def test_tensorrt_not_available_here(result):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: TensorRT may be available")
    rows = [r for r in result["model_only"] + result["end_to_end"] if r["backend"] == "tensorrt"]
    assert len(rows) == 2
    assert all(r["status"].startswith("not available: ") for r in rows)


def test_table_names_every_backend(result):
    from segengine.bench.bench import format_table

    table = format_table(result)
    for name in ("torch", "tensorrt", "reference"):
        assert name in table
    assert "not available" in table


def test_plot_writes_png(result, tmp_path):
    from segengine.bench.bench import plot

    out = plot(result, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
