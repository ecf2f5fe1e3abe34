"""ONNX Runtime sessions and the FP16 numerics, shared by the backends, `validate` and the exporters.

The engine needs them at run time (the onnxruntime-fp16 backend computes like FP16 storage;
`validate` prints an FP16 range report), so they live here and ``export/`` imports them, never
the other way round."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

INPUT_NAME = "images"


OUTPUT_NAME = "probabilities"


def ort_session(path: Path | str | bytes, threads: int | None = None, level: str = "all"):
    """An ONNX Runtime CPU session (``threads`` intra-op threads; None = ORT default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    source = str(path) if isinstance(path, (str, os.PathLike)) else path
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def ort_run(session, images: np.ndarray) -> np.ndarray:
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
    return out


FP16_MAX = 65504.0


FP16_MIN_NORMAL = 2.0 ** -14  # 6.1035e-05


SAFE_MAX = FP16_MAX / 16


MAX_SUBNORMAL_SHARE = 1e-3


SAFETY_RULE = (f"a node stays float32 unless its largest |activation| < 65504/16 = {SAFE_MAX:g} "
               f"and at most {MAX_SUBNORMAL_SHARE:g} of its non-zero values are below 2**-14")


_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16


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
