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
from segengine.engine.core.errors import ExportError, ExportToolMissing
from segengine.engine.model.spec import ModelSpec, check_export, sha256_file
from segengine.export.onnx_export import (
    check_images,
    compare_outputs,
    count_ops,
    ort_run,
    ort_session,
    set_metadata,
    sidecar_identity,
    synthetic_images,
    tool_versions,
    write_sidecar,
)

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14  # 6.1035e-05
SAFE_MAX = FP16_MAX / 16
MAX_SUBNORMAL_SHARE = 1e-3
SAFETY_RULE = (f"a node stays float32 unless its largest |activation| < 65504/16 = {SAFE_MAX:g} "
               f"and at most {MAX_SUBNORMAL_SHARE:g} of its non-zero values are below 2**-14")
FP16_ATOL = 2e-2  # max |dP| of an FP16 export vs fp32 ONNX on the verification slices (also TensorRT's)
_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16


class ConverterMissing(ExportToolMissing):
    """onnxconverter-common (the float16 converter) is not installed."""


# --------------------------------------------------------------------------- graph helpers
def _elem_types(model) -> dict[str, int]:
    """tensor name -> ONNX element type, from shape inference over ``model``."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    return types


def float_nodes(model) -> list[tuple[str, str, str]]:
    """(node name, op type, output) of every node whose first output is a float32 activation."""
    types = _elem_types(model)
    return [(n.name, n.op_type, n.output[0]) for n in model.graph.node
            if n.output and types.get(n.output[0]) == _FLOAT and n.op_type not in ("Cast", "Constant", "Shape")]


def _with_outputs(model, names: Iterable[str]):
    """A copy of ``model`` with ``names`` added as float graph outputs (shapes left to ORT)."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_tensor_value_info(n, _FLOAT, None) for n in names if n not in have)
    return out


# --------------------------------------------------------------------------- range report
class RangeMeter:
    """Per-node largest |activation| and FP16-subnormal share, accumulated over batches."""

    def __init__(self, fp32_onnx: str | os.PathLike, threads: int | None = None):
        import onnx

        model = onnx.load(str(fp32_onnx))
        self.nodes = float_nodes(model)
        self.session = ort_session(_with_outputs(model, [o for _, _, o in self.nodes]).SerializeToString(),
                                   threads=threads, level="basic")
        self.outputs = [o for _, _, o in self.nodes]
        self.max_abs = np.zeros(len(self.nodes))
        self.nonzero = np.zeros(len(self.nodes), dtype=np.int64)
        self.subnormal = np.zeros(len(self.nodes), dtype=np.int64)
        self.slices = 0

    def add(self, images: np.ndarray, batch_size: int = 4) -> None:
        for s in range(0, len(images), batch_size):
            values = self.session.run(self.outputs, {self.session.get_inputs()[0].name:
                                                     np.ascontiguousarray(images[s : s + batch_size], np.float32)})
            for i, v in enumerate(values):
                a = np.abs(v)
                self.max_abs[i] = max(self.max_abs[i], float(a.max()) if a.size else 0.0)
                nz = a > 0
                self.nonzero[i] += int(nz.sum())
                self.subnormal[i] += int((nz & (a < FP16_MIN_NORMAL)).sum())
        self.slices += len(images)

    def report(self, kept_fp32: Iterable[str] = ()) -> dict[str, Any]:
        """The range report; ``kept_fp32``: nodes the export runs in float32."""
        kept = set(kept_fp32)
        layers = []
        for (name, op, _), mx, nz, sub in zip(self.nodes, self.max_abs, self.nonzero, self.subnormal):
            share = float(sub / nz) if nz else 0.0
            safe = bool(mx < SAFE_MAX and share <= MAX_SUBNORMAL_SHARE)
            layers.append({"node": name, "op": op, "max_abs": float(mx),
                           "headroom": float(FP16_MAX / mx) if mx > 0 else None,
                           "subnormal_share": share, "safe": safe, "runs_in": "fp32" if name in kept else "fp16"})
        unsafe = [r["node"] for r in layers if not r["safe"]]
        return {"slices": int(self.slices), "rule": SAFETY_RULE, "fp16_max": FP16_MAX, "fp16_min_normal": FP16_MIN_NORMAL,
                "layers": layers, "unsafe": unsafe,
                "unsafe_in_fp16": [n for n in unsafe if n not in kept],
                "smallest_headroom": min((r["headroom"] for r in layers if r["headroom"]), default=None),
                "largest_subnormal_share": max((r["subnormal_share"] for r in layers), default=0.0)}


def format_ranges(report: dict[str, Any], top: int = 6) -> str:
    """A short table: the nodes closest to overflow and to the subnormal range, and the verdict."""
    layers = report["layers"]
    by_max = sorted(layers, key=lambda r: -r["max_abs"])[:top]
    by_sub = sorted(layers, key=lambda r: -r["subnormal_share"])[:top]
    head = f"{'node':<36}{'op':<15}{'max|a|':>10}{'headroom':>10}{'<2^-14':>10}  runs in"
    lines = [f"FP16 range report over {report['slices']} slices ({len(layers)} nodes)", head, "-" * len(head)]
    for r in list({id(r): r for r in by_max + by_sub}.values()):
        lines.append(f"{r['node'][:35]:<36}{r['op']:<15}{r['max_abs']:>10.4g}{(r['headroom'] or float('inf')):>9.0f}x"
                     f"{r['subnormal_share']:>10.2e}  {r['runs_in']}{'' if r['safe'] else '  (unsafe)'}")
    unsafe = report["unsafe"]
    lines.append(f"rule: {report['rule']}")
    lines.append(f"unsafe nodes: {', '.join(unsafe) if unsafe else 'none'}"
                 + (f"; running in fp16 although unsafe: {', '.join(report['unsafe_in_fp16'])}" if report["unsafe_in_fp16"] else ""))
    return "\n".join(lines)


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


def storage_emulation(fp16_model):
    """A float32 graph that rounds every float16 tensor of ``fp16_model`` to float16 (see module doc)."""
    import onnx
    from onnx import helper, numpy_helper

    types = _elem_types(fp16_model)
    model = onnx.ModelProto()
    model.CopyFrom(fp16_model)
    g = model.graph
    for init in g.initializer:
        if init.data_type == _FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for n in g.node:
        halves = [o for o in n.output if types.get(o) == _FLOAT16]
        if n.op_type == "Cast" and halves:  # Cast to float16 -> round (it stays a float32 tensor)
            nodes.append(helper.make_node("Cast", [n.input[0]], [n.output[0] + "__h"], to=_FLOAT16, name=n.name))
            nodes.append(helper.make_node("Cast", [n.output[0] + "__h"], [n.output[0]], to=_FLOAT, name=n.name + "__f"))
            continue
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == _FLOAT16:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
            nodes.append(n)
            continue
        for i, o in enumerate(n.output):
            if o in halves:
                n.output[i] = o + "__f32"
        nodes.append(n)
        for o in halves:
            nodes.append(helper.make_node("Cast", [o + "__f32"], [o + "__h"], to=_FLOAT16, name=f"{o}__round"))
            nodes.append(helper.make_node("Cast", [o + "__h"], [o], to=_FLOAT, name=f"{o}__back"))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return model


def emulation_session(fp16_path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session that computes like FP16 storage (``storage_emulation``)."""
    import onnx

    return ort_session(storage_emulation(onnx.load(str(fp16_path))).SerializeToString(), threads=threads, level="basic")


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
