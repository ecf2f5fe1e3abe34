"""OpenVINO backends (the shipped ONNX exports compiled by OpenVINO) and auto's measured choice.

Real data: the shipped model and its exports (copied where a test damages or records), real
validation patients. No test times anything: auto's choice is tested with injected
measurements, and the one real probe only has to return a trusted, available backend.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
from click.testing import CliRunner

from conftest import VAL_PATIENTS, copy_model, mask_agreement_with_torch
from segengine.engine.inference import registry
from segengine.engine.inference import speed
from segengine.engine.core.errors import ModelError
from segengine.engine.model.spec import check_sidecar, load_model_spec, sha256_file, shipped_model_path, sidecar_path

OV_BACKENDS = ["openvino", "openvino-int8"]
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")


@pytest.fixture()
def shipped_copy(tmp_path):
    """A private copy of the shipped model with its exports and sidecars, free to damage or record in."""
    return load_model_spec(copy_model(shipped_model_path(), tmp_path / "m", exports=True))


@pytest.fixture(scope="module")
def one_patient(tmp_path_factory):
    p = tmp_path_factory.mktemp("plist") / "one.txt"
    p.write_text(VAL_PATIENTS[0] + "\n")
    return p


# --------------------------------------------------------------------------- availability
def _not_installed(spec, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))


def _no_export(spec, monkeypatch):
    for kind in ("onnx", "onnx-int8"):
        spec.export_path(kind).unlink()


def _corrupt_export(spec, monkeypatch):
    for kind in ("onnx", "onnx-int8"):
        with open(spec.export_path(kind), "ab") as fh:
            fh.write(b"\0")


def _stale_export(spec, monkeypatch):
    for kind in ("onnx", "onnx-int8"):
        p = sidecar_path(spec.export_path(kind))
        side = json.loads(p.read_text())
        side["source_sha256"] = "0" * 64
        p.write_text(json.dumps(side))


UNAVAILABLE = [(_not_installed, "openvino is not installed"), (_no_export, "export of resunet16.pt; run `segengine export"),
               (_corrupt_export, "does not match its sidecar"), (_stale_export, "stale export")]


@pytest.mark.parametrize("backend", OV_BACKENDS)
@pytest.mark.parametrize("damage, words", UNAVAILABLE, ids=[d.__name__.strip("_") for d, _ in UNAVAILABLE])
def test_availability_says_why_openvino_cannot_run(shipped_copy, monkeypatch, backend, damage, words):
    damage(shipped_copy, monkeypatch)
    why = registry.why_unavailable(backend, shipped_copy)
    assert why is not None and words in why and "\n" not in why
    assert registry.resolve("auto", shipped_copy, 1) not in OV_BACKENDS


def test_run_without_openvino_is_one_line_and_writes_nothing(kaggle_root, tmp_path, monkeypatch):
    from segengine.engine.cli import main

    _not_installed(None, monkeypatch)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--patient", str(kaggle_root / VAL_PATIENTS[0]), "--out", str(out),
                                    "--backend", "openvino", "--threads", "1"])
    assert res.exit_code == 2 and "openvino is not installed" in res.output and "Traceback" not in res.output
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------- sidecar schema
@pytest.mark.parametrize("slot, words", [
    ("not an object", "validation_openvino must be an object"),
    ({"passed": "yes"}, "validation_openvino.passed"),
    ({"passed": True, "patients_count": -1}, "validation_openvino.patients_count"),
])
def test_sidecar_refuses_an_ill_formed_openvino_verdict(slot, words, tmp_path):
    side = json.loads(sidecar_path(load_model_spec().export_path("onnx")).read_text())
    side["validation_openvino"] = slot
    with pytest.raises(ModelError, match=words):
        check_sidecar(side, tmp_path / "x.onnx.json")


@needs_openvino
@pytest.mark.parametrize("backend, kind", [("openvino", "onnx"), ("openvino-int8", "onnx-int8")])
def test_shipped_openvino_verdicts_hold_and_state_the_precision(backend, kind, kaggle_root):
    """The shipped sidecars carry a verdict for each OpenVINO backend beside ONNX Runtime's, naming
    the precision OpenVINO ran in; where this CPU runs that precision, the verdict is re-earned
    here: OpenVINO's mask of a real validation patient against the PyTorch weights' (their DSC,
    computed in this test) at the backend's precision's tolerance."""
    from segengine.engine.inference.backends.openvino_backend import inference_precision
    from segengine.engine.inference.verdict import tolerances_for, why_untrusted

    spec = load_model_spec()
    side = spec.sidecar(kind)
    ov, ort = side["validation_openvino"], side["validation"]
    assert ov["backend"] == backend and ort["backend"].startswith("onnxruntime")
    assert ov["export_sha256"] == ort["export_sha256"] == sha256_file(spec.export_path(kind))
    assert ov["runtime"]["runtime"] == "openvino" and ov["runtime"]["inference_precision"] in ("bf16", "f32", "f16")
    precision = {"openvino": "bf16", "openvino-int8": "int8"}[backend]  # what each backend is declared to run in
    assert ov["precision"] == precision and ov["tolerances"] == tolerances_for(precision)
    if not (ov["runtime"]["inference_precision"] == inference_precision() or inference_precision() == "f32"):
        return  # another CPU's precision: auto distrusts it (test_auto_distrusts_an_openvino_verdict_measured_in_another_precision)
    if not ov["passed"]:  # a recorded FAIL (v4's openvino in bf16: agreement 0.9989 < 0.999) is never trusted
        assert why_untrusted(spec, backend) == f"{backend}: its recorded verdict is FAIL"
        assert registry.resolve("auto", spec, 1) != backend
        return
    assert why_untrusted(spec, backend) is None
    tumor, agreement = mask_agreement_with_torch(spec, backend, kaggle_root / VAL_PATIENTS[1])
    assert tumor > 1000  # the weights find this patient's tumor
    assert agreement >= tolerances_for(precision)["min_agreement"], agreement


# --------------------------------------------------------------------------- verdicts
@needs_openvino
@pytest.mark.parametrize("backend, kind", [("openvino", "onnx"), ("openvino-int8", "onnx-int8")])
def test_validate_records_the_openvino_verdict_beside_onnxruntimes(shipped_copy, kaggle_root, one_patient, backend, kind):
    from segengine.engine.inference.backends.openvino_backend import inference_precision
    from segengine.engine.cli import main
    from segengine.engine.inference.verdict import why_untrusted

    p = sidecar_path(shipped_copy.export_path(kind))
    side = json.loads(p.read_text())
    side.pop("validation_openvino", None)
    p.write_text(json.dumps(side))
    assert "no verdict recorded" in why_untrusted(shipped_copy, backend)
    res = CliRunner().invoke(main, ["validate", "--model", str(shipped_copy.weights), "--data", str(kaggle_root),
                                    "--patients-file", str(one_patient), "--backend", backend, "--threads", "1", "--record"])
    assert res.exit_code == 0, res.output
    after = json.loads(p.read_text())
    assert after["validation"] == side["validation"]  # ONNX Runtime's verdict on the same file is untouched
    v = after["validation_openvino"]
    assert v["passed"] and v["backend"] == backend and v["against"] == "torch" and v["patients_count"] == 1
    assert v["runtime"]["inference_precision"] == inference_precision()
    assert why_untrusted(load_model_spec(shipped_copy.weights), backend) is None


@pytest.mark.parametrize("recorded, here, words", [
    ("bf16", "bf16", None),
    ("f32", "f32", None),
    ("bf16", "f32", None),  # measured with bf16 numerics, run in f32 (closer to torch): holds
    ("f32", "bf16", "validate it again"),
    (None, "bf16", "does not say"),
])
def test_an_openvino_verdict_holds_only_for_the_precision_it_measured(monkeypatch, recorded, here, words):
    from segengine.engine.inference.backends import openvino_backend

    monkeypatch.setattr(openvino_backend, "inference_precision", lambda: here)
    why = openvino_backend.OpenVinoBackend.verdict_mismatch({"runtime": {"inference_precision": recorded} if recorded else None})
    assert (why is None) if words is None else (words in why)


@needs_openvino
def test_auto_distrusts_an_openvino_verdict_measured_in_another_precision(shipped_copy, monkeypatch):
    from segengine.engine.inference.backends import openvino_backend
    from segengine.engine.inference.verdict import why_untrusted

    monkeypatch.setattr(openvino_backend, "inference_precision", lambda: "bf16")
    p = sidecar_path(shipped_copy.export_path("onnx-int8"))
    side = json.loads(p.read_text())
    side["validation_openvino"]["runtime"]["inference_precision"] = "f32"
    p.write_text(json.dumps(side))
    assert "validate it again" in why_untrusted(shipped_copy, "openvino-int8")


# --------------------------------------------------------------------------- auto's choice
@pytest.mark.parametrize("candidates, ms, picked", [
    (["openvino-int8", "onnxruntime-int8"], {"openvino-int8": 7.0, "onnxruntime-int8": 5.0}, "onnxruntime-int8"),
    (["openvino-int8", "onnxruntime-int8"], {"openvino-int8": 4.0, "onnxruntime-int8": 7.8}, "openvino-int8"),
    (["openvino", "onnxruntime"], {"openvino": 9.9, "onnxruntime": 9.9}, "openvino"),  # tie: first listed
    (["onnxruntime"], {"openvino-int8": 1.0, "onnxruntime": 8.0}, "onnxruntime"),  # untrusted: never picked
    (["onnxruntime", "openvino"], {}, None),
])
def test_choose_takes_the_fastest_measured_candidate(candidates, ms, picked):
    assert speed.choose(candidates, ms) == picked


@pytest.mark.parametrize("cpuinfo, key", [
    ("model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n", "AMD EPYC [avx2 avx512f avx512_vnni avx512_bf16]"),
    ("model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8\n",
     "Intel(R) Xeon(R) Platinum 8481C [avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8]"),
    ("model name\t: Old\nflags\t: sse4_2\n", "Old [no AVX2]"),
])
def test_cpu_key_names_the_model_and_the_isa(cpuinfo, key):
    assert speed.cpu_key(cpuinfo) == key


@pytest.mark.parametrize("ms, picked", [
    ({"openvino-int8": 7.1, "openvino": 10.3, "onnxruntime-int8": 5.2, "onnxruntime": 16.0}, "onnxruntime-int8"),
    ({"openvino-int8": 4.1, "openvino": 3.95, "onnxruntime-int8": 5.7, "onnxruntime": 8.2}, "openvino"),
])
@needs_openvino
def test_auto_follows_the_recorded_figures_for_this_cpu(monkeypatch, tmp_path, ms, picked):
    """Where ONNX Runtime was measured fastest auto picks it; where OpenVINO was, OpenVINO; and a
    figure recorded for another CPU is not used (that CPU's entry is re-measured by the probe)."""
    spec = load_model_spec()
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(speed, "cpu_key", lambda cpuinfo=None: "Test CPU [avx2]")
    speed.record_ms("Test CPU [avx2]", spec.sha256, 1, ms, "test")
    speed.record_ms("Other CPU [avx2]", spec.sha256, 1, {k: 100.0 for k in ms} | {"onnxruntime": 0.1}, "test")

    def no_probe(*a, **k):
        raise AssertionError("measured again although every candidate is recorded")

    monkeypatch.setattr(speed, "probe", no_probe)
    from segengine.engine.inference.verdict import why_untrusted

    if why_untrusted(spec, picked):  # a backend whose shipped verdict is FAIL here is passed over for the next fastest
        trusted = {k: v for k, v in ms.items() if why_untrusted(spec, k) is None}
        picked = min(trusted, key=trusted.get)
    assert registry.resolve("auto", spec, 1) == picked


def test_fastest_probes_only_what_is_missing_and_records_it(monkeypatch, tmp_path):
    spec = load_model_spec()
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    calls = []

    def measure(model, names, threads):
        calls.append(list(names))
        return {n: {"onnxruntime": 9.0, "openvino": 3.0}[n] for n in names}

    speed.record_ms(speed.cpu_key(), spec.sha256, 2, {"onnxruntime-int8": 5.0}, "bench")
    assert speed.fastest(spec, ["onnxruntime-int8", "onnxruntime", "openvino"], 2, measure=measure) == "openvino"
    assert calls == [["onnxruntime", "openvino"]]
    assert speed.recorded_ms(speed.cpu_key(), spec.sha256, 2) == {"onnxruntime-int8": 5.0, "onnxruntime": 9.0, "openvino": 3.0}
    assert speed.fastest(spec, ["onnxruntime-int8", "onnxruntime", "openvino"], 2, measure=measure) == "openvino"
    assert len(calls) == 1  # recorded: not measured again
    assert speed.fastest(spec, ["onnxruntime"], 2, measure=measure) == "onnxruntime" and len(calls) == 1


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema": "other", "entries": {}}), json.dumps([1, 2])])
def test_an_unreadable_or_foreign_cache_is_measured_again(monkeypatch, tmp_path, content):
    spec = load_model_spec()
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    speed.cache_path().write_text(content)
    got = speed.fastest(spec, ["onnxruntime", "onnxruntime-int8"], 1, measure=lambda m, n, t: {"onnxruntime": 2.0, "onnxruntime-int8": 1.0})
    assert got == "onnxruntime-int8"
    assert json.loads(speed.cache_path().read_text())["schema"] == speed.SCHEMA


def _fifo_cache(path):
    import os

    os.mkfifo(path)


def _entry_of_wrong_types(path):
    key = speed.entry_key(speed.cpu_key(), load_model_spec().sha256, 1)
    path.write_text(json.dumps({"schema": speed.SCHEMA, "entries": {key: {"ms_per_slice": [1, 2], "how": "probe"}},
                                "facts": {"x": 5}}))


def _figures_of_wrong_types(path):
    key = speed.entry_key(speed.cpu_key(), load_model_spec().sha256, 1)
    path.write_text(json.dumps({"schema": speed.SCHEMA, "entries": {key: {"ms_per_slice": {"onnxruntime": "fast",
                                                                                          "openvino": -1}}}}))


@pytest.mark.parametrize("plant", [_fifo_cache, _entry_of_wrong_types, _figures_of_wrong_types],
                         ids=["fifo", "entry-wrong-types", "figures-wrong-types"])
def test_a_planted_cache_is_measured_again_never_a_hang_or_a_crash(monkeypatch, tmp_path, plant):
    """auto's cache lives outside the repository (a shared HOME, $SEGENGINE_CACHE_DIR): a FIFO there
    must not block the run, and an entry of the right schema but wrong types must not crash it."""
    import threading

    spec = load_model_spec()
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    plant(speed.cache_path())
    got = []
    worker = threading.Thread(target=lambda: got.append(speed.fastest(
        spec, ["onnxruntime", "onnxruntime-int8"], 1, measure=lambda m, n, t: {"onnxruntime": 2.0, "onnxruntime-int8": 1.0})),
        daemon=True)
    worker.start()
    worker.join(60)
    assert got == ["onnxruntime-int8"]
    assert speed.recorded_ms(speed.cpu_key(), spec.sha256, 1) == {"onnxruntime": 2.0, "onnxruntime-int8": 1.0}


def test_a_cpu_fact_is_learned_once_per_cpu_and_version(monkeypatch, tmp_path):
    """OpenVINO's default precision is asked of OpenVINO once (importing it costs ~1 s), then read
    back; another library version, or another CPU, asks again; ms/slice entries survive beside it."""
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    asked = []

    def learn():
        asked.append(1)
        return "bf16"

    speed.record_ms("Test CPU [avx2]", "0" * 64, 1, {"openvino": 3.0}, "test")
    assert speed.cpu_fact("precision", "1.0", learn) == "bf16" and len(asked) == 1
    assert speed.cpu_fact("precision", "1.0", learn) == "bf16" and len(asked) == 1
    assert speed.cpu_fact("precision", "2.0", learn) == "bf16" and len(asked) == 2
    monkeypatch.setattr(speed, "cpu_key", lambda cpuinfo=None: "Other CPU [avx2]")
    assert speed.cpu_fact("precision", "1.0", learn) == "bf16" and len(asked) == 3
    assert speed.recorded_ms("Test CPU [avx2]", "0" * 64, 1) == {"openvino": 3.0}


@needs_openvino
@pytest.mark.parametrize("planted", ["f64", "bf16\n; extra", ""])
def test_a_planted_precision_fact_is_asked_of_openvino_again(monkeypatch, tmp_path, planted):
    """The precision read back from the cache is pinned at compile time and decides which verdicts
    hold: a value OpenVINO's CPU plugin does not have is learned again, not trusted."""
    from importlib.metadata import version

    from segengine.engine.inference.backends import openvino_backend

    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    here = openvino_backend.inference_precision()
    key = f"{speed.cpu_key()} | openvino default INFERENCE_PRECISION_HINT | {version('openvino')}"
    speed._write_file(speed.cache_path(), {"entries": {}, "facts": {key: planted}})
    assert openvino_backend.inference_precision() == here and here in openvino_backend.PRECISIONS


@needs_openvino
def test_a_real_probe_returns_a_trusted_available_backend(monkeypatch, tmp_path):
    from segengine.engine.inference.verdict import why_untrusted

    spec = load_model_spec()
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    picked = registry.resolve("auto", spec, 1)
    assert picked in registry.AUTO_CANDIDATES
    assert registry.why_unavailable(picked, spec) is None and why_untrusted(spec, picked) is None
    recorded = speed.recorded_ms(speed.cpu_key(), spec.sha256, 1)
    assert picked in recorded and set(recorded) <= set(registry.AUTO_CANDIDATES)


# --------------------------------------------------------------------------- bench
def test_bench_records_its_largest_batch_figures_for_auto(monkeypatch, tmp_path):
    """`segengine bench` leaves auto its ms/slice (largest batch, exported backends only), keyed
    by this CPU and the model's SHA-256; a failed row or torch's is not a figure for auto."""
    from segengine.bench.bench import record_for_auto

    spec = load_model_spec()
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    rows = [{"backend": "openvino-int8", "status": "ok", "batch_size": 1, "per_slice_ms": 9.0},
            {"backend": "openvino-int8", "status": "ok", "batch_size": 32, "per_slice_ms": 6.5},
            {"backend": "onnxruntime-int8", "status": "ok", "batch_size": 32, "per_slice_ms": 7.5},
            {"backend": "onnxruntime", "status": "not available: x", "batch_size": None},
            {"backend": "torch", "status": "ok", "batch_size": 32, "per_slice_ms": 30.0}]
    got = record_for_auto(spec, rows, 1)
    assert got["ms_per_slice"] == {"openvino-int8": 6.5, "onnxruntime-int8": 7.5}
    assert speed.recorded_ms(speed.cpu_key(), spec.sha256, 1) == {"openvino-int8": 6.5, "onnxruntime-int8": 7.5}
    assert speed.recorded_ms(speed.cpu_key(), spec.sha256, 2) == {}  # another thread count: not these figures


# --------------------------------------------------------------------------- the ensemble on the fast backends
@needs_openvino
@pytest.mark.parametrize("backend", ["openvino-int8", "onnxruntime-int8"])
def test_the_fold_ensemble_runs_on_int8_backends_like_torch(kaggle_root, backend):
    """Where every shipped fold member's INT8 export has a PASS verdict for this backend, the averaged
    mask on a real validation patient is within the INT8 tolerance of torch's. Where a member's
    recorded verdict is FAIL (v3's fold 1 on onnxruntime-int8), auto never runs the ensemble there."""
    from segengine.engine.inference.ensemble import load_ensemble
    from segengine.engine.readers.registry import read_patient
    from segengine.engine.evaluation.metrics import dsc
    from segengine.engine.postprocessing.finish import finish_patient
    from segengine.engine.inference.predict import model_input
    from segengine.engine.preprocessing.preprocess import preprocess_patient
    from segengine.engine.postprocessing.postprocess import PostprocessConfig
    from segengine.engine.inference.verdict import tolerances_for, why_untrusted

    plan = load_ensemble()
    untrusted = [why for m in plan.members if (why := why_untrusted(m, backend))]
    if untrusted:
        assert all("verdict is FAIL" in why for why in untrusted), untrusted  # not a missing or stale verdict
        assert registry.resolve("auto", plan, threads=1) != backend
        return
    vol = read_patient(kaggle_root / VAL_PATIENTS[0])
    pre = preprocess_patient(vol, "native", plan.preprocessing)
    x = model_input(pre, plan)
    segs = {}
    for name in (backend, "torch"):
        with registry.create(name, plan, threads=1) as runner:
            segs[name] = finish_patient(vol, pre, runner.predict(x), "native", PostprocessConfig(), {})
    tol = tolerances_for("int8")
    a, t = segs[backend], segs["torch"]
    assert dsc(a.mask, t.mask) >= tol["min_agreement"]
    assert abs(dsc(a.mask, a.truth) - dsc(t.mask, t.truth)) <= tol["max_abs_delta_dsc"]


@needs_openvino
def test_run_ensemble_with_auto_picks_a_fast_trusted_backend(kaggle_root, tmp_path):
    from segengine.engine.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--patient", str(kaggle_root / VAL_PATIENTS[1]), "--out", str(out),
                                    "--ensemble", "--backend", "auto", "--threads", "1"])
    assert res.exit_code == 0, res.output
    report = json.loads(next(out.rglob("report.json")).read_text())
    assert report["backend"] in ("openvino-int8", "onnxruntime-int8")  # the members ship INT8 exports only


@needs_openvino
@pytest.mark.parametrize("backend", OV_BACKENDS)
def test_a_load_from_openvinos_compiled_cache_predicts_the_same(monkeypatch, tmp_path, backend):
    """The second load imports the blob the first compiled (beside auto's figures) and gives the
    very same probabilities; an uncachable folder only means compiling every time."""
    import numpy as np

    from segengine.export.onnx_export import synthetic_images

    spec = load_model_spec()
    x = synthetic_images(4, spec.input_size, channels=spec.in_channels)
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path / "cache"))
    with registry.create(backend, spec, threads=1) as first:
        a = first.infer(x)
    blobs = list((tmp_path / "cache" / "openvino").glob("*.blob"))
    assert blobs
    with registry.create(backend, spec, threads=1) as second:
        b = second.infer(x)
    assert list((tmp_path / "cache" / "openvino").glob("*.blob")) == blobs and np.array_equal(a, b)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path / "file" / "below"))
    with registry.create(backend, spec, threads=1) as uncached:
        assert np.array_equal(uncached.infer(x), a)


@needs_openvino
def test_running_openvino_starts_no_telemetry(tmp_path):
    """A run on OpenVINO imports no model-conversion tools, hence no openvino_telemetry (which would
    report to Google Analytics and write ~/intel/); convert_model stays importable afterwards."""
    import subprocess
    import sys

    code = (
        "import sys, threading\n"
        "from segengine.engine.inference import registry\n"
        "from segengine.engine.model.spec import load_model_spec\n"
        "from segengine.export.onnx_export import synthetic_images\n"
        "spec = load_model_spec()\n"
        "with registry.create('openvino-int8', spec, threads=1) as b:\n"
        "    b.infer(synthetic_images(1, spec.input_size, channels=spec.in_channels))\n"
        "print('telemetry' if 'openvino_telemetry' in sys.modules else 'none', len(threading.enumerate()))\n"
        "from openvino.tools.ovc import convert_model\n"
        "print('ovc ok')\n"
    )
    env = {**__import__("os").environ, "HOME": str(tmp_path), speed.CACHE_ENV: str(tmp_path / "cache")}
    env.pop("CI", None)  # openvino_telemetry stays quiet under CI=true: test the user's case
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "none 1" and lines[1] == "ovc ok"


# --------------------------------------------------------------------------- the compiled-model cache
def _cache_folder_links_elsewhere(root, elsewhere):
    (root / "openvino").symlink_to(elsewhere, target_is_directory=True)


def _cache_folder_writable_by_others(root, elsewhere):
    (root / "openvino").mkdir()
    (root / "openvino").chmod(0o777)


def _cache_root_of_another_user(root, elsewhere):
    os.chown(root, 12345, -1)  # its owner could rename the openvino folder and put another in its place


def _cache_root_writable_by_others(root, elsewhere):
    root.chmod(0o777)  # anyone could swap the openvino folder between the check and the compile (no sticky bit)


@needs_openvino
@pytest.mark.parametrize("plant", [_cache_folder_links_elsewhere, _cache_folder_writable_by_others,
                                   _cache_root_writable_by_others,
                                   pytest.param(_cache_root_of_another_user, marks=pytest.mark.skipif(
                                       os.geteuid() != 0, reason="giving a folder to another user needs root"))],
                         ids=["link", "folder-others-write", "root-others-write", "root-of-another-user"])
def test_compiled_models_are_cached_only_in_a_folder_only_this_user_can_write(monkeypatch, tmp_path, plant):
    """OpenVINO imports whatever blob sits under the name it expects, without the SHA-256 check
    the ONNX file passes: a cache folder others can write (or a link to one) would let them swap
    the network a patient runs through. Such a folder is not used (compiled every time, same result)."""
    from segengine.engine.inference.backends.openvino_backend import OpenVinoInt8Backend, compiled_cache_dir

    root, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv(speed.CACHE_ENV, str(root))
    assert compiled_cache_dir() == root / "openvino" and (root / "openvino").stat().st_mode & 0o022 == 0
    (root / "openvino").rmdir()
    plant(root, elsewhere)
    try:
        assert compiled_cache_dir() is None
        runner = OpenVinoInt8Backend(load_model_spec(), threads=1).load()
        runner.close()
        assert list(elsewhere.iterdir()) == []
    finally:
        root.chmod(0o755)
        os.chown(root, os.geteuid(), -1)


@needs_openvino
def test_a_half_written_compiled_blob_is_compiled_again_with_the_same_result(monkeypatch, tmp_path):
    """Two runs may share the cache: OpenVINO writes a blob in place, so one run can meet another's
    half-written blob. OpenVINO must then compile again (not fail, not run half a network)."""
    import numpy as np

    from segengine.engine.inference.backends.openvino_backend import OpenVinoInt8Backend

    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    spec = load_model_spec()
    x = np.random.default_rng(0).standard_normal((2, *spec.input_shape), dtype=np.float32)
    with OpenVinoInt8Backend(spec, threads=1) as runner:
        want = runner.load().infer(x)
    blobs = list((tmp_path / "openvino").glob("*.blob"))
    assert blobs
    for blob in blobs:
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    with OpenVinoInt8Backend(spec, threads=1) as runner:
        assert np.array_equal(runner.load().infer(x), want)


@needs_openvino
def test_a_cache_root_writable_by_the_users_group_keeps_the_compiled_cache(monkeypatch, tmp_path):
    """Under umask 002 (a user-private group) the cache root is group-writable: still the user's."""
    from segengine.engine.inference.backends.openvino_backend import compiled_cache_dir

    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(0o775)
    monkeypatch.setenv(speed.CACHE_ENV, str(root))
    assert compiled_cache_dir() == root / "openvino"
