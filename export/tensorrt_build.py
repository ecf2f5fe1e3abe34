"""ONNX fp32 -> TensorRT 10.x FP16 engine (``<name>.fp16.plan``), verified against ONNX Runtime fp32.

Needs TensorRT 10.x (``pip install 'segengine[gpu]'``) and an NVIDIA GPU; without them
``build_tensorrt_engine`` raises ExportToolMissing with a one-line reason.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from segengine.engine.core.atomic import now_iso, write_bytes_atomic
from segengine.engine.core.errors import ExportError, ExportToolMissing
from segengine.engine.inference.onnx_numerics import ort_run, ort_session
from segengine.engine.model.spec import sha256_file, sidecar_path
from segengine.export.fp16 import FP16_ATOL
from segengine.export.onnx_export import (check_images, compare_outputs, repeat_to, synthetic_images, tool_versions,
                                          write_sidecar)


def _import_tensorrt():
    """``tensorrt`` 10.x on a machine with a CUDA GPU, else ExportToolMissing (never ImportError)."""
    from segengine.engine.inference.backends.tensorrt_backend import tensorrt_missing_reason

    why = tensorrt_missing_reason()
    if why:
        raise ExportToolMissing(why)
    import tensorrt as trt

    return trt


def _fast_fp16(builder, identity: dict) -> bool:
    # platform_has_fast_fp16 is deprecated since TensorRT 10.5 ("query CUDA directly") but present
    # in every 10.x; fall back to the compute capability (fast FP16 from sm_53; TRT 10 needs sm_75+).
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        flag = getattr(builder, "platform_has_fast_fp16", None)
    if flag is not None:
        return bool(flag)
    return tuple(identity["compute_capability"]) >= (5, 3)


def constrain_to_fp32(trt, network, names) -> list[str]:
    """Pin the layers named after ONNX nodes ``names`` to float32 (precision and outputs); returns them.

    TensorRT's ONNX parser names a node's layer after the node. A name that matches no layer
    is an ExportError: a silently unconstrained layer could overflow in FP16.
    """
    wanted = set(names)
    done = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in wanted:
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            done.append(layer.name)
    missing = sorted(wanted - set(done))
    if missing:
        raise ExportError(f"no TensorRT layer is named after ONNX node(s) {', '.join(missing)}; cannot keep them in float32")
    return done


def _source_of(onnx_path: Path) -> dict[str, Any]:
    """source_sha256, input name and dims of the fp32 ONNX file (its sidecar, else its metadata);
    the input's per-item dims (C, S, S) are the graph's and must agree with its sidecar's."""
    import onnx

    side_p = sidecar_path(onnx_path)
    side = json.loads(side_p.read_text()) if side_p.exists() else {}
    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.input[0].type.tensor_type.shape.dim]
    declared = (side.get("input") or {}).get("shape")
    if isinstance(declared, list) and declared[1:] != dims[1:]:
        raise ExportError(f"{onnx_path}: input dims {dims[1:]} differ from its sidecar's {list(declared[1:])}; re-export it")
    return {
        "source_sha256": side.get("source_sha256") or meta.get("segengine.source_sha256"),
        "source_weights": side.get("source_weights"),
        "input_name": model.graph.input[0].name,
        "input_dims": dims,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    }


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    min_batch: int = 1,
    opt_batch: int = 16,
    max_batch: int = 64,
    workspace_gb: float = 2,
    *,
    fp32_layers: list[str] | tuple[str, ...] = (),
    verify_images: np.ndarray | None = None,
    atol: float = FP16_ATOL,
    log=None,
) -> dict[str, Any]:
    """Build an FP16 TensorRT engine from the fp32 ONNX file; returns the sidecar.

    TensorRT 10.x Python API: Builder -> network from OnnxParser (explicit batch is the only
    mode in TRT 10) -> BuilderConfig with ``BuilderFlag.FP16`` (when the GPU has fast FP16),
    a workspace memory-pool limit and one optimization profile over the ``images`` batch
    (min/opt/max) -> ``build_serialized_network``. The plan is run on ``verify_images``
    (synthetic if None) at batch 1, 7 and ``opt_batch`` and compared with ONNX Runtime fp32
    (max abs diff <= ``atol``) before it is written atomically.

    ``fp32_layers`` (ONNX node names, the fp16 export's range-unsafe nodes) are pinned to
    float32 with ``layer.precision``/``set_output_type`` and ``OBEY_PRECISION_CONSTRAINTS``.

    TensorRT 11 removed ``BuilderFlag.FP16`` (weakly typed precision flags): FP16 there needs
    a strongly typed network built from an FP16 ONNX model (NVIDIA ModelOpt AutoCast). That
    path is not implemented; with TensorRT >= 11 this raises ExportToolMissing.
    """
    say = log or (lambda *_: None)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.exists():
        raise ExportError(f"{onnx_path}: no ONNX model to build a TensorRT engine from")
    if not (1 <= min_batch <= opt_batch <= max_batch):
        raise ExportError(f"profile batches must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    trt = _import_tensorrt()
    from segengine.engine.inference.backends.tensorrt_backend import TrtPlanRunner, gpu_identity

    source = _source_of(onnx_path)
    dims = source["input_dims"]
    if len(dims) != 4 or dims[0] is not None or None in dims[1:]:
        raise ExportError(f"{onnx_path}: input {source['input_name']} has shape {dims}; expected (batch, C, S, S)")
    chw = tuple(int(d) for d in dims[1:])  # C: 3, or 3 per slice of a 2.5D model's context
    if verify_images is not None:
        verify_images = check_images(verify_images, chw)

    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the default (and only) mode in TRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT cannot parse it ({errors[:300]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    identity = gpu_identity(0)
    if not _fast_fp16(builder, identity):
        raise ExportToolMissing(f"{identity['name']} has no fast FP16; an FP16 engine would gain nothing")
    config.set_flag(trt.BuilderFlag.FP16)
    fp32_done = constrain_to_fp32(trt, network, fp32_layers)
    if fp32_done:  # without this flag TensorRT may still pick FP16 kernels for them
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (min_batch, *chw), (opt_batch, *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)
    say(f"tensorrt-fp16: building (profile batch {min_batch}/{opt_batch}/{max_batch}, workspace {workspace_gb} GiB)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{onnx_path}: TensorRT build_serialized_network failed (see TensorRT's log above)")
    plan = bytes(plan)
    build_s = time.perf_counter() - started

    # ---- verify against ONNX Runtime fp32 on the CPU
    images = synthetic_images(8, chw[-1], channels=chw[0]) if verify_images is None else verify_images
    sizes = sorted({b for b in (1, 7, opt_batch) if min_batch <= b <= max_batch} | {min_batch})
    big = repeat_to(images, max(sizes))
    expected = ort_run(ort_session(onnx_path), big)
    runner = TrtPlanRunner(plan)
    per_batch = {}
    try:
        for b in sizes:
            per_batch[str(b)] = compare_outputs(expected[:b], runner.infer(big[:b]), atol, f"TensorRT FP16 vs ONNX fp32 at batch {b}")
    finally:
        runner.close()
    max_diff = max(per_batch.values())
    say(f"tensorrt-fp16: built in {build_s:.0f} s; max abs diff vs ONNX fp32 {max_diff:.2e} (<= {atol:g})")

    write_bytes_atomic(out_path, plan)
    sidecar = {
        "kind": "tensorrt-fp16",
        "file": out_path.name,
        "source_weights": source["source_weights"],
        "source_sha256": source["source_sha256"],
        "sha256": sha256_file(out_path),
        "precision": "fp16",
        "opset": source["opset"],
        "input_size": int(chw[-1]),
        "source_onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        "tensorrt_version": str(trt.__version__),
        "profile": {"input": name, "min": [min_batch, *chw], "opt": [opt_batch, *chw], "max": [max_batch, *chw]},
        "builder": {"fp16": True, "workspace_gb": workspace_gb, "build_seconds": round(build_s, 1),
                    "fp32_layers": fp32_done, "obey_precision_constraints": bool(fp32_done)},
        "device": identity,
        "versions": {"tensorrt": str(trt.__version__), **tool_versions("torch", "onnx", "onnxruntime")},
        "verification": {
            "against": "onnxruntime fp32 (CPU)",
            "images": "synthetic" if verify_images is None else "real",
            "batch_sizes": sizes,
            "max_abs_diff": max_diff,
            "max_abs_diff_per_batch": per_batch,
            "tolerance": float(atol),
        },
        "created": now_iso(),
    }
    write_sidecar(out_path, sidecar)
    return sidecar
