"""Backend registry: name -> runner class, imported only when picked (fast ``--help``)."""
from __future__ import annotations

import importlib

from segengine.engine.core.errors import BackendUnavailable
from segengine.engine.inference.backends.base import Backend

REGISTRY: dict[str, str] = {
    "torch": "segengine.engine.inference.backends.torch_backend:TorchBackend",
    "onnxruntime": "segengine.engine.inference.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "onnxruntime-int8": "segengine.engine.inference.backends.onnxruntime_backend:OnnxRuntimeInt8Backend",
    "onnxruntime-fp16": "segengine.engine.inference.backends.onnxruntime_backend:OnnxRuntimeFp16Backend",  # numerics; never auto
    "openvino": "segengine.engine.inference.backends.openvino_backend:OpenVinoBackend",
    "openvino-int8": "segengine.engine.inference.backends.openvino_backend:OpenVinoInt8Backend",
    "tensorrt": "segengine.engine.inference.backends.tensorrt_backend:TensorRTBackend",
    "triton": "segengine.engine.inference.backends.triton_backend:TritonBackend",  # remote; never picked by auto
    "torch-cuda": "segengine.engine.inference.backends.torch_cuda_backend:TorchCudaBackend",
    "torch-cuda-bf16": "segengine.engine.inference.backends.torch_cuda_backend:TorchCudaBf16Backend",
    "torch-cuda-graphs": "segengine.engine.inference.backends.torch_cuda_backend:TorchCudaGraphsBackend",
}


NAMES = ["auto", *REGISTRY]


# What auto chooses among, by ms/slice measured on this CPU (inference/speed.py), once trusted and
# available; torch, the reference of every verdict, when none of them is.
AUTO_CANDIDATES = ["tensorrt", "openvino-int8", "openvino", "onnxruntime-int8", "onnxruntime"]


# What auto chooses among where a CUDA GPU is usable (inference/gpu.py), by ms/slice measured on this
# GPU, once available and trusted for this GPU model; torch (on the GPU, fp32) when none of them is.
GPU_CANDIDATES = ["tensorrt", "torch-cuda-graphs", "torch-cuda", "torch-cuda-bf16"]


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r} (known: {', '.join(NAMES)})")
    module, cls = REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} cannot be imported ({exc})") from None
