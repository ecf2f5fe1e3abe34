"""OpenVINO on the CPU: the exported ONNX files compiled by OpenVINO's CPU plugin.

``openvino`` compiles ``<name>.onnx`` (the fp32 graph) and ``openvino-int8`` compiles
``<name>.int8.onnx`` (the QDQ graph ONNX Runtime's INT8 backend runs): the very files that
``segengine export`` wrote and verified, with their sidecars and SHA-256s, so no second copy of
the weights is shipped (the 60 MB budget of models/) and a stale or corrupt file is refused by
the same ``check_export``. Their verdicts live in the same sidecars under their own key
(``validation_openvino``): one file, one verdict per runtime that runs it.

Numerics: on a CPU that computes bfloat16 natively (AMX, AVX-512 BF16) OpenVINO runs the float
parts of a graph in bf16 by default (``INFERENCE_PRECISION_HINT``); elsewhere in f32. The
backend pins that choice explicitly (``inference_precision``), reports it in ``numerics`` and
``runtime`` (recorded with the verdict), and a verdict measured in f32 is not trusted on a CPU
that would run bf16 (``verdict_mismatch``).
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from segengine.engine.core.errors import BackendUnavailable, ModelError
from segengine.engine.inference.backends.base import Backend
from segengine.engine.model.spec import check_export

VERDICT_KEY = "validation_openvino"


PRECISIONS = ("f32", "bf16", "f16")  # the INFERENCE_PRECISION_HINT values of OpenVINO's CPU plugin


def _openvino():
    """OpenVINO's runtime without its model-conversion tools. ``import openvino`` also imports
    ``openvino.tools.ovc`` (convert_model), which starts a usage-telemetry thread reporting to Google
    Analytics and writes ~/intel/ (openvino_telemetry: on unless the user opted out or CI=true). The
    engine compiles ONNX through the runtime and converts nothing, so a patient's run does not phone
    home, and the import is shorter (0.2 instead of 0.3-0.8 s here). Only the first import is
    affected: ovc stays importable afterwards for code that wants it (nncf, a user's script)."""
    import sys

    if "openvino" not in sys.modules and "openvino.tools.ovc" not in sys.modules:
        sys.modules["openvino.tools.ovc"] = None  # openvino/__init__ skips it on ImportError
        try:
            import openvino  # noqa: F401
        finally:
            if sys.modules.get("openvino.tools.ovc", 0) is None:
                del sys.modules["openvino.tools.ovc"]
    import openvino as ov

    return ov


@lru_cache(maxsize=1)
def _core():
    return _openvino().Core()


def cpu_capabilities() -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of this CPU (e.g. FP32, BF16, INT8)."""
    return [str(c) for c in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def inference_precision() -> str:
    """What OpenVINO runs a graph's float parts in on this CPU by default (the CPU plugin's
    INFERENCE_PRECISION_HINT: bf16 where the CPU has native bfloat16, else f32); pinned at compile
    time so a verdict says what it measured. Asked of OpenVINO once per CPU and OpenVINO version
    (speed.cpu_fact): checking a verdict then costs no import of OpenVINO."""
    from importlib.metadata import version

    from segengine.engine.inference.speed import cpu_fact

    return cpu_fact("openvino default INFERENCE_PRECISION_HINT", version("openvino"),
                    lambda: _core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
                    allowed=PRECISIONS)


def compiled_cache_dir() -> Path | None:
    """Where OpenVINO keeps the models it compiled for this CPU (beside auto's figures, outside the
    repository): a later load imports the blob instead of compiling (0.46 -> 0.08 s for the fp32
    graph, 1.3 -> 0.35 s for the INT8 one, measured here). OpenVINO keys each blob by the model
    file's content, the device and the compile settings, and the file itself is checked against its
    sidecar before (check_export). None when the folder cannot be made: compiled every time then.

    OpenVINO imports whatever blob sits under the name it expects, past the SHA-256 check the ONNX
    file passed: so the folder is used only if no one else can put a blob there (a real folder, not
    a link, of this user, not writable by others, in a parent of this user or root that others
    cannot swap it in: fsguard's rule for OUT). A shared or planted cache folder means compiling
    every time, same result. So does an entry that is not a regular file of one link (``_plain_entries``):
    OpenVINO opens a blob by name with a blocking open, and a FIFO under that name would hang the run."""
    import stat

    from segengine.engine.inference.speed import cache_path

    folder = cache_path().parent / "openvino"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        st, parent = os.lstat(folder), os.stat(folder.parent)
    except OSError:
        return None
    # (a parent writable by the user's group is fine, as under umask 002: a folder swapped in by
    # someone else is theirs, and refused by the owner check at the next run)
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            or parent.st_uid not in (os.geteuid(), 0)
            or (parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX)):
        return None
    return folder if os.access(folder, os.W_OK) and _plain_entries(folder) else None


def _plain_entries(folder: Path) -> bool:
    """Every entry of the cache folder is a regular file with one link (by lstat: nothing opened, no link
    followed); a FIFO, socket, device, link or folder there, or an unreadable folder, is False."""
    import stat

    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    return False
    except OSError:
        return False
    return True


class OpenVinoBackend(Backend):
    name = "openvino"
    export_kind = "onnx"
    verdict_key = VERDICT_KEY
    precision = "bf16"  # the float graph in bf16 where the CPU has it; held to fp32's tolerances (verdict.tolerances_for)

    @classmethod
    def availability(cls, spec=None):
        if not importlib.util.find_spec("openvino"):
            return "openvino is not installed (pip install openvino)"
        if spec is not None:
            try:
                check_export(spec, cls.export_kind)  # missing, stale, or a SHA-256 mismatch: say which
            except ModelError as exc:
                return str(exc)
        return None

    @classmethod
    def verdict_mismatch(cls, verdict: dict[str, Any]) -> str | None:
        """Why a recorded verdict does not hold on this CPU: it was measured in f32 and OpenVINO
        here would run bf16 (a bf16 verdict holds where f32 runs: f32 is the closer to torch)."""
        recorded = (verdict.get("runtime") or {}).get("inference_precision")
        if recorded is None:
            return "its verdict does not say which precision OpenVINO ran in; validate it again"
        try:
            here = inference_precision()
        except Exception as exc:  # noqa: BLE001 - OpenVINO cannot even query the CPU
            return f"OpenVINO cannot query this CPU ({str(exc).splitlines()[0][:120]})"
        if recorded == "f32" and here != "f32":
            return f"its verdict was measured in f32 but OpenVINO runs {here} on this CPU; validate it again"
        return None

    def load(self):
        ov = _openvino()
        path = check_export(self.spec, self.export_kind)
        self.inference_precision = inference_precision()
        config = {"INFERENCE_PRECISION_HINT": self.inference_precision, "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": 1}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        blobs = compiled_cache_dir()
        if blobs is not None:
            config["CACHE_DIR"] = str(blobs)
        try:
            compiled = _core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses with long texts
            raise BackendUnavailable(f"{path}: OpenVINO cannot compile it ({str(exc).splitlines()[0][:160]})") from None
        shape = compiled.input(0).get_partial_shape()
        self.check_input_shape([d.get_length() if d.is_static else None for d in shape][1:], path.name)
        self.compiled, self.request = compiled, compiled.create_infer_request()
        picked = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what the compiled model runs
        self.precision = "int8" if self.export_kind == "onnx-int8" else {"bf16": "bf16", "f16": "fp16"}.get(picked, "fp32")
        self.runtime = {"runtime": "openvino", "version": ov.get_version().split("-")[0],
                        "inference_precision": picked, "default_inference_precision": self.inference_precision,
                        "cpu": str(_core().get_property("CPU", "FULL_DEVICE_NAME")), "capabilities": cpu_capabilities()}
        self.numerics = (f"OpenVINO {self.runtime['version']} CPU plugin, INFERENCE_PRECISION_HINT "
                         f"{picked} (its default on this CPU: {self.inference_precision})"
                         + ("; int8 convolutions from the QDQ graph" if self.export_kind == "onnx-int8" else ""))
        self.loaded = True
        return self

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out = self.request.infer({0: batch}, share_inputs=True)
        return np.array(out[0][:, 0], dtype=np.float32, copy=True)

    def close(self):
        self.request = self.compiled = None
        super().close()


class OpenVinoInt8Backend(OpenVinoBackend):
    """The static INT8 QDQ graph (export/int8.py) compiled by OpenVINO: INT8 convolutions (VNNI/AMX);
    the float head (last Conv, Resize, Sigmoid) in the float precision above."""

    name = "openvino-int8"
    export_kind = "onnx-int8"
    precision = "int8"
