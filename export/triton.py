"""`segengine export --triton REPO`: a Triton Inference Server model repository for the exports.

Layout (Triton's documented one)::

    REPO/<model>/config.pbtxt
    REPO/<model>/1/model.onnx        platform onnxruntime_onnx  (fp32, the INT8 QDQ and the float16 file)
    REPO/<model>/1/model.plan        platform tensorrt_plan     (only where an FP16 engine exists)

Each config carries the source weights' SHA-256 as the model parameter ``segengine.source_sha256``
(``WEIGHTS_SHA256_PARAMETER``): the triton backend reads it back from the server and refuses a
server that serves other weights. Each config is written as protobuf text and parsed back with Triton's own ``ModelConfig``
message (tritonclient ships ``model_config_pb2``) before the model folder is renamed into
place, so a repository that Triton would refuse is never left behind.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from segengine.engine.core.errors import ExportError, TritonRepositoryError
from segengine.engine.inference.onnx_numerics import INPUT_NAME, OUTPUT_NAME
from segengine.engine.model.spec import ModelSpec
from segengine.engine.outputs.results_dir import atomic_dir
from segengine.engine.inference.backends.triton_backend import WEIGHTS_SHA256_PARAMETER

# Triton's file name per platform inside a version folder.
DEFAULT_FILENAMES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
# (export kind, model-name suffix, platform)
TRITON_EXPORTS = (
    ("onnx", "", "onnxruntime_onnx"),
    ("onnx-int8", "_int8", "onnxruntime_onnx"),
    ("onnx-fp16", "_fp16", "onnxruntime_onnx"),  # FP16 kernels with a GPU instance group
    ("tensorrt-fp16", "_trt_fp16", "tensorrt_plan"),
)
FALLBACK_PREFERRED = (8, 32)
BENCH_BACKEND = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime-int8", "onnx-fp16": "onnxruntime-fp16",
                 "tensorrt-fp16": "tensorrt"}


@dataclass
class TritonModel:
    name: str
    platform: str
    export_file: Path
    source_sha256: str
    input_size: int
    in_channels: int  # ModelSpec.in_channels: 3, or 3 per slice of a 2.5D model's context
    max_batch_size: int
    preferred_batch_sizes: list[int]
    instance_kind: str  # KIND_CPU or KIND_GPU
    instance_count: int = 1
    max_queue_delay_us: int = 2000
    notes: list[str] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return DEFAULT_FILENAMES[self.platform]

    def config_text(self) -> str:
        s = self.input_size
        preferred = " ".join(f"preferred_batch_size: {b}" for b in self.preferred_batch_sizes)
        header = "".join(f"# {line}\n" for line in [f"written by segengine export --triton from {self.export_file.name}",
                                                     f"source weights sha256 {self.source_sha256}", *self.notes])
        return (
            f"{header}"
            f'name: "{self.name}"\n'
            f'platform: "{self.platform}"\n'
            f"max_batch_size: {self.max_batch_size}\n"
            "input [\n"
            f'  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {self.in_channels}, {s}, {s} ] }}\n'
            "]\n"
            "output [\n"
            f'  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ 1, {s}, {s} ] }}\n'
            "]\n"
            f"dynamic_batching {{ {preferred} max_queue_delay_microseconds: {self.max_queue_delay_us} }}\n"
            f"instance_group [ {{ count: {self.instance_count} kind: {self.instance_kind} }} ]\n"
            f'version_policy: {{ latest: {{ num_versions: 1 }} }}\n'
            f'parameters: {{ key: "{WEIGHTS_SHA256_PARAMETER}" value: {{ string_value: "{self.source_sha256}" }} }}\n'
        )


def preferred_batch_sizes(bench_json: Path | None, backend: str, max_batch: int, within: float = 0.10) -> list[int]:
    """Batch sizes whose measured throughput is within ``within`` of the best one (from `segengine bench`)."""
    if bench_json is None or not Path(bench_json).is_file():
        return [b for b in FALLBACK_PREFERRED if b <= max_batch]
    try:
        rows = json.loads(Path(bench_json).read_text())["model_only"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{bench_json}: not a `segengine bench --json` file ({exc})") from None
    rows = [r for r in rows if r.get("backend") == backend and r.get("status") == "ok" and r["batch_size"] <= max_batch]
    if not rows:
        return [b for b in FALLBACK_PREFERRED if b <= max_batch]
    best = max(r["throughput_slices_s"] for r in rows)
    sizes = sorted({int(r["batch_size"]) for r in rows if r["throughput_slices_s"] >= (1 - within) * best and r["batch_size"] > 1})
    return sizes or [max(rows, key=lambda r: r["throughput_slices_s"])["batch_size"]]


def parse_config(text: str):
    """Parse config.pbtxt text with Triton's ModelConfig message; TritonRepositoryError if it does not."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ExportError(f"checking a Triton config needs tritonclient[grpc] ({exc}); pip install 'segengine[scale]'") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonRepositoryError(f"config.pbtxt does not parse as Triton's ModelConfig: {exc}") from None


def check_model_dir(model_dir: Path, name: str | None = None) -> Any:
    """Check one model folder against Triton's layout rules; returns the parsed ModelConfig.

    ``name`` is the folder's name in the repository (default: its current name; a folder
    still being written under a temporary name passes the name it will get).
    """
    name = name or model_dir.name
    cfg_path = model_dir / "config.pbtxt"
    if not cfg_path.is_file():
        raise TritonRepositoryError(f"{model_dir}: no config.pbtxt")
    cfg = parse_config(cfg_path.read_text())
    if cfg.name != name:
        raise TritonRepositoryError(f"{cfg_path}: name {cfg.name!r} differs from its folder {name!r}")
    if cfg.platform not in DEFAULT_FILENAMES:
        raise TritonRepositoryError(f"{cfg_path}: platform {cfg.platform!r} is not one segengine writes")
    versions = [p for p in model_dir.iterdir() if p.is_dir()]
    if not versions or any(not p.name.isdigit() or int(p.name) < 1 for p in versions):
        raise TritonRepositoryError(f"{model_dir}: version folders must be positive integers, found {[p.name for p in versions]}")
    for v in versions:
        if not (v / (cfg.default_model_filename or DEFAULT_FILENAMES[cfg.platform])).is_file():
            raise TritonRepositoryError(f"{v}: no {DEFAULT_FILENAMES[cfg.platform]} for platform {cfg.platform}")
    if cfg.max_batch_size < 1 or any(b > cfg.max_batch_size for b in cfg.dynamic_batching.preferred_batch_size):
        raise TritonRepositoryError(f"{cfg_path}: preferred batch sizes must not exceed max_batch_size {cfg.max_batch_size}")
    if [i.name for i in cfg.input] != [INPUT_NAME] or [o.name for o in cfg.output] != [OUTPUT_NAME]:
        raise TritonRepositoryError(f"{cfg_path}: tensors must be {INPUT_NAME} -> {OUTPUT_NAME}")
    sha = cfg.parameters[WEIGHTS_SHA256_PARAMETER].string_value if WEIGHTS_SHA256_PARAMETER in cfg.parameters else ""
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise TritonRepositoryError(f"{cfg_path}: parameter {WEIGHTS_SHA256_PARAMETER} must be the weights' SHA-256, got {sha!r}")
    return cfg


def check_repository(repo: Path) -> dict[str, Any]:
    """Every model folder under ``repo`` checked; returns {name: ModelConfig}."""
    models = {p.name: check_model_dir(p) for p in sorted(Path(repo).iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not models:
        raise TritonRepositoryError(f"{repo}: no model folders")
    return models


def _onnx_io_matches(path: Path, channels: int, size: int) -> None:
    """The ONNX graph's tensor names and per-item dims must be what the config declares."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = lambda t: [d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim]  # noqa: E731
    got = {t.name: dims(t) for t in [*graph.input, *graph.output]}
    want = {INPUT_NAME: [-1, channels, size, size], OUTPUT_NAME: [-1, 1, size, size]}
    if got != want:
        raise TritonRepositoryError(f"{path.name}: graph tensors {got} differ from the Triton config {want}")


def plan_models(spec: ModelSpec, device: str = "cpu", max_batch_size: int = 64, bench_json: Path | None = None,
                kinds: Iterable[str] | None = None) -> list[TritonModel]:
    """The Triton models this spec's current, validated exports give."""
    from segengine.engine.core.errors import ModelError
    from segengine.engine.inference.verdict import why_untrusted
    from segengine.engine.model.spec import check_export

    models = []
    for kind, suffix, platform in TRITON_EXPORTS:
        if kinds is not None and kind not in kinds:
            continue
        path = spec.export_path(kind)
        if not path.exists():
            continue
        try:
            check_export(spec, kind)
        except ModelError as exc:
            raise ExportError(f"{path.name} is not a current export of {spec.weights.name} ({exc}); run segengine export") from None
        gpu = platform == "tensorrt_plan" or device == "gpu"
        why = why_untrusted(spec, BENCH_BACKEND[kind])
        note = f"segengine validate: {'trusted PASS recorded' if why is None else why}"
        models.append(TritonModel(
            name=spec.name + suffix, platform=platform, export_file=path, source_sha256=spec.sha256,
            input_size=spec.input_size, in_channels=spec.in_channels, max_batch_size=max_batch_size,
            preferred_batch_sizes=preferred_batch_sizes(bench_json, BENCH_BACKEND[kind], max_batch_size),
            instance_kind="KIND_GPU" if gpu else "KIND_CPU", notes=[note]))
    if not models:
        raise ExportError(f"no exports beside {spec.weights.name}; run `segengine export` first")
    return models


def write_repository(spec: ModelSpec, repo: Path, device: str = "cpu", max_batch_size: int = 64,
                     bench_json: Path | None = None, overwrite: bool = False, kinds: Iterable[str] | None = None,
                     log=print) -> list[Path]:
    """Write one model folder per export into ``repo``; each is checked, then renamed into place."""
    if device not in ("cpu", "gpu"):
        raise ExportError(f"device must be cpu or gpu, not {device!r}")
    repo = Path(repo)
    models = plan_models(spec, device, max_batch_size, bench_json, kinds)
    repo.mkdir(parents=True, exist_ok=True)
    for m in models:
        if (repo / m.name).exists() and not overwrite:
            raise ExportError(f"{repo / m.name}: exists (use --overwrite to replace it)")
    written = []
    for m in models:
        if m.platform == "onnxruntime_onnx":
            _onnx_io_matches(m.export_file, m.in_channels, m.input_size)
        # existing folders were refused above unless --overwrite
        with atomic_dir(repo, m.name, overwrite=True) as stage:
            (stage / "1").mkdir()
            shutil.copyfile(m.export_file, stage / "1" / m.filename)
            (stage / "config.pbtxt").write_text(m.config_text())
            check_model_dir(stage, name=m.name)
        written.append(repo / m.name)
        if log:
            log(f"triton: {repo / m.name} ({m.platform}, {m.instance_kind}, preferred batch {m.preferred_batch_sizes})")
    return written
