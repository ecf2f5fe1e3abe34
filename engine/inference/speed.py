"""What ``--backend auto`` picks: the fastest trusted backend for this CPU, from measured ms/slice.

Which runtime is fastest depends on the CPU (OpenVINO's bf16 and INT8 kernels on AMX or AVX-512
BF16/VNNI, ONNX Runtime's MLAS elsewhere), so ``auto`` does not follow a fixed order: it picks
the backend with the lowest ms/slice measured on this CPU model for this model file, among the
backends that are available and hold a trusted verdict (verdict.why_untrusted).

Measurements are a small JSON cache keyed by CPU (model name + vector ISA), model SHA-256 and
thread count, written by ``segengine bench`` or, at the first ``auto`` on this machine, by a
short probe (a warm-up and three interleaved timed batches of synthetic slices per candidate,
a few seconds once). The cache lives outside the repository, in ``$SEGENGINE_CACHE_DIR`` or
``$XDG_CACHE_HOME/segengine`` (default ``~/.cache/segengine``): a timing is a fact about a
machine, not about the shipped model, and models/ may be read-only or shared between machines.
An unwritable cache only means the probe is repeated. torch is the reference every verdict was
taken against: it is measured for nothing and chosen only when no exported backend is trusted.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

CACHE_ENV = "SEGENGINE_CACHE_DIR"


CACHE_FILE = "backend_speed.json"


SCHEMA = "segengine-backend-speed/1"


CACHE_MAX_BYTES = 1 << 20  # an entry is ~300 bytes: thousands of CPU x model x thread entries


PROBE_BATCH = 8


PROBE_ROUNDS = 3


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_key(cpuinfo: str | None = None) -> str:
    """This CPU as a key: its model name and the vector ISA that decides which kernels run.
    (The name alone is not enough: a VM may report a generic "AMD EPYC".)"""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("model name", "Model name") and model is None:
            model = val.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(val.split())
    if model is None:
        import platform

        model = platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} [{' '.join(f for f in ISA_FLAGS if f in flags) or 'no AVX2'}]"


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "segengine")
    return Path(root) / CACHE_FILE


def entry_key(cpu: str, model_sha256: str, threads: int | None) -> str:
    return f"{cpu} | {model_sha256} | threads={threads or 'all'}"


def _read_file(path: Path) -> dict[str, Any]:
    """The cache file as {"entries": ..., "facts": ...}; an absent, unreadable or foreign file reads
    as empty. Read as every file the engine reads (core.fsguard.read_regular): a FIFO or device planted
    as the cache (a shared HOME, $SEGENGINE_CACHE_DIR) would block every `--backend auto`."""
    from segengine.engine.core.errors import DataError
    from segengine.engine.core.fsguard import read_regular

    try:
        data = json.loads(read_regular(path, "speed cache", CACHE_MAX_BYTES).decode("utf-8"))
    except (DataError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        data = {}
    return {k: data[k] if isinstance(data.get(k), dict) else {} for k in ("entries", "facts")}


def _write_file(path: Path, data: dict[str, Any]) -> Path | None:
    """The one atomic write; None when the cache cannot be written (the figures are measured again)."""
    from segengine.engine.core.atomic import write_json_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"schema": SCHEMA, **data})
    except OSError:
        return None
    return path


def read_cache(path: Path | None = None) -> dict[str, Any]:
    """The cache's ms/slice entries (empty when there is no usable cache)."""
    return _read_file(path or cache_path())["entries"]


def recorded_ms(cpu: str, model_sha256: str, threads: int | None, path: Path | None = None) -> dict[str, float]:
    """backend -> ms/slice recorded for this CPU, model and thread count (only sane numbers)."""
    return _sane_ms(read_cache(path).get(entry_key(cpu, model_sha256, threads)))


def _sane_ms(entry: Any) -> dict[str, float]:
    """An entry's ms/slice figures that are figures (the file may have been edited or planted)."""
    ms = entry.get("ms_per_slice") if isinstance(entry, dict) else None
    if not isinstance(ms, dict):
        return {}
    return {k: float(v) for k, v in ms.items() if isinstance(k, str) and type(v) in (int, float) and 0 < v < 1e6}


def record_ms(cpu: str, model_sha256: str, threads: int | None, ms: dict[str, float], how: str,
              path: Path | None = None) -> Path | None:
    """Merge ``ms`` (backend -> ms/slice) into the cache (the one atomic write); None if it cannot be written."""
    from segengine.engine.core.atomic import now_iso

    path = path or cache_path()
    data = _read_file(path)
    entries = data["entries"]
    key = entry_key(cpu, model_sha256, threads)
    old = entries.get(key) if isinstance(entries.get(key), dict) else {}
    merged = {**_sane_ms(old), **{k: round(float(v), 4) for k, v in ms.items()}}
    old_how = old.get("how") if isinstance(old.get("how"), dict) else {}
    entries[key] = {"cpu": cpu, "model_sha256": model_sha256, "threads": threads, "ms_per_slice": merged,
                    "how": {**{k: v for k, v in old_how.items() if k in merged}, **{k: how for k in ms}},
                    "measured": now_iso()}
    return _write_file(path, data)


def cpu_fact(name: str, version: str, learn: Callable[[], str], path: Path | None = None,
             allowed: Iterable[str] | None = None) -> str:
    """A fact about this CPU that is slow to learn, learned once per CPU and library ``version`` and
    then read from the cache: OpenVINO's default inference precision needs OpenVINO imported (~1 s
    at every `run --backend auto` otherwise, even when ONNX Runtime is the one picked). A cached
    value outside ``allowed`` (an edited or planted file) is learned again."""
    path = path or cache_path()
    key = f"{cpu_key()} | {name} | {version}"
    data = _read_file(path)
    value = data["facts"].get(key)
    if not isinstance(value, str) or (allowed is not None and value not in allowed):
        value = learn()
        data["facts"][key] = value
        _write_file(path, data)
    return value


def choose(candidates: Iterable[str], ms: dict[str, float]) -> str | None:
    """The candidate with the lowest measured ms/slice (first listed on a tie); None without any measurement."""
    timed = [c for c in candidates if c in ms]
    return min(timed, key=lambda c: ms[c]) if timed else None


def probe(spec, names: list[str], threads: int | None, create: Callable, batch: int = PROBE_BATCH,
          rounds: int = PROBE_ROUNDS) -> dict[str, float]:
    """ms/slice of each backend (``create(name)``: its class) on ``batch`` synthetic slices of
    ``spec``'s input: the minimum of ``rounds`` timed runs after one warm-up, the backends
    interleaved round by round so a load change on the machine hits them alike. A backend that
    fails to load or run is left out."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch, *spec.input_shape), dtype=np.float32)
    loaded = {}
    for name in names:
        try:
            runner = create(name)(spec, threads=threads).load()
            runner.infer(x)  # warm-up: first-run allocations and kernel selection
            loaded[name] = runner
        except Exception:  # noqa: BLE001 - a backend that cannot run is simply not a candidate
            continue
    best = {name: float("inf") for name in loaded}
    try:
        for _ in range(rounds):
            for name, runner in loaded.items():
                t0 = time.perf_counter()
                runner.infer(x)
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3 / batch)
    finally:
        for runner in loaded.values():
            runner.close()
    return best


def fastest(model, candidates: list[str], threads: int | None = None, log: Callable[[str], Any] | None = None,
            measure: Callable | None = None, create: Callable | None = None, machine: str | None = None) -> str | None:
    """The fastest of ``candidates`` (available and trusted) for ``model`` (a ModelSpec; for a plan
    its first member: the members share one architecture) on this CPU (``machine``: another key, a
    GPU's from inference/gpu.machine_key): from the recorded figures, probing (``measure``, default
    ``probe`` with ``create``) and recording the ones not measured yet."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    cpu = machine or cpu_key()
    ms = recorded_ms(cpu, model.sha256, threads)
    missing = [c for c in candidates if c not in ms]
    if missing:
        if log:
            log(f"auto: timing {', '.join(missing)} once on this machine ({cpu}); cached in {cache_path()}")
        new = measure(model, missing, threads) if measure else probe(model, missing, threads, create)
        if new:
            record_ms(cpu, model.sha256, threads, new, "probe")
        ms = {**ms, **new}
    return choose(candidates, ms)
