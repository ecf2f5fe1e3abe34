"""The GPU as ``auto`` and the verdicts see it: is CUDA usable here, and which GPU is this.

``why_no_cuda`` is asked at every ``--backend auto``, so on a machine without an NVIDIA driver it
answers from the file system, without importing torch (a second on a small CPU). Where a driver
is present it asks torch (a CPU build of torch, or no visible device, is a reason too).

``identity`` is what a GPU verdict is recorded with: the GPU model, its compute capability, the
driver, CUDA and torch versions. A verdict is trusted only on the GPU model it was measured on
(``same_gpu``): fp16 and bf16 kernels, and so the masks, differ between GPU generations.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess

NVIDIA_PROC = "/proc/driver/nvidia/version"


NVIDIA_DEVICES = ("/dev/nvidiactl", "/dev/nvidia0")


def driver_present() -> bool:
    """An NVIDIA kernel driver is loaded (no CUDA library is touched to know it)."""
    return os.path.exists(NVIDIA_PROC) or any(os.path.exists(d) for d in NVIDIA_DEVICES)


@functools.lru_cache(maxsize=1)
def why_no_cuda() -> str | None:
    """None when torch can run on a CUDA device here, else the reason (one line)."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if not driver_present():
        return f"no NVIDIA driver here (no {NVIDIA_PROC})"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA)"
    try:
        usable = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception as exc:  # noqa: BLE001 - a broken driver/runtime pairing raises here
        return f"CUDA is not usable: {(str(exc).splitlines() or [type(exc).__name__])[0][:160]}"
    return None if usable else "torch sees no usable CUDA device"


def driver_version() -> str | None:
    """The NVIDIA driver's version, from the kernel module or nvidia-smi; None when unknown."""
    try:
        with open(NVIDIA_PROC, encoding="utf-8", errors="replace") as fh:
            m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", fh.read())
        if m:
            return m.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            first = (out.stdout.strip().splitlines() or [""])[0].strip()
            return first or None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


@functools.lru_cache(maxsize=4)
def identity(device: int = 0) -> dict:
    """This GPU as a verdict records it (needs CUDA: call after ``why_no_cuda()`` is None)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "driver": driver_version(),
            "cuda": torch.version.cuda, "torch": torch.__version__}


def bf16_supported() -> bool:
    """bfloat16 kernels need compute capability 8.0 (Ampere) or newer."""
    import torch

    return torch.cuda.get_device_capability(0) >= (8, 0)


def same_gpu(recorded: dict | None, here: dict) -> bool:
    """A verdict measured on ``recorded`` holds on ``here``: the same GPU model (name and capability)."""
    if not isinstance(recorded, dict):
        return False
    return recorded.get("gpu") == here.get("gpu") and recorded.get("capability", here.get("capability")) == here.get("capability")


def machine_key(here: dict) -> str:
    """``auto``'s speed-cache key for this GPU (inference/speed.py keys CPUs by model and ISA)."""
    return f"GPU {here.get('gpu')} [sm {here.get('capability')}, CUDA {here.get('cuda')}, torch {here.get('torch')}]"
