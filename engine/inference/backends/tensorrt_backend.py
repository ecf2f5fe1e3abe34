"""TensorRT 10.x FP16 engine (``<name>.fp16.plan``) on an NVIDIA GPU, torch CUDA tensors as buffers.

TensorRT 11 is reported unavailable (``tensorrt_version_problem``): it removed the FP16
builder flag this code relies on.

Plans are specific to the TensorRT version and the GPU they were built on; the sidecar
records both and ``load`` refuses a plan from another TensorRT version or GPU model.
Nothing heavy is imported at module import: ``tensorrt`` and CUDA are touched in ``load``.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from segengine.engine.core.errors import BackendUnavailable
from segengine.engine.inference.backends.base import Backend
from segengine.engine.model.spec import check_export


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


def tensorrt_version_problem(version: str) -> str | None:
    """None for TensorRT 10.x (the API this code is written and tested against), else why not."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        return f"TensorRT reports an unreadable version {version!r}"
    if major >= 11:
        return (f"TensorRT {version}: TensorRT 11 removed BuilderFlag.FP16 (FP16 needs a strongly typed network "
                "from an FP16 ONNX, e.g. ModelOpt AutoCast), which segengine does not implement; use tensorrt-cu12>=10,<11")
    if major < 10:
        return f"TensorRT {version} is too old; segengine needs TensorRT 10.x"
    return None


def tensorrt_missing_reason() -> str | None:
    """None when TensorRT 10.x and a CUDA GPU are usable here, else a one-line reason."""
    try:
        import tensorrt as trt
    except ImportError:
        return "tensorrt is not installed (pip install 'segengine[gpu]', TensorRT 10.x)"
    except Exception as exc:  # noqa: BLE001 - e.g. missing CUDA libraries behind the wheel
        return f"tensorrt cannot be imported ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
    return tensorrt_version_problem(getattr(trt, "__version__", "?")) or cuda_missing_reason()


def gpu_identity(device: int = 0) -> dict:
    """Name and compute capability of the CUDA device a plan is built for / run on."""
    import torch

    return {"name": torch.cuda.get_device_name(device), "compute_capability": list(torch.cuda.get_device_capability(device))}


class CudaBuffers:
    """Device memory and a stream for TrtPlanRunner, as torch CUDA tensors."""

    def __init__(self, device: int = 0):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device)
        self.stream = torch.cuda.Stream(self.device)
        self.dtypes = {"float32": torch.float32, "float16": torch.float16}

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def scope(self):
        return self.torch.cuda.stream(self.stream)

    def upload(self, array: np.ndarray, dtype: str):
        """(device tensor, its address) holding ``array`` as ``dtype``."""
        x = self.torch.from_numpy(array).to(self.device).to(self.dtypes[dtype]).contiguous()
        return x, x.data_ptr()

    def empty(self, shape, dtype: str):
        out = self.torch.empty(tuple(shape), dtype=self.dtypes[dtype], device=self.device)
        return out, out.data_ptr()

    def download(self, tensor, n: int) -> np.ndarray:
        return tensor[:n].float().cpu().numpy()  # .cpu() waits for this stream


class TrtPlanRunner:
    """Run a serialized TensorRT engine: (N, C, S, S) float32 -> (N, 1, S, S) float32.

    Batches above the optimization profile's max are split; below its min are zero-padded.
    ``buffers`` holds device memory (default: torch CUDA tensors, ``CudaBuffers``).
    """

    def __init__(self, plan: bytes, device: int = 0, buffers=None):
        import tensorrt as trt

        self._trt = trt
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
        self.item_shape = tuple(int(d) for d in hi[1:])  # (C, S, S): fixed in the profile, only the batch varies
        dtypes = {trt.float32: "float32", trt.float16: "float16"}
        try:
            self.input_dtype = dtypes[self.engine.get_tensor_dtype(self.input_name)]
            self.output_dtype = dtypes[self.engine.get_tensor_dtype(self.output_name)]
        except KeyError as exc:
            raise BackendUnavailable(f"plan uses an I/O type this runner does not handle ({exc})") from None
        self.buffers = buffers if buffers is not None else CudaBuffers(device)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        if n < self.min_batch:
            chunk = np.concatenate([chunk, np.zeros((self.min_batch - n,) + chunk.shape[1:], np.float32)])
        with self.buffers.scope():
            x, x_ptr = self.buffers.upload(np.ascontiguousarray(chunk, dtype=np.float32), self.input_dtype)
            if not self.context.set_input_shape(self.input_name, tuple(chunk.shape)):
                raise RuntimeError(f"TensorRT refused input shape {tuple(chunk.shape)}")
            out, out_ptr = self.buffers.empty(tuple(self.context.get_tensor_shape(self.output_name)), self.output_dtype)
            self.context.set_tensor_address(self.input_name, x_ptr)
            self.context.set_tensor_address(self.output_name, out_ptr)
            if not self.context.execute_async_v3(self.buffers.stream_handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            return self.buffers.download(out, n)

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
        return cls.missing_export(spec, "run `segengine export` on a GPU machine")

    def load(self):
        why = tensorrt_missing_reason()
        if why:
            raise BackendUnavailable(why)
        import tensorrt as trt

        path = check_export(self.spec, self.export_kind)
        side = self.spec.sidecar(self.export_kind) or {}
        built_with = str(side.get("tensorrt_version", ""))
        if built_with and built_with.split(".")[:2] != trt.__version__.split(".")[:2]:
            raise BackendUnavailable(f"{path.name} was built with TensorRT {built_with}, this is {trt.__version__}; "
                                     "rebuild it with `segengine export --kinds tensorrt`")
        built_for = side.get("device", {}).get("compute_capability")
        here = gpu_identity(0)["compute_capability"]
        if built_for and list(built_for) != here:
            raise BackendUnavailable(f"{path.name} was built for a GPU of compute capability {built_for}, "
                                     f"this one is {here}; rebuild it on this machine")
        self.runner = TrtPlanRunner(path.read_bytes())
        try:
            self.check_input_shape(self.runner.item_shape, path.name)
        except BackendUnavailable:
            self.close()
            raise
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
