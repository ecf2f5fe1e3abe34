"""The process's runtime environment: thread pools bounded before numpy loads, SIGINT/SIGTERM
held over steps that must not be split, peak memory. A leaf: imports nothing from the project."""
from __future__ import annotations

import os
import resource
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, for steps that must not be split (a temp folder
    created and recorded, a lock taken and recorded, the two renames of a replace).

    Python-level: the handlers are swapped for a recorder and the signals replayed on exit
    (a signal mask would not do: any of the runtimes' threads may receive a process signal).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            handler = previous[s]
            if callable(handler):
                handler(s, None)  # e.g. raises KeyboardInterrupt / the CLI's Terminated
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# numpy's BLAS runs the engine's small resize products on one thread whatever --threads says:
# more threads only contend with ONNX Runtime's and PyTorch's own pools and spin-wait against
# them (preprocess and map-back 3-10x slower in `run --patients` under load). An explicit
# setting in the environment is kept.
BLAS_ENV_VARS = ("OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


# Third-party telemetry that writes outside OUT. ONNX Runtime's official builds (1DS) create
# ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db} and write $TMPDIR/.ses,
# following a symbolic link planted there, as soon as the native library initializes (a bare
# ``import onnxruntime`` does it); ORT_DISABLE_TELEMETRY=1, read once at that moment, turns all of it
# off. Forced, not defaulted: a segengine run writes into OUT and its private cache, nowhere else.
# (OpenVINO's usage telemetry is kept out where OpenVINO is imported: openvino_backend._openvino.)
TELEMETRY_OFF_ENV = {"ORT_DISABLE_TELEMETRY": "1"}


def telemetry_off() -> None:
    """Turn third-party telemetry off before any of those libraries loads: called when
    ``segengine.engine`` is imported (every entry point: the CLI, training, export, bench, Ray
    workers), which precedes every import of ONNX Runtime in the project."""
    os.environ.update(TELEMETRY_OFF_ENV)


def threads_from_argv(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None


def bound_thread_pools(threads: str | None) -> None:
    """--threads bounds the OpenMP/MKL pools too: they read these once, when first loaded."""
    if threads and threads.isdigit() and int(threads) > 0:
        for var in THREAD_ENV_VARS:
            os.environ[var] = threads
