"""TensorRT 10.x FP16 engine (``<name>.fp16.plan``) on an NVIDIA GPU, torch CUDA tensors as buffers.

Plans are specific to the TensorRT version and the GPU they were built on; the sidecar
records both and ``load`` refuses a plan from another TensorRT version or GPU model.
Nothing heavy is imported at module import: ``tensorrt`` and CUDA are touched in ``load``.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from segengine.engine.backends.base import Backend, BackendUnavailable
from segengine.engine.model import check_export


def _cuda_gpu_count_ctypes() -> int:
    """Number of CUDA devices via the driver library (no torch needed); 0 when none/no driver."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0
    try:
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    except Exception:  # noqa: BLE001 - any driver oddity means: no usable GPU
        return 0


def cuda_missing_reason() -> str | None:
    """None when a CUDA GPU is usable here, else why not (torch's view when torch is present)."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"torch CUDA {torch.version.cuda}"
            return f"no CUDA GPU is available ({build})"
        return None
    return None if _cuda_gpu_count_ctypes() > 0 else "no CUDA GPU is available (no NVIDIA driver or device)"


def tensorrt_missing_reason() -> str | None:
    """None when TensorRT 10.x and a CUDA GPU are usable here, else a one-line reason."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'segengine[gpu]', TensorRT 10.x)"
    why = cuda_missing_reason()
    if why:
        return why
    return None


class TrtPlanRunner:
    """Run a serialized TensorRT engine on torch CUDA buffers: (N, 3, S, S) float32 -> (N, 1, S, S) float32.

    Batches above the optimization profile's max are split; below its min are zero-padded.
    """

    def __init__(self, plan: bytes, device: int = 0):
        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT {trt.__version__} cannot deserialize the plan "
                                     "(built by another TensorRT version or for another GPU?); rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendUnavailable(f"plan has inputs {inputs} and outputs {outputs}; expected one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        lo, opt, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.opt_batch, self.max_batch = int(lo[0]), int(opt[0]), int(hi[0])
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
        try:
            self.input_dtype = dtypes[self.engine.get_tensor_dtype(self.input_name)]
            self.output_dtype = dtypes[self.engine.get_tensor_dtype(self.output_name)]
        except KeyError as exc:
            raise BackendUnavailable(f"plan uses an I/O type this runner does not handle ({exc})") from None
        self.stream = torch.cuda.Stream(self.device)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        torch = self._torch
        n = len(chunk)
        if n < self.min_batch:
            chunk = np.concatenate([chunk, np.zeros((self.min_batch - n,) + chunk.shape[1:], np.float32)])
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(self.device).to(self.input_dtype).contiguous()
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                raise RuntimeError(f"TensorRT refused input shape {tuple(x.shape)}")
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                              device=self.device)
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            result = out[:n].float().cpu().numpy()  # .cpu() waits for this stream
        return result

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([self._run(batch[s : s + self.max_batch]) for s in range(0, len(batch), self.max_batch)])

    def close(self) -> None:
        self.context = None
        self.engine = None
        self.runtime = None


class TensorRTBackend(Backend):
    name = "tensorrt"
    export_kind = "tensorrt-fp16"
    precision = "fp16"

    @classmethod
    def availability(cls, spec=None):
        why = tensorrt_missing_reason()
        if why:
            return why
        if spec is not None and not spec.export_path(cls.export_kind).exists():
            return f"no {cls.export_kind} export beside {spec.weights.name} (run `segengine export` on a GPU machine)"
        return None

    def load(self):
        why = tensorrt_missing_reason()
        if why:
            raise BackendUnavailable(why)
        import tensorrt as trt
        import torch

        path = check_export(self.spec, self.export_kind)
        side = self.spec.sidecar(self.export_kind) or {}
        built_with = str(side.get("tensorrt_version", ""))
        if built_with and built_with.split(".")[:2] != trt.__version__.split(".")[:2]:
            raise BackendUnavailable(f"{path.name} was built with TensorRT {built_with}, this is {trt.__version__}; "
                                     "rebuild it with `segengine export --kinds tensorrt-fp16`")
        built_for = side.get("device", {}).get("compute_capability")
        here = list(torch.cuda.get_device_capability(0))
        if built_for and list(built_for) != here:
            raise BackendUnavailable(f"{path.name} was built for a GPU of compute capability {built_for}, "
                                     f"this one is {here}; rebuild it on this machine")
        self.runner = TrtPlanRunner(path.read_bytes())
        self.loaded = True
        return self

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.infer(batch)[:, 0]

    def close(self):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()
        self.runner = None
        super().close()
