"""Scale-out: `run --ray` on a local 2-CPU Ray instance, and the Triton model repository."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from conftest import TRAIN_PATIENT, VAL_PATIENTS, copy_model
from segengine.engine.cli import main
from segengine.engine.model.spec import load_model_spec, sha256_file, shipped_model_path

MODEL = Path(os.environ.get("SEGENGINE_TEST_MODEL", shipped_model_path()))
PATIENTS = sorted(VAL_PATIENTS + [TRAIN_PATIENT])


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: tifffile.imread(p) for p in sorted(folder.glob("*_mask.tif"))}


# ----------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance with 2 CPUs for the module (jobs reuse an initialised Ray)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_and_ray_runs(kaggle_root, ray_cluster, tmp_path_factory):
    """The same three patients through a local run and a Ray run whose first worker is killed
    (SIGKILL) right after it is handed its first patient."""
    from segengine.engine.job.ray_runner import run_patients_ray

    base = tmp_path_factory.mktemp("scale")
    local = base / "local"
    res = CliRunner().invoke(main, ["run", "--patients", str(kaggle_root), "--out", str(local), "--model", str(MODEL),
                                    "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    killed = []

    def kill_first_worker(patient: str, pid: int) -> None:
        if not killed:
            killed.append((patient, pid))
            os.kill(pid, signal.SIGKILL)

    lines = []
    summary = run_patients_ray(kaggle_root, base / "ray", "onnxruntime", MODEL, workers=2, threads=1,
                               echo=lines.append, on_submit=kill_first_worker)
    return local, base / "ray", summary, killed, lines


def test_ray_masks_equal_local_masks(local_and_ray_runs):
    local, ray_out, summary, _, _ = local_and_ray_runs
    assert sorted(summary.done) == PATIENTS and not summary.failed
    for p in PATIENTS:
        ours, theirs = _masks(ray_out / p), _masks(local / p)
        assert list(ours) == list(theirs) and len(ours) > 0
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"{p}/{name}")
        assert json.loads((ray_out / p / "report.json").read_text())["tumor_volume_px"] == \
            json.loads((local / p / "report.json").read_text())["tumor_volume_px"]


def test_killed_worker_patient_is_retried_elsewhere(local_and_ray_runs):
    _, ray_out, summary, killed, lines = local_and_ray_runs
    (patient, pid), = killed
    assert summary.workers_lost == 1 and summary.retried == [patient]
    assert patient in summary.done
    report = json.loads((ray_out / patient / "report.json").read_text())
    assert report["patient"] == patient
    assert not [p.name for p in ray_out.iterdir() if p.name.startswith(".")], "temp folders left behind"
    assert any("retried 1" in line and "done 3" in line for line in lines)  # the summary, before any review lines


def test_rerun_resumes_and_skips_complete_patients(local_and_ray_runs, kaggle_root):
    from segengine.engine.job.ray_runner import run_patients_ray

    _, ray_out, _, _, _ = local_and_ray_runs
    redo = PATIENTS[0]
    before = {p: (ray_out / p / "report.json").stat().st_mtime_ns for p in PATIENTS[1:]}
    shutil.rmtree(ray_out / redo)
    summary = run_patients_ray(kaggle_root, ray_out, "onnxruntime", MODEL, workers=1, echo=lambda *_: None)
    assert summary.done == [redo] and sorted(summary.skipped) == PATIENTS[1:]
    assert {p: (ray_out / p / "report.json").stat().st_mtime_ns for p in PATIENTS[1:]} == before


def test_bad_patient_fails_without_retry(kaggle_root, ray_cluster, tmp_path):
    from segengine.engine.job.ray_runner import run_patients_ray

    root = tmp_path / "root"
    shutil.copytree(kaggle_root / VAL_PATIENTS[0], root / VAL_PATIENTS[0])
    bad = root / "TCGA_XX_0000_20000101"
    bad.mkdir()
    (bad / "TCGA_XX_0000_20000101_1.tif").write_bytes(b"not a tiff")
    summary = run_patients_ray(root, tmp_path / "out", "onnxruntime", MODEL, workers=2, echo=lambda *_: None)
    assert summary.done == [VAL_PATIENTS[0]] and not summary.retried
    assert [p for p, _ in summary.failed] == [bad.name]
    assert not (tmp_path / "out" / bad.name).exists()


@pytest.mark.parametrize("workers, threads, words", [(3, 1, "needs 3 CPUs, but the Ray cluster has 2"),
                                                     (1, 4, "needs 4 CPUs, but the Ray cluster has 2")])
def test_more_worker_cpus_than_the_cluster_has_is_one_line_not_a_hang(kaggle_root, ray_cluster, tmp_path, workers,
                                                                      threads, words):
    """Ray would wait forever to place actors it has no CPUs for: refused before any is started."""
    from segengine.engine.core.errors import BackendUnavailable
    from segengine.engine.job.ray_runner import run_patients_ray

    with pytest.raises(BackendUnavailable, match=words):
        run_patients_ray(kaggle_root, tmp_path / "out", "onnxruntime", MODEL, workers=workers, threads=threads,
                         echo=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_ray_nifti_cases_go_through_the_patient_job_and_the_review_page_is_written(kaggle_root, ray_cluster, tmp_path):
    """On a Ray worker a NIfTI case is one PatientJob like a tif folder: its id, the --max-slices
    limit from the header (a truncated file claiming 101 slices fails on the limit, not on
    decoding), its mask on the input's grid; OUT/index.html is written after the Ray job."""
    import nibabel as nib

    from segengine.bench.nifti_agreement import kaggle_to_input_grid
    from segengine.engine.readers.registry import read_patient

    root = tmp_path / "root"
    shutil.copytree(kaggle_root / TRAIN_PATIENT, root / TRAIN_PATIENT)
    data, affine = kaggle_to_input_grid(read_patient(kaggle_root / TRAIN_PATIENT).image)
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), str(root / "case.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((64, 64, 101, 3), np.int16), np.eye(4)), str(root / "long.nii"))
    (root / "long.nii").write_bytes((root / "long.nii").read_bytes()[:1000])
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--patients", str(root), "--out", str(out), "--model", str(MODEL),
                                    "--backend", "onnxruntime", "--max-slices", "100", "--workers", "1", "--ray"])
    assert res.exit_code == 1, res.output
    assert "long.nii: 101 axial slices, more than the limit of 100" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == [TRAIN_PATIENT, "case", "index.html"]
    mask = nib.load(str(out / "case" / "case_mask.nii.gz"))
    np.testing.assert_array_equal(mask.affine, nib.load(str(root / "case.nii.gz")).affine)
    ours, theirs = _masks(out / "case"), _masks(out / TRAIN_PATIENT)
    assert len(ours) == len(theirs) == 23
    a, b = np.stack(list(ours.values())) > 0, np.stack(list(theirs.values())) > 0
    assert b.sum() > 1000 and 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99
    index = (out / "index.html").read_text()
    assert 'data-patient="case"' in index and f'data-patient="{TRAIN_PATIENT.lower()}"' in index


@pytest.mark.parametrize("args, words", [
    (["--patient", "{p}", "--ray"], "--patients ROOT"),
    (["--patients", "{root}", "--workers", "2"], "--workers needs --ray"),
])
def test_ray_bad_invocation(kaggle_root, tmp_path, args, words):
    args = [a.format(p=kaggle_root / VAL_PATIENTS[0], root=kaggle_root) for a in args]
    res = CliRunner().invoke(main, ["run", *args, "--out", str(tmp_path / "out"), "--model", str(MODEL)])
    assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- Triton repository
@pytest.fixture()
def exported_model(tmp_path) -> Path:
    """A private copy of the shipped model with its ONNX exports and sidecars."""
    return copy_model(MODEL, tmp_path / "model", exports=True)


def _bench_json(path: Path, rows: list[tuple[str, int, float]]) -> Path:
    path.write_text(json.dumps({"model_only": [{"backend": b, "batch_size": n, "throughput_slices_s": t, "status": "ok"}
                                               for b, n, t in rows]}))
    return path


def test_triton_repository_matches_triton_layout(exported_model, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    from segengine.export.triton import check_repository, write_repository

    spec = load_model_spec(exported_model)
    bench = _bench_json(tmp_path / "bench.json", [("onnxruntime", 1, 80.0), ("onnxruntime", 8, 92.0),
                                                 ("onnxruntime", 32, 78.0), ("onnxruntime-int8", 8, 116.0),
                                                 ("onnxruntime-int8", 32, 120.0)])
    repo = tmp_path / "repo"
    written = write_repository(spec, repo, bench_json=bench, kinds=["onnx", "onnx-int8"], log=None)
    assert [p.name for p in written] == ["resunet16", "resunet16_int8"]
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == [
        "resunet16", "resunet16/1", "resunet16/1/model.onnx", "resunet16/config.pbtxt",
        "resunet16_int8", "resunet16_int8/1", "resunet16_int8/1/model.onnx", "resunet16_int8/config.pbtxt"]
    assert (repo / "resunet16/1/model.onnx").read_bytes() == spec.export_path("onnx").read_bytes()
    assert (repo / "resunet16_int8/1/model.onnx").read_bytes() == spec.export_path("onnx-int8").read_bytes()
    configs = check_repository(repo)
    fp32, int8 = configs["resunet16"], configs["resunet16_int8"]
    assert fp32.platform == "onnxruntime_onnx" and fp32.max_batch_size == 64
    assert list(fp32.input[0].dims) == [spec.in_channels, 256, 256] and list(fp32.output[0].dims) == [1, 256, 256]
    assert (fp32.input[0].name, fp32.output[0].name) == ("images", "probabilities")
    assert list(fp32.dynamic_batching.preferred_batch_size) == [8]  # 32 is >10% slower, batch 1 never preferred
    assert list(int8.dynamic_batching.preferred_batch_size) == [8, 32]
    assert fp32.instance_group[0].kind == fp32.instance_group[0].KIND_CPU
    for cfg in (fp32, int8):  # the served model names the weights it came from
        assert cfg.parameters["segengine.source_sha256"].string_value == sha256_file(exported_model)


def test_triton_gpu_instance_group(exported_model, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    from segengine.export.triton import check_repository, write_repository

    write_repository(load_model_spec(exported_model), tmp_path / "repo", device="gpu", kinds=["onnx"], log=None)
    cfg = check_repository(tmp_path / "repo")["resunet16"]
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 32]  # no bench file: the defaults


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "config.pbtxt").write_text((d / "config.pbtxt").read_text().replace("max_batch_size", "max_batch")),
     "does not parse"),
    (lambda d: (d / "config.pbtxt").write_text((d / "config.pbtxt").read_text().replace('name: "resunet16"', 'name: "x"')),
     "differs from its folder"),
    (lambda d: (d / "config.pbtxt").write_text((d / "config.pbtxt").read_text().replace("onnxruntime_onnx", "pytorch_libtorch")),
     "platform"),
    (lambda d: (d / "1" / "model.onnx").unlink(), "no model.onnx"),
    (lambda d: (d / "1").rename(d / "v1"), "positive integers"),
    (lambda d: (d / "config.pbtxt").write_text((d / "config.pbtxt").read_text().replace("max_batch_size: 64", "max_batch_size: 4")),
     "must not exceed"),
    (lambda d: (d / "config.pbtxt").unlink(), "no config.pbtxt"),
    (lambda d: (d / "config.pbtxt").write_text((d / "config.pbtxt").read_text().replace("segengine.source_sha256", "x")),
     "must be the weights' SHA-256"),
])
def test_triton_repository_check_refuses(exported_model, tmp_path, damage, words):
    pytest.importorskip("tritonclient.grpc")
    from segengine.engine.core.errors import TritonRepositoryError
    from segengine.export.triton import check_repository, write_repository

    write_repository(load_model_spec(exported_model), tmp_path / "repo", kinds=["onnx"], log=None)
    damage(tmp_path / "repo" / "resunet16")
    with pytest.raises(TritonRepositoryError, match=words):
        check_repository(tmp_path / "repo")


def test_triton_cli(exported_model, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    repo = tmp_path / "repo"
    args = ["export", "--model", str(exported_model), "--triton", str(repo)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "resunet16_int8" in res.output and (repo / "resunet16" / "config.pbtxt").is_file()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "exists" in again.output and "Traceback" not in again.output
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0
    bare = copy_model(MODEL, tmp_path / "bare")  # weights and card, no exports
    res = CliRunner().invoke(main, ["export", "--model", str(bare), "--triton", str(tmp_path / "repo2")])
    assert res.exit_code == 2 and "segengine export" in res.output and not (tmp_path / "repo2").exists()


@pytest.mark.parametrize("rows, backend, expected", [
    ([("onnxruntime", 1, 50.0), ("onnxruntime", 8, 100.0), ("onnxruntime", 32, 95.0)], "onnxruntime", [8, 32]),
    ([("onnxruntime", 1, 50.0), ("onnxruntime", 8, 100.0), ("onnxruntime", 32, 60.0)], "onnxruntime", [8]),
    ([("onnxruntime", 1, 100.0), ("onnxruntime", 8, 50.0)], "onnxruntime", [1]),
    ([("torch", 8, 100.0)], "onnxruntime", [8, 32]),  # nothing measured for this backend: the defaults
])
def test_preferred_batch_sizes_from_bench(tmp_path, rows, backend, expected):
    from segengine.export.triton import preferred_batch_sizes

    assert preferred_batch_sizes(_bench_json(tmp_path / "b.json", rows), backend, max_batch=64) == expected


# ----------------------------------------------------------------------------- Triton server (PyTriton)
REPO_ROOT = Path(__file__).resolve().parents[1]
TRITON_ENV_HINT = ("python3 -m venv .venv-triton && .venv-triton/bin/pip install nvidia-pytriton==0.7.0 "
                   "onnxruntime 'numpy<2'")


def _server_python() -> Path | None:
    candidate = Path(os.environ.get("SEGENGINE_TRITON_PYTHON", REPO_ROOT / ".venv-triton" / "bin" / "python"))
    return candidate if candidate.exists() else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    """PyTriton's bundled Triton server serving the shipped model's fp32 ONNX folder."""
    import subprocess
    import time

    pytest.importorskip("tritonclient.http")
    python = _server_python()
    if python is None:
        pytest.skip(f"no PyTriton server environment; create it with: {TRITON_ENV_HINT}")
    import tritonclient.http as httpclient

    from segengine.export.triton import write_repository

    base = tmp_path_factory.mktemp("triton")
    model = copy_model(MODEL, base / "model", exports=True)
    write_repository(load_model_spec(model), base / "repo", kinds=["onnx"], log=None)
    ports = [_free_port() for _ in range(3)]
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([str(python), str(REPO_ROOT / "export" / "triton_serve.py"), str(base / "repo" / "resunet16"),
                             "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"127.0.0.1:{ports[0]}"
    client = httpclient.InferenceServerClient(url=url)
    deadline = time.time() + 180
    try:
        while True:
            try:
                if client.is_model_ready("resunet16"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("Triton server did not come up:\n" + (base / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield url
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_triton_server_segments_like_local_onnxruntime(triton_server, kaggle_root, val_patients_file, tmp_path,
                                                       monkeypatch):
    """A real patient through tritonclient -> Triton -> the served ONNX model: `validate` must PASS
    at the fp32 tolerance against local ONNX Runtime, and `run --backend triton` writes its outputs."""
    monkeypatch.setenv("SEGENGINE_TRITON_URL", triton_server)
    res = CliRunner().invoke(main, ["validate", "--data", str(kaggle_root), "--patients-file", str(val_patients_file),
                                    "--backend", "triton", "--against", "onnxruntime", "--model", str(MODEL)])
    assert res.exit_code == 0 and "PASS" in res.output, res.output
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--patient", str(kaggle_root / VAL_PATIENTS[1]), "--out", str(out),
                                    "--backend", "triton", "--model", str(MODEL)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / VAL_PATIENTS[1] / "report.json").read_text())["backend"] == "triton"


class _FakeTritonClient:
    """tritonclient.http.InferenceServerClient as far as TritonBackend.load uses it; serves ``config``."""

    config: dict = {}
    input_shape: list = [-1, 3, 256, 256]  # the shipped model's, as Triton reports it (batch first)

    def __init__(self, url, **kwargs):
        self.url = url

    def is_model_ready(self, name):
        return True

    def get_model_config(self, name):
        return self.config

    def get_model_metadata(self, name):
        return {"inputs": [{"name": "images", "datatype": "FP32", "shape": self.input_shape}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1, 256, 256]}]}

    def close(self):
        pass


_C = load_model_spec(MODEL).in_channels  # the shipped card's input width (9 for a 2.5D model)
_OTHER_C = 3 if _C != 3 else 9


@pytest.mark.parametrize("served, input_shape, words", [
    ("same", [-1, _C, 256, 256], None),
    ("0" * 64, [-1, _C, 256, 256], f"serves weights 000000000000..., not {MODEL.name}"),
    (None, [-1, _C, 256, 256], "does not say which weights it serves"),
    ("same", [-1, _OTHER_C, 256, 256], f"takes input (N, {_OTHER_C}, 256, 256) but {MODEL.name}'s card says (N, {_C}, 256, 256)"),
], ids=["same-weights", "other-weights", "no-parameter", "other-channels"])
def test_triton_backend_checks_which_weights_the_server_serves(monkeypatch, served, input_shape, words):
    httpclient = pytest.importorskip("tritonclient.http")
    from segengine.engine.core.errors import BackendUnavailable
    from segengine.engine.inference.backends.triton_backend import TritonBackend

    spec = load_model_spec(MODEL)
    sha = sha256_file(MODEL) if served == "same" else served
    config = {"name": "resunet16", "parameters": {} if sha is None else {"segengine.source_sha256": {"string_value": sha}}}
    monkeypatch.setattr(httpclient, "InferenceServerClient",
                        type("Client", (_FakeTritonClient,), {"config": config, "input_shape": input_shape}))
    monkeypatch.setenv("SEGENGINE_TRITON_URL", "triton.example:8000")
    backend = TritonBackend(spec)
    if words is None:
        assert backend.load().loaded
        return
    with pytest.raises(BackendUnavailable) as info:
        backend.load()
    assert words in str(info.value) and "\n" not in str(info.value)


def test_triton_server_serving_other_weights_is_refused(triton_server, kaggle_root, random_model, tmp_path, monkeypatch):
    """The real server serves the shipped model; a run for other weights must refuse it, writing nothing."""
    monkeypatch.setenv("SEGENGINE_TRITON_URL", triton_server)
    other = copy_model(random_model, tmp_path / "other")
    res = CliRunner().invoke(main, ["run", "--patient", str(kaggle_root / VAL_PATIENTS[1]), "--out", str(tmp_path / "o"),
                                    "--backend", "triton", "--model", str(other)])
    assert res.exit_code == 2 and "serves weights" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o" / VAL_PATIENTS[1]).exists()


def test_triton_backend_without_server_is_one_line(kaggle_root, tmp_path, monkeypatch):
    monkeypatch.delenv("SEGENGINE_TRITON_URL", raising=False)
    res = CliRunner().invoke(main, ["run", "--patient", str(kaggle_root / VAL_PATIENTS[0]), "--out", str(tmp_path / "o"),
                                    "--backend", "triton", "--model", str(MODEL)])
    assert res.exit_code == 2 and "SEGENGINE_TRITON_URL" in res.output and "Traceback" not in res.output
    monkeypatch.setenv("SEGENGINE_TRITON_URL", f"127.0.0.1:{_free_port()}")  # nothing listens there
    res = CliRunner().invoke(main, ["run", "--patient", str(kaggle_root / VAL_PATIENTS[0]), "--out", str(tmp_path / "o"),
                                    "--backend", "triton", "--model", str(MODEL)])
    assert res.exit_code == 2 and "not reachable" in res.output and not (tmp_path / "o" / VAL_PATIENTS[0]).exists()


def test_ray_auto_picks_by_the_figures_for_the_workers_thread_count(kaggle_root, tmp_path, monkeypatch):
    """`--ray --backend auto --threads 1` resolves auto once, in the driver, for what each worker
    runs: 1 thread. Figures for all threads (another speed ranking) must not decide it."""
    pytest.importorskip("ray")
    from segengine.engine.inference import registry
    from segengine.engine.inference import speed
    from segengine.engine.core.errors import BackendUnavailable
    from segengine.engine.job.ray_runner import run_patients_ray

    spec = load_model_spec(MODEL)
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path / "cache"))
    slow = {c: 50.0 for c in registry.AUTO_CANDIDATES}
    speed.record_ms(speed.cpu_key(), spec.sha256, 1, {**slow, "onnxruntime-int8": 1.0}, "test")
    speed.record_ms(speed.cpu_key(), spec.sha256, None, {**slow, "onnxruntime": 1.0}, "test")
    monkeypatch.setattr(speed, "probe", lambda *a, **k: pytest.fail("figures are recorded: nothing to probe"))
    picked, real = [], registry.resolve

    def resolve_then_stop(name, spec, threads=None):
        picked.append(real(name, spec, threads))
        raise BackendUnavailable("stop before Ray starts")

    monkeypatch.setattr(registry, "resolve", resolve_then_stop)
    with pytest.raises(BackendUnavailable, match="stop before Ray starts"):
        run_patients_ray(kaggle_root, tmp_path / "out", "auto", MODEL, threads=1)
    assert picked == ["onnxruntime-int8"]


def test_auto_is_one_choice_per_run_the_same_with_and_without_ray(kaggle_root, ray_cluster, tmp_path, monkeypatch):
    """issue 33: the same `run --backend auto` command with and without `--ray` resolves auto once, in
    the process that starts the run, at the same --threads (none given: the whole machine's figures),
    so it names the same backend in report.json and writes identical masks; the 1-thread figures a
    worker would probe by itself must not decide it."""
    from segengine.engine.inference import registry, speed

    spec = load_model_spec(MODEL)
    trusted = registry.trusted_candidates(registry.AUTO_CANDIDATES, spec)
    if len(trusted) < 2:
        pytest.skip(f"needs two trusted exports of the shipped model, has {trusted}")
    machine_pick, one_thread_pick = trusted[-1], trusted[0]
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path / "cache"))
    slow = {c: 50.0 for c in trusted}
    speed.record_ms(speed.cpu_key(), spec.sha256, None, {**slow, machine_pick: 1.0}, "test")
    speed.record_ms(speed.cpu_key(), spec.sha256, 1, {**slow, one_thread_pick: 1.0}, "test")
    plist = tmp_path / "one.txt"
    plist.write_text(VAL_PATIENTS[1] + "\n")
    outs = {}
    for how, extra in (("local", []), ("ray", ["--ray", "--workers", "1"])):
        outs[how] = tmp_path / how
        res = CliRunner().invoke(main, ["run", "--patients", str(kaggle_root), "--patients-file", str(plist), "--out",
                                        str(outs[how]), "--model", str(MODEL), "--backend", "auto", *extra])
        assert res.exit_code == 0, res.output
    names = {how: json.loads((out / VAL_PATIENTS[1] / "report.json").read_text())["backend"] for how, out in outs.items()}
    assert names == {"local": machine_pick, "ray": machine_pick}
    local, ray_masks = _masks(outs["local"] / VAL_PATIENTS[1]), _masks(outs["ray"] / VAL_PATIENTS[1])
    assert local.keys() == ray_masks.keys() and all(np.array_equal(local[k], ray_masks[k]) for k in local)


def test_ray_workers_get_the_drivers_resolved_backend_and_never_probe(kaggle_root, tmp_path, monkeypatch):
    """The driver hands each worker the name it resolved; a worker refuses 'auto' (it would probe on its own)."""
    from segengine.engine.core.errors import BackendUnavailable
    from segengine.engine.job import ray_runner
    from segengine.engine.inference import registry

    with pytest.raises(BackendUnavailable, match="never 'auto'"):
        ray_runner.SegmentWorker(str(MODEL), "auto", 1, {}, 32, False, False)
    ray = pytest.importorskip("ray")
    handed = []

    class Stop(Exception):
        pass

    def fake_remote(cls):
        class Options:
            def options(self, **kw):
                return self

            def remote(self, model, name, *rest):
                handed.append(name)
                raise Stop
        return Options()

    monkeypatch.setattr(registry, "resolve", lambda name, spec, threads=None: "onnxruntime")
    monkeypatch.setattr(ray, "remote", fake_remote)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2})
    with pytest.raises(Stop):
        ray_runner.run_patients_ray(kaggle_root, tmp_path / "out", "auto", MODEL, workers=1, echo=lambda *_: None)
    assert handed == ["onnxruntime"]


def test_worker_gpu_share():
    from segengine.engine.core.errors import BackendUnavailable
    from segengine.engine.job.ray_runner import worker_gpus

    assert worker_gpus("onnxruntime", 4, 1) == 0
    assert worker_gpus("torch-cuda", 4, 1) == 0.25 and worker_gpus("torch-cuda", 1, 2) == 1.0
    with pytest.raises(BackendUnavailable, match="Ray cluster has none"):
        worker_gpus("torch-cuda-graphs", 2, 0)
