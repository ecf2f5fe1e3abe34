"""PyTorch -> ONNX (fp32 probabilities), BatchNorm folded, verified against PyTorch.

The exported graph takes ``images`` (N, C, S, S) float32 normalized slices (C = the card's
``ModelSpec.in_channels``: 3, or 3 per slice of a 2.5D model's context) and returns
``probabilities`` (N, 1, S, S) float32 (the logits model wrapped in a sigmoid), with a
dynamic batch axis. After export it is checked with ``onnx.checker``, folded by ONNX
Runtime's offline *basic* optimizer (constant folding, Conv+BatchNorm fusion: standard
ONNX operators only, so the saved file stays portable to TensorRT and other runtimes),
checked again, and compared with PyTorch at batch sizes 1, 7 and 32 (Optimum-style
``atol`` check). Files are written atomically (temporary file, then ``os.replace``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from segengine.engine.core.atomic import atomic_file, now_iso, temp_path_beside, write_json_atomic
from segengine.engine.core.errors import ExportError, ExportToolMissing, ShapeMismatchError, ToleranceExceededError
from segengine.engine.inference.onnx_numerics import INPUT_NAME, OUTPUT_NAME, ort_run, ort_session
from segengine.engine.model.spec import SLICE_CHANNELS, ModelSpec, sha256_file, sidecar_path

DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}


VERIFY_BATCH_SIZES = (1, 7, 32)


def tool_versions(*names: str) -> dict[str, str]:
    """``{"torch": "2.13.0", ...}`` for the importable ones among ``names``."""
    import importlib

    out = {}
    for name in names:
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception:  # noqa: BLE001 - absent or broken tool: just not listed
            continue
    return out


def sidecar_identity(kind: str, precision: str, out_path: Path, spec: ModelSpec) -> dict[str, Any]:
    """The fields every export's sidecar opens with: what it is and which weights it came from
    (what ``check_export`` and the verdict module verify)."""
    return {"kind": kind, "file": out_path.name, "source_weights": spec.weights.name, "source_sha256": spec.sha256,
            "sha256": sha256_file(out_path), "precision": precision}


def write_sidecar(export_file: Path, sidecar: dict[str, Any]) -> Path:
    """Write ``<export_file>.json`` atomically; returns its path."""
    p = sidecar_path(Path(export_file))
    write_json_atomic(p, sidecar)
    return p


def synthetic_images(n: int = 8, size: int = 256, seed: int = 0, channels: int = SLICE_CHANNELS) -> np.ndarray:
    """A deterministic (n, channels, size, size) float32 batch shaped like z-normalized slices."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, channels, size, size), dtype=np.float32)


def repeat_to(images: np.ndarray, n: int) -> np.ndarray:
    """``n`` slices taken cyclically from ``images`` (repeats them to reach ``n``)."""
    if len(images) == 0:
        raise ExportError("no images to verify with")
    return np.ascontiguousarray(images[np.arange(n) % len(images)], dtype=np.float32)


def compare_outputs(expected: np.ndarray, got: np.ndarray, atol: float, what: str = "export vs source") -> float:
    """Max abs diff of two outputs; raises ShapeMismatchError / ToleranceExceededError."""
    expected = np.asarray(expected)
    got = np.asarray(got)
    if expected.shape != got.shape:
        raise ShapeMismatchError(what, expected.shape, got.shape)
    if expected.size == 0:
        return 0.0
    diff = np.abs(expected.astype(np.float64) - got.astype(np.float64))
    max_diff = float(np.max(diff)) if np.all(np.isfinite(diff)) else float("inf")
    if not max_diff <= atol:
        raise ToleranceExceededError(what, max_diff, atol)
    return max_diff


def count_ops(model_or_path) -> dict[str, int]:
    """``{op_type: count}`` over the main graph of an ONNX model (path or ModelProto)."""
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def set_metadata(proto, values: dict[str, str]) -> None:
    """Set ``metadata_props`` keys of an ONNX ModelProto (replacing existing ones)."""
    kept = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def check_images(images: np.ndarray, item_shape: tuple[int, ...], what: str = "verify_images") -> np.ndarray:
    """``images`` as contiguous float32 if they are (N >= 1, *item_shape) (``ModelSpec.input_shape``
    or an export's input dims), else ShapeMismatchError: a 3-channel batch never reaches a 2.5D model."""
    images = np.asarray(images)
    if images.ndim != 1 + len(item_shape) or tuple(images.shape[1:]) != tuple(item_shape) or len(images) == 0:
        raise ShapeMismatchError(what, ("N", *item_shape), images.shape, kind="input")
    return np.ascontiguousarray(images, dtype=np.float32)


# --------------------------------------------------------------------------- exporters
def _export_torchscript(model, example, path: Path, opset: int) -> None:
    # Deliberately the legacy TorchScript exporter (dynamo=False): since torch 2.9 the default
    # is dynamo=True (torch.export), which needs onnxscript (not a dependency, not installed
    # here) and expresses the batch axis through `dynamic_shapes` / torch.export.Dim, with
    # its own specialization rules; this plain conv net gains nothing from it. The TorchScript
    # exporter with `dynamic_axes` gives a stable opset-17 graph with a symbolic "batch" dim,
    # the form ORT quantization and TensorRT 10's ONNX parser are best tested with. It is
    # deprecated (DeprecationWarning) but present and working in torch 2.13.
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes=DYNAMIC_AXES,
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.EVAL,
            dynamo=False,
        )


def _export_dynamo(model, example, path: Path, opset: int) -> None:
    """Fallback: the torch.export-based exporter with a dynamic batch via ``dynamic_shapes``."""
    import importlib.util

    import torch

    if importlib.util.find_spec("onnxscript") is None:
        raise ExportToolMissing("the dynamo ONNX exporter needs onnxscript, which is not installed (pip install onnxscript)")
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,
    )
    program.optimize()
    program.save(str(path), external_data=False)


def _ort_fold(src: Path, dst: Path) -> None:
    """ONNX Runtime offline optimization at ORT_ENABLE_BASIC (portable ONNX ops only)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.intra_op_num_threads = 1
    ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- the export
def export_onnx(
    spec: ModelSpec,
    out_path: str | os.PathLike | None = None,
    opset: int = 17,
    verify_images: np.ndarray | None = None,
    atol: float = 1e-4,
    *,
    batch_sizes: Iterable[int] = VERIFY_BATCH_SIZES,
    exporter: str = "auto",
    threads: int | None = None,
    log=None,
) -> dict[str, Any]:
    """Export ``spec``'s weights to an fp32 ONNX file of probabilities; returns the sidecar.

    ``verify_images``: (N, C, S, S) float32 model input (``inference.predict.model_input`` of preprocessed
    patients) to compare with PyTorch on (repeated to reach each batch size); None uses a
    deterministic synthetic batch.
    ``exporter``: "torchscript", "dynamo", or "auto" (TorchScript, dynamo if it is unavailable).
    Raises ShapeMismatchError / ToleranceExceededError when the ONNX model disagrees.
    """
    import onnx
    import torch

    from segengine.engine.model.network import ProbabilityModel
    from segengine.engine.model.spec import load_torch_model

    say = log or (lambda *_: None)
    out_path = Path(out_path) if out_path is not None else spec.export_path("onnx")
    size = spec.input_size
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise ExportError(f"batch sizes must be >= 1, got {batch_sizes}")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ExportError(f"unknown exporter {exporter!r} (expected auto, torchscript or dynamo)")
    if verify_images is None:
        images, image_source = synthetic_images(8, size, channels=spec.in_channels), "synthetic"
    else:
        images, image_source = check_images(verify_images, spec.input_shape), "real"

    model = ProbabilityModel(load_torch_model(spec)).eval()
    example = torch.from_numpy(repeat_to(images, 2))  # batch 2: nothing specializes on 1
    out_path.parent.mkdir(parents=True, exist_ok=True)
    raw = temp_path_beside(out_path, "raw")
    try:
        with atomic_file(out_path, "folded") as folded:  # put in place only once it verifies
            used = first_failure = None
            if exporter in ("auto", "torchscript"):
                try:
                    _export_torchscript(model, example, raw, opset)
                    used = "torch.onnx.export (TorchScript, dynamo=False, dynamic_axes)"
                except (TypeError, AttributeError, ImportError, RuntimeError) as exc:
                    first_failure = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                    if exporter == "torchscript":
                        raise ExportError(f"TorchScript ONNX export failed: {first_failure}") from exc
                    say(f"TorchScript exporter failed ({first_failure}); trying the dynamo exporter")
            if used is None:
                try:
                    _export_dynamo(model, example, raw, opset)
                except ExportError as exc:
                    if first_failure is None:
                        raise
                    raise ExportError(f"TorchScript ONNX export failed ({first_failure}) and the dynamo fallback too ({exc})") from None
                except Exception as exc:  # noqa: BLE001 - torch.export raises many types
                    why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                    prefix = f"TorchScript ONNX export failed ({first_failure}); " if first_failure else ""
                    raise ExportError(f"{prefix}dynamo ONNX export failed: {why}") from exc
                used = "torch.onnx.export (dynamo=True, dynamic_shapes)"
            try:
                onnx.checker.check_model(str(raw), full_check=True)
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"exported ONNX fails onnx.checker: {str(exc).splitlines()[0][:200]}") from None

            _ort_fold(raw, folded)
            proto = onnx.load(str(folded))
            ops = count_ops(proto)
            if ops.get("BatchNormalization"):
                raise ExportError(f"{ops['BatchNormalization']} BatchNormalization nodes left after folding; expected 0")
            # ORT's writer lists every domain it knows (com.microsoft, ...); keep the ones used.
            used_domains = {n.domain for n in proto.graph.node} | {""}
            kept = [o for o in proto.opset_import if o.domain in used_domains or o.domain == "ai.onnx"]
            del proto.opset_import[:]
            proto.opset_import.extend(kept)
            # The exporter names the output's channel/height/width symbolically (the bilinear head
            # computes its size from Shape ops); declare (batch, 1, S, S), checked by the runs below.
            out_dims = proto.graph.output[0].type.tensor_type.shape.dim
            if len(out_dims) != 4:
                raise ShapeMismatchError("ONNX output rank", (4,), (len(out_dims),))
            for dim, value in zip(list(out_dims)[1:], (1, size, size)):
                dim.dim_value = value
            set_metadata(proto, {"segengine.model": spec.name, "segengine.source_sha256": spec.sha256})
            try:
                onnx.checker.check_model(proto, full_check=True)
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"folded ONNX fails onnx.checker: {str(exc).splitlines()[0][:200]}") from None
            onnx.save(proto, str(folded))

            # ---- verify against PyTorch (Optimum-style: same inputs, max abs diff <= atol)
            big = repeat_to(images, max(batch_sizes))
            with torch.inference_mode():
                expected = model(torch.from_numpy(big)).numpy()
            session = ort_session(folded, threads=threads)
            if tuple(session.get_inputs()[0].shape[1:]) != spec.input_shape:
                raise ShapeMismatchError("ONNX input", spec.input_shape, tuple(session.get_inputs()[0].shape[1:]), kind="input")
            per_batch = {}
            for b in batch_sizes:
                got = ort_run(session, big[:b])
                per_batch[str(b)] = compare_outputs(expected[:b], got, atol, f"ONNX vs PyTorch at batch {b}")
            del session
            max_diff = max(per_batch.values())
            say(f"onnx: verified against PyTorch at batch {', '.join(map(str, batch_sizes))}: max abs diff {max_diff:.2e} (<= {atol:g})")

    finally:
        raw.unlink(missing_ok=True)

    sidecar = {
        **sidecar_identity("onnx", "fp32", out_path, spec),
        "opset": int(opset),
        "input_size": int(size),
        "input": {"name": INPUT_NAME, "shape": ["batch", *spec.input_shape], "dtype": "float32",
                  "context_slices": spec.context_slices},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", 1, size, size], "dtype": "float32", "meaning": "sigmoid probabilities"},
        "exporter": used,
        "graph_optimization": "onnxruntime offline ORT_ENABLE_BASIC (constant folding, Conv+BatchNorm fusion)",
        "ops": ops,
        "versions": tool_versions("torch", "onnx", "onnxruntime"),
        "verification": {
            "against": "torch",
            "images": image_source,
            "num_images": int(len(images)),
            "batch_sizes": batch_sizes,
            "max_abs_diff": max_diff,
            "max_abs_diff_per_batch": per_batch,
            "tolerance": float(atol),
        },
        "created": now_iso(),
    }
    write_sidecar(out_path, sidecar)
    return sidecar
