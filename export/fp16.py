"""fp32 ONNX -> float16 ONNX (``<name>.fp16.onnx``), its FP16 range report, and CPU numerics.

FP16 can break a network in two measurable ways: an activation above 65504 overflows to
inf, and non-zero values below the smallest normal (2**-14, about 6.1e-5) lose precision
and are flushed to zero by some kernels. ``measure_ranges`` runs the fp32 ONNX graph with
every float node output exposed and records, per node, the largest |value| and the share of
non-zero values below the smallest normal. A node is *unsafe* when its largest |value| is not
below ``SAFE_MAX`` (65504/16: four binary orders of magnitude of headroom for inputs brighter
than the measured ones) or more than ``MAX_SUBNORMAL_SHARE`` of its non-zero values are
subnormal in FP16. Unsafe nodes stay float32 in the fp16 ONNX graph (onnxconverter-common's
``node_block_list``) and in the TensorRT build (layer precision constraints).

ONNX Runtime's CPU provider has no float16 kernels for this graph's operators on x86: it
inserts casts and runs the nodes in float32, also dropping the float16 rounding *between*
nodes (its optimized graph keeps only the casts on weights and around float32 nodes; on an
all-float16 graph the output moved by 3e-6 from fp32, i.e. only weights were rounded). So on the CPU
``storage_emulation`` rewrites the float16 graph into a float32 graph that rounds every
float16 tensor to float16 (Cast to float16 and back): fp16 weights, fp16 activations after
every node, fp32 arithmetic inside a node -- what FP16 GPU kernels with fp32 accumulation
(TensorRT, cuDNN tensor cores) store. On CUDA the float16 file runs as it is.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from segengine.engine.core.atomic import atomic_file, now_iso
from segengine.engine.core.errors import ConverterMissing, ExportError
from segengine.engine.inference.onnx_numerics import (_FLOAT, _FLOAT16, SAFETY_RULE, RangeMeter, emulation_session,
                                                      float_nodes, ort_run, ort_session)
from segengine.engine.model.spec import ModelSpec, check_export, sha256_file
from segengine.export.onnx_export import (check_images, compare_outputs, count_ops, set_metadata, sidecar_identity,
                                          synthetic_images, tool_versions, write_sidecar)

FP16_ATOL = 2e-2  # max |dP| of an FP16 export vs fp32 ONNX on the verification slices (also TensorRT's)


# --------------------------------------------------------------------------- conversion
def convert_to_fp16(fp32_model, keep_fp32: Iterable[str] = ()):
    """float16 weights and activations, float32 graph inputs/outputs; ``keep_fp32`` nodes stay float32."""
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise ConverterMissing(f"the float16 converter needs onnxconverter-common ({exc}); pip install onnxconverter-common") from None
    keep = list(keep_fp32)
    with warnings.catch_warnings():  # "float32 number 3e-08 will be truncated to 1e-07": tiny weights, expected
        warnings.simplefilter("ignore", UserWarning)
        model = float16.convert_float_to_float16(_unshared_weights(fp32_model, keep), keep_io_types=True,
                                                 node_block_list=keep or None)
    _float32_outputs(model)
    return model


def _unshared_weights(fp32_model, keep_fp32: list[str]):
    """A copy where each ``keep_fp32`` node has its own initializers.

    ORT's constant folding shares equal initializers between nodes (e.g. the zero biases of
    folded BatchNorms); onnxconverter-common 1.16 then keeps a blocked node's shared bias float32
    for every user, and the float16 nodes among them fail to load (Conv bound to float16 and float).
    """
    import onnx

    if not keep_fp32:
        return fp32_model
    model = onnx.ModelProto()
    model.CopyFrom(fp32_model)
    kept = set(keep_fp32)
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i in inits:
                users.setdefault(i, set()).add(n.name)
    for n in model.graph.node:
        if n.name not in kept:
            continue
        for k, name in enumerate(n.input):
            if name in inits and users[name] - kept:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__fp32__{n.name}"
                model.graph.initializer.append(copy)
                n.input[k] = copy.name
    return model


def _float32_outputs(model) -> None:
    """Keep graph outputs float32 when a blocked node feeds them.

    onnxconverter-common 1.16 with ``keep_io_types`` still casts a blocked last node's float32
    output to float16 and declares the graph output float16; that Cast becomes float32 -> float32.
    """
    from onnx import helper

    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        if out.type.tensor_type.elem_type != _FLOAT16:
            continue
        node = producers.get(out.name)
        if node is not None and node.op_type == "Cast":
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("to", _FLOAT))
        else:
            raise ExportError(f"float16 conversion left graph output {out.name} float16")
        out.type.tensor_type.elem_type = _FLOAT


def fp32_compute_nodes(fp16_model) -> list[str]:
    """Nodes of a converted graph that still compute in float32 (block list and converter defaults)."""
    return [name for name, op, _ in float_nodes(fp16_model)]


# --------------------------------------------------------------------------- the export
def export_fp16(
    spec: ModelSpec,
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    range_images: np.ndarray | None = None,
    verify_images: np.ndarray | None = None,
    *,
    range_info: dict[str, Any] | None = None,
    atol: float = FP16_ATOL,
    threads: int | None = None,
    log=None,
) -> dict[str, Any]:
    """Convert the current fp32 ONNX export to float16; returns the sidecar.

    ``range_images`` (training model inputs, (n, C, S, S) as ``spec`` takes them) decide which
    nodes stay float32 (module doc); without
    them no node is kept and the sidecar says the ranges were not measured (``validate``
    measures them on the validation patients and fails an unsafe node running in fp16).
    The result is checked with onnx.checker and compared with the fp32 export on
    ``verify_images`` through ``storage_emulation`` (max |dP| <= ``atol``) before it is
    written atomically.
    """
    import onnx

    say = log or (lambda *_: None)
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    check_export(spec, "onnx")
    if verify_images is not None:
        verify_images = check_images(verify_images, spec.input_shape)
    ranges = None
    keep: list[str] = []
    if range_images is not None and len(range_images):
        meter = RangeMeter(fp32_path, threads=threads)
        meter.add(check_images(range_images, spec.input_shape, "range images"))
        keep = meter.report()["unsafe"]
        ranges = meter.report(keep)
        ranges.update(range_info or {})
        say(f"onnx-fp16: ranges over {meter.slices} slices: smallest headroom {ranges['smallest_headroom']:.0f}x, "
            f"largest subnormal share {ranges['largest_subnormal_share']:.2e}; kept in fp32: {', '.join(keep) or 'none'}")
    proto = convert_to_fp16(onnx.load(str(fp32_path)), keep)
    set_metadata(proto, {"segengine.model": spec.name, "segengine.source_sha256": spec.sha256, "segengine.precision": "fp16"})
    try:
        onnx.checker.check_model(proto, full_check=True)  # with type inference: float16/float32 mix-ups
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"float16 ONNX fails onnx.checker: {str(exc).splitlines()[0][:200]}") from None
    graph_fp32 = fp32_compute_nodes(proto)
    with atomic_file(out_path, "fp16") as tmp:  # put in place only once it verifies
        onnx.save(proto, str(tmp))
        check = synthetic_images(8, spec.input_size, channels=spec.in_channels) if verify_images is None else verify_images
        expected = ort_run(ort_session(fp32_path, threads=threads), check)
        got = ort_run(emulation_session(tmp, threads=threads), check)
        max_diff = compare_outputs(expected, got, atol, "FP16 (storage emulated) vs fp32 ONNX")
        say(f"onnx-fp16: vs fp32 on {len(check)} slices: max abs diff {max_diff:.2e} (<= {atol:g})")
    sidecar = {
        **sidecar_identity("onnx-fp16", "fp16", out_path, spec),
        "input_size": int(spec.input_size),
        "source_onnx": {"file": fp32_path.name, "sha256": sha256_file(fp32_path)},
        "conversion": {
            "tool": "onnxconverter_common.float16.convert_float_to_float16",
            "keep_io_types": True,
            "fp32_nodes": keep,  # by the range rule: also kept float32 by the TensorRT build
            "fp32_nodes_in_graph": graph_fp32,  # all float32 compute nodes (the converter's defaults too)
            "rule": SAFETY_RULE,
        },
        "ranges": ranges or {"measured": False, "why": "no training slices given (export --data/--train-list)"},
        "ops": count_ops(proto),
        "versions": tool_versions("onnx", "onnxruntime", "onnxconverter_common"),
        "verification": {
            "against": "onnx fp32",
            "runtime": "onnxruntime CPU, float16 storage emulated",
            "images": "synthetic" if verify_images is None else "real",
            "num_images": int(len(check)),
            "max_abs_diff": max_diff,
            "tolerance": float(atol),
        },
        "created": now_iso(),
    }
    write_sidecar(out_path, sidecar)
    return sidecar
