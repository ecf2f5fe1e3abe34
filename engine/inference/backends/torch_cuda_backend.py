"""PyTorch on a CUDA GPU in half precision: wherever torch has CUDA, no export or extra runtime.

Three runners of the shipped ``.pt`` weights, each its own backend with its own verdict:

- ``torch-cuda``: float16 weights and activations, channels_last memory layout, eager;
- ``torch-cuda-bf16``: the same in bfloat16 (GPUs of compute capability 8.0 and newer);
- ``torch-cuda-graphs``: ``torch-cuda`` replayed from CUDA graphs, one per batch shape. A batch
  is zero-padded up to the next multiple of ``GRAPH_STEP`` slices, so the balanced batches
  ``run`` makes (inference/predict.py: 35 slices at --batch-size 32 are 18 + 17) share a few
  graphs; more than ``MAX_GRAPHS`` shapes run eagerly.

Every runner returns float32 probabilities (the sigmoid is taken in float32). Their numerics
depend on the GPU model, so a verdict is recorded with the GPU's identity (inference/gpu.py)
and trusted only on the same GPU model (``device_verdict``: inference/verdict.py keeps such
verdicts in ``<model>.gpu-verdicts.json`` beside the weights). ``infer_tensor`` takes a batch
already on the device (preprocessing/device.py builds the 2.5D stacks there).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from segengine.engine.inference import gpu
from segengine.engine.inference.backends.base import Backend
from segengine.engine.model.spec import load_torch_model

GRAPH_STEP = 8  # batches are padded to a multiple of this many slices before a graph replays them


MAX_GRAPHS = 32  # graphs captured per runner at most (each holds its activations' memory)


WARMUP_ITERATIONS = 3  # eager runs on a side stream before capturing (cuDNN picks its kernels)


def graph_batch(n: int, step: int = GRAPH_STEP) -> int:
    """The captured batch size that runs ``n`` slices: ``n`` rounded up to a multiple of ``step``."""
    if n < 1:
        raise ValueError(f"a batch has at least one slice, got {n}")
    return -(-n // step) * step


class GraphCache:
    """Captured graphs by padded batch size: ``run(x)`` pads ``x`` to ``graph_batch(len(x))``,
    captures a graph for that size the first time (``capture(size) -> (static_in, static_out, replay)``),
    copies ``x`` in, replays and returns the first ``len(x)`` outputs. Past ``max_graphs`` sizes it
    returns None and the caller runs eagerly."""

    def __init__(self, capture: Callable[[int], tuple[Any, Any, Callable[[], None]]], step: int = GRAPH_STEP,
                 max_graphs: int = MAX_GRAPHS):
        self.capture, self.step, self.max_graphs = capture, step, max_graphs
        self.graphs: dict[int, tuple[Any, Any, Callable[[], None]]] = {}
        self.replays: dict[int, int] = {}

    def sizes(self) -> list[int]:
        return sorted(self.graphs)

    def run(self, x):
        size = graph_batch(len(x), self.step)
        if size not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return None
            self.graphs[size] = self.capture(size)
        static_in, static_out, replay = self.graphs[size]
        n = len(x)
        static_in[:n].copy_(x)
        if n < size:
            static_in[n:].zero_()
        replay()
        self.replays[size] = self.replays.get(size, 0) + 1
        return static_out[:n]


class TorchCudaBackend(Backend):
    name = "torch-cuda"
    precision = "fp16"
    dtype_name = "float16"
    graphs = False
    device_verdict = True  # its verdict holds for one GPU model (inference/verdict.py)
    on_gpu = True

    @classmethod
    def availability(cls, spec=None) -> str | None:
        why = gpu.why_no_cuda()
        if why:
            return why
        if cls.dtype_name == "bfloat16" and not gpu.bf16_supported():
            return "this GPU has no bfloat16 kernels (compute capability 8.0 or newer needed)"
        return None

    @classmethod
    def device_identity(cls) -> dict:
        return gpu.identity()

    def load(self) -> "TorchCudaBackend":
        import torch

        self._torch = torch
        self.device = torch.device("cuda")
        self.dtype = getattr(torch, self.dtype_name)
        torch.backends.cudnn.benchmark = False  # one kernel choice per shape, the same on every run
        model = load_torch_model(self.spec).to(self.device, dtype=self.dtype)
        self.model = model.to(memory_format=torch.channels_last).eval()
        self.cache = GraphCache(self._capture) if self.graphs else None
        self.device_info = gpu.identity()
        self.runtime = {**self.device_info, "dtype": self.dtype_name, "channels_last": True, "cuda_graphs": self.graphs,
                        "graph_step": GRAPH_STEP if self.graphs else None}
        self.numerics = f"{self.dtype_name} weights and activations, channels_last, sigmoid in float32" + (
            f", CUDA graphs (batches padded to multiples of {GRAPH_STEP})" if self.graphs else "")
        self.loaded = True
        return self

    def _eager(self, x):
        return self.model(x)

    def _capture(self, size: int):
        torch = self._torch
        c, s, _ = self.spec.input_shape
        static_in = torch.zeros((size, c, s, s), device=self.device, dtype=self.dtype).contiguous(
            memory_format=torch.channels_last)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP_ITERATIONS):
                self.model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_out = self.model(static_in)
        return static_in, static_out, graph.replay

    def infer_tensor(self, x):
        """(N, C, S, S) float batch on the device -> (N, S, S) float32 probabilities on the device."""
        torch = self._torch
        with torch.inference_mode():
            x = x.to(self.device, dtype=self.dtype).contiguous(memory_format=torch.channels_last)
            logits = self.cache.run(x) if self.cache is not None else None
            if logits is None:
                logits = self._eager(x)
            return torch.sigmoid(logits[:, 0].float())

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(batch)
        if x.numel():
            x = x.pin_memory().to(self.device, non_blocking=True)
        return self.infer_tensor(x).cpu().numpy()

    def close(self) -> None:
        self.model = None
        self.cache = None
        super().close()


class TorchCudaBf16Backend(TorchCudaBackend):
    name = "torch-cuda-bf16"
    precision = "bf16"
    dtype_name = "bfloat16"


class TorchCudaGraphsBackend(TorchCudaBackend):
    name = "torch-cuda-graphs"
    graphs = True
