"""ONNX Runtime: CPU, or the CUDA execution provider when installed."""
from __future__ import annotations

import importlib.util

import numpy as np

from segengine.engine.core.errors import BackendUnavailable
from segengine.engine.inference.backends.base import Backend
from segengine.engine.model.spec import check_export


def _onnxruntime():
    """ONNX Runtime with its telemetry off. ORT_DISABLE_TELEMETRY (set when segengine.engine was
    imported: core.runtime.telemetry_off) keeps the native library from writing its device id,
    event database and $TMPDIR/.ses; where ONNX Runtime was loaded before segengine (a user's
    script), the API call still stops the events it would send from here on."""
    import onnxruntime as ort

    off = getattr(ort, "disable_telemetry_events", None)
    if off is not None:
        off()
    return ort


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    export_kind = "onnx"
    precision = "fp32"

    @classmethod
    def availability(cls, spec=None):
        if not importlib.util.find_spec("onnxruntime"):
            return "onnxruntime is not installed"
        return cls.missing_export(spec)

    def providers(self) -> list[str]:
        ort = _onnxruntime()

        available = ort.get_available_providers()
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return [p for p in wanted if p in available]

    def model_source(self, path) -> str | bytes:
        """What the session loads: the export file itself."""
        return str(path)

    def load(self):
        ort = _onnxruntime()

        path = check_export(self.spec, self.export_kind)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            session = ort.InferenceSession(self.model_source(path), sess_options=opts, providers=self.providers())
        except Exception as exc:  # noqa: BLE001
            raise BackendUnavailable(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:160]})") from None
        self.check_input_shape(session.get_inputs()[0].shape[1:], path.name)
        self.session, self.input_name = session, session.get_inputs()[0].name
        self.loaded = True
        return self

    def infer(self, batch: np.ndarray) -> np.ndarray:
        (prob,) = self.session.run(None, {self.input_name: batch})
        return prob[:, 0]

    def close(self):
        self.session = None
        super().close()


class OnnxRuntimeInt8Backend(OnnxRuntimeBackend):
    """Static INT8 (QDQ) model on the ONNX Runtime CPU provider."""

    name = "onnxruntime-int8"
    export_kind = "onnx-int8"
    precision = "int8"

    def providers(self) -> list[str]:
        return ["CPUExecutionProvider"]


class OnnxRuntimeFp16Backend(OnnxRuntimeBackend):
    """The float16 ONNX export: FP16 kernels on CUDA; on the CPU float16 storage emulated.

    ONNX Runtime's CPU provider would run the float16 graph's nodes in float32 (see
    export/fp16.py), hiding FP16's rounding; so without CUDA the session runs
    ``storage_emulation`` of the file, which rounds every float16 tensor to float16. It stands
    in for TensorRT FP16's numerics here; it is slower than fp32, so ``auto`` never picks it.
    """

    name = "onnxruntime-fp16"
    export_kind = "onnx-fp16"
    precision = "fp16"

    def model_source(self, path) -> str | bytes:
        if "CUDAExecutionProvider" in self.providers():
            self.numerics = "float16 kernels (CUDA)"
            return str(path)
        import onnx

        from segengine.engine.inference.onnx_numerics import storage_emulation

        self.numerics = "float16 storage emulated on the CPU (fp32 arithmetic, every tensor rounded to fp16)"
        return storage_emulation(onnx.load(str(path))).SerializeToString()
