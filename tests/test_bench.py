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
    for key in ("ghz", "clock_source", "isa", "flags"):
        assert key in m
    peak = result["peak"]
    fp32_per_cycle = m["isa"]["fp32"]["flops_per_cycle_per_core"]
    if peak["ghz"]:
        assert peak["fp32"]["gflops"] == pytest.approx(peak["cores"] * peak["ghz"] * fp32_per_cycle)

    (torch_row,) = [r for r in result["model_only"] if r["backend"] == "torch"]
    assert torch_row["status"] == "ok" and torch_row["batch_size"] == 1 and torch_row["iterations"] == 1
    assert set(torch_row["latency_ms"]) >= {"p50", "p95", "p99", "mean"}
    # the figures follow from the timed latency by their definitions: 1 slice per mean latency
    assert torch_row["throughput_slices_s"] == pytest.approx(1e3 / torch_row["latency_ms"]["mean"])
    assert torch_row["gflops_achieved"] == pytest.approx(result["model"]["flops_per_slice"] * torch_row["throughput_slices_s"] / 1e9)
    assert torch_row["speedup_vs_reference"] > 0
    if peak["fp32"]["gflops"]:
        assert torch_row["pct_of_peak"] > 0 and torch_row["peak_unit"] == "GFLOP/s"

    (e2e,) = [r for r in result["end_to_end"] if r["backend"] == "torch"]
    assert e2e["status"] == "ok" and e2e["patients"] == [PATIENT]
    assert set(e2e["stages_s"]) == {"read", "preprocess", "infer", "postprocess", "write"}
    assert e2e["per_patient_s"] >= sum(e2e["stages_s"].values()) * 0.99
    assert e2e["amortized"]["per_patient_s"] > 0 and e2e["load_s"] >= 0 and e2e["amortized"]["overlapped_stages"]
    assert e2e["infer_alone"]["per_patient_s"] > 0 and e2e["amortized"]["vs_infer_alone"] > 0

    ref = result["reference"]
    assert ref["flops_per_slice"] == _reference_unet_flops()
    assert ref["model_only"]["per_slice_ms"] > 0
    assert ref["end_to_end"] is None  # reference="model" skips its end-to-end run
    assert any("weights" in n for n in result["notes"])


def _reference_unet_flops(size: int = 256, f: int = 32) -> int:
    """The course U-Net's FLOPs (2 x multiply-accumulates) from its layer shapes, by hand: per
    level two 3 x 3 convolutions, 2 x 2 stride-2 transposed convolutions up, a 1 x 1 head."""
    def conv(cin: int, cout: int, k: int, side: int) -> int:
        return 2 * cin * cout * k * k * side * side

    widths = [3, f, 2 * f, 4 * f, 8 * f]
    total = sum(conv(widths[i], widths[i + 1], 3, size >> i) + conv(widths[i + 1], widths[i + 1], 3, size >> i) for i in range(4))
    total += conv(8 * f, 16 * f, 3, size >> 4) + conv(16 * f, 16 * f, 3, size >> 4)  # bottleneck
    for i in range(4):  # up (input side size >> (4 - i)), then the decoder block at twice that side
        cin, cout, side = 16 * f >> i, 8 * f >> i, size >> (4 - i)
        total += conv(cin, cout, 2, side) + conv(cin, cout, 3, 2 * side) + conv(cout, cout, 3, 2 * side)
    return total + conv(f, 1, 1, size)


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
    cpu_line = f"CPU: {result['machine']['cpu_model']}"
    assert table.count(cpu_line) >= 3  # the header and beside both tables


def test_plot_writes_png(result, tmp_path):
    from segengine.bench.report import plot

    out = plot(result, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ machine probe
def _cpuinfo(model: str, mhz: float, flags: str, cores: int = 2) -> str:
    block = (f"processor\t: {{n}}\nmodel name\t: {model}\ncpu MHz\t\t: {mhz:.3f}\nphysical id\t: 0\n"
             f"cpu cores\t: {cores}\nflags\t\t: {flags}\n")
    return "\n".join(block.format(n=n) for n in range(cores))


# (cpuinfo, fp32 ISA, fp32 flops/cycle/core, int8 ISA, int8 ops/cycle/core, GHz)
CPUS = [
    (_cpuinfo("AMD EPYC", 2445.432, "fpu sse4_2 avx fma avx2"), "AVX2 FMA", 32, "AVX2 (no VNNI)", 64, 2.445432),
    (_cpuinfo("Intel(R) Xeon(R) Processor", 2600.0, "sse4_2 avx fma avx2 avx512f avx512bw avx512_vnni avx_vnni "
              "amx_tile amx_int8 amx_bf16"), "AVX-512", 64, "AMX-INT8", 2048, 2.6),
    (_cpuinfo("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", 3900.0, "sse4_2 avx fma avx2 avx512f avx512bw avx512_vnni"),
     "AVX-512", 64, "AVX-512 VNNI", 256, 2.5),
    (_cpuinfo("Intel(R) Core(TM) i5-12400", 2500.0, "sse4_2 avx fma avx2 avx_vnni"), "AVX2 FMA", 32, "AVX-VNNI", 128, 2.5),
    (_cpuinfo("old", 2000.0, "sse4_2"), "SSE", 8, "none", None, 2.0),  # separate add and multiply
]


@pytest.mark.parametrize("text, fp32_isa, fp32_cycle, int8_isa, int8_cycle, ghz", CPUS)
def test_peaks_follow_the_isa_in_the_flags(text, fp32_isa, fp32_cycle, int8_isa, int8_cycle, ghz, monkeypatch):
    from segengine.bench import machine

    monkeypatch.setattr(machine, "_read", lambda path: text if path == "/proc/cpuinfo" else "")
    m = machine.machine_info(text)
    assert m["ghz"] == pytest.approx(ghz) and m["cores"] == 2
    assert m["isa"]["fp32"]["isa"] == fp32_isa and m["isa"]["int8"]["isa"] == int8_isa
    m["usable_cpus"] = 2
    p = machine.peak(m)
    assert p["fp32"]["gflops"] == pytest.approx(2 * ghz * fp32_cycle)
    assert p["int8"]["gops"] == (None if int8_cycle is None else pytest.approx(2 * ghz * int8_cycle))
    line = machine.describe_cpu(m)
    assert m["cpu_model"] in line and fp32_isa in line


def test_peak_counts_only_usable_cores():
    from segengine.bench import machine

    m = machine.machine_info(CPUS[1][0])
    m["usable_cpus"] = 1
    assert machine.peak(m)["fp32"]["gflops"] == pytest.approx(2.6 * 64)


def test_amx_machines_also_record_the_vnni_peak():
    from segengine.bench import machine

    m = machine.machine_info(CPUS[1][0])
    m["usable_cpus"] = 2
    assert machine.peak(m)["int8"]["without_amx"] == {"isa": "AVX-512 VNNI", "gops": pytest.approx(2 * 2.6 * 256)}


def test_bench_times_a_context_model_on_its_own_input(context_model, kaggle_root):
    """A 2.5D model is timed on its model input (neighbours stacked per patient, 9 channels);
    its FLOPs are counted on that 9-channel input; the course reference, a 2D model, on the slices themselves."""
    import numpy as np

    from segengine.bench.bench import run_bench
    from segengine.bench.measure import input_slices
    from segengine.engine.readers.registry import read_patient
    from segengine.engine.model.spec import load_model_spec
    from segengine.engine.model.network import build_model, count_flops
    from segengine.engine.preprocessing.preprocess import preprocess_patient

    spec = load_model_spec(context_model)
    slices = preprocess_patient(read_patient(kaggle_root / PATIENT, with_mask=False), "native", spec.preprocessing).images
    x, info = input_slices(spec, [kaggle_root / PATIENT], 4, log=lambda *_: None)
    n = len(slices)
    assert x.shape == (n, 9, 64, 64) and info["source"] == "real" and info["slices"] == n
    for i in range(n):  # slice i-1, i, i+1 as channels 0-2, 3-5, 6-8; the end slices repeat themselves
        np.testing.assert_array_equal(x[i], np.concatenate([slices[max(i - 1, 0)], slices[i], slices[min(i + 1, n - 1)]]))
    res = run_bench(context_model, data_root=kaggle_root, patients=1, backends=("torch",), batch_sizes=(2,), threads=1,
                    warmup=0, iterations=1, end_to_end=False, reference="model", reference_batch_size=1,
                    reference_warmup=0, reference_iterations=1, log=lambda *_: None)
    (row,) = res["model_only"]
    assert row["status"] == "ok"
    # only the stem sees the input: a 3 x 3 convolution to 4 channels at stride 2 (32 x 32 outputs), so
    # 6 more input channels cost 2 * 6 * 9 * 4 * 32 * 32 FLOPs more than the same network on 3 channels
    plain = count_flops(build_model({**spec.architecture, "in_channels": 3}), spec.input_size)
    assert res["model"]["flops_per_slice"] - plain == 2 * 6 * 9 * 4 * 32 * 32
