"""What machine a bench ran on, and what it could do at best: the context of every number.

The CPU's vector ISA is read from /proc/cpuinfo flags (AVX2, AVX-512, VNNI, AMX), its clock
from cpufreq, the model name or 'cpu MHz', and the nominal peaks follow from them:

    fp32 peak GFLOP/s = cores x GHz x FMA units x fp32 lanes x 2      (an FMA is 2 flops)
    int8 peak GOP/s   = cores x GHz x int8 MACs per cycle x 2         (VNNI: units x lanes x 4; AMX: 1024)

Nothing here imports a heavy library; ``describe_cpu`` gives the one line printed beside
every speed table.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

# 2 FMA units (ports 0 and 5) on server cores with AVX-512 and on every AVX2 core of the last decade;
# /proc/cpuinfo cannot tell a 1-unit part (some Xeon Bronze/Silver), hence recorded as an assumption.
FMA_UNITS = 2
AMX_INT8_MACS_PER_CYCLE = 1024  # one AMX TMUL per core: 16x64 int8 x 64x16 tile per 16 cycles
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_int8", "amx_bf16")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def parse_cpuinfo(text: str) -> dict:
    """Model name, physical cores, 'cpu MHz' values and flags of a /proc/cpuinfo text."""
    model = None
    mhz: list[float] = []
    cores_per_socket: dict[str, int] = {}
    flags: set[str] = set()
    phys = "0"
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name" and model is None:
            model = val
        elif key == "cpu MHz":
            try:
                mhz.append(float(val))
            except ValueError:
                pass
        elif key == "physical id":
            phys = val
        elif key == "cpu cores":
            try:
                cores_per_socket[phys] = int(val)
            except ValueError:
                pass
        elif key == "flags" and not flags:
            flags = set(val.split())
    return {"model": model, "physical_cores": sum(cores_per_socket.values()) or None, "mhz": mhz, "flags": flags}


def isa_of(flags: set[str]) -> dict:
    """The widest fp32 FMA and int8 dot-product paths these flags allow."""
    if "avx512f" in flags:
        fp32 = {"isa": "AVX-512", "lanes": 16}
    elif "avx2" in flags and "fma" in flags:
        fp32 = {"isa": "AVX2 FMA", "lanes": 8}
    elif "avx" in flags:
        fp32 = {"isa": "AVX (no FMA)", "lanes": 8}
    else:
        fp32 = {"isa": "SSE", "lanes": 4}
    fp32["flops_per_cycle_per_core"] = (FMA_UNITS if "fma" in flags or "avx512f" in flags else 1) * fp32["lanes"] * 2
    if "amx_int8" in flags:
        int8 = {"isa": "AMX-INT8", "macs_per_cycle_per_core": AMX_INT8_MACS_PER_CYCLE}
    elif "avx512_vnni" in flags:
        int8 = {"isa": "AVX-512 VNNI", "macs_per_cycle_per_core": FMA_UNITS * 16 * 4}
    elif "avx_vnni" in flags:
        int8 = {"isa": "AVX-VNNI", "macs_per_cycle_per_core": FMA_UNITS * 8 * 4}
    elif "avx512bw" in flags:
        int8 = {"isa": "AVX-512BW (no VNNI)", "macs_per_cycle_per_core": FMA_UNITS * 32}  # vpmaddubsw + vpmaddwd
    elif "avx2" in flags:
        int8 = {"isa": "AVX2 (no VNNI)", "macs_per_cycle_per_core": FMA_UNITS * 16}
    else:
        int8 = {"isa": "none", "macs_per_cycle_per_core": None}
    vnni = ("AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-VNNI" if "avx_vnni" in flags else None)
    return {"fp32": fp32, "int8": int8, "vnni": vnni, "amx": sorted(f for f in flags if f.startswith("amx_"))}


def clock_ghz(model: str | None, mhz: list[float]) -> tuple[float | None, str]:
    """(GHz, where it came from): cpufreq base, then the model name's '@ x.xxGHz', then 'cpu MHz'."""
    for path, what in (("/sys/devices/system/cpu/cpu0/cpufreq/base_frequency", "cpufreq base_frequency"),
                       ("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", "cpufreq cpuinfo_max_freq")):
        text = _read(path).strip()
        if text.isdigit() and int(text) > 0:
            return int(text) / 1e6, what
    m = re.search(r"@\s*([0-9.]+)\s*GHz", model or "")
    if m:
        return float(m.group(1)), "model name"
    if mhz:
        return max(mhz) / 1000.0, "/proc/cpuinfo 'cpu MHz'"
    return None, "unknown"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpu_name() -> str | None:
    """The GPU's name from nvidia-smi (no CUDA library is loaded for this)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return ", ".join(names) or None


def machine_info(cpuinfo: str | None = None) -> dict:
    """CPU model, cores, clock, ISA and flags, library versions, GPU (or None)."""
    cpu = parse_cpuinfo(_read("/proc/cpuinfo") if cpuinfo is None else cpuinfo)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    ghz, clock_source = clock_ghz(cpu["model"], cpu["mhz"])
    versions = {}
    for key, dists in (("numpy", ["numpy"]), ("torch", ["torch"]), ("onnxruntime", ["onnxruntime", "onnxruntime-gpu"]),
                       ("tensorrt", ["tensorrt", "tensorrt-cu12"]), ("openvino", ["openvino"]), ("scipy", ["scipy"]),
                       ("scikit-image", ["scikit-image"])):
        versions[key] = next((v for v in map(_version, dists) if v), None)
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": cpu["model"] or platform.processor() or platform.machine(),
        "cores": cpu["physical_cores"] or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "ghz": ghz,
        "clock_source": clock_source,
        "isa": isa_of(cpu["flags"]),
        "simd": [f for f in SIMD_FLAGS if f in cpu["flags"]],
        "flags": sorted(cpu["flags"]),
        "gpu": _gpu_name(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": load,
    }


def peak(machine: dict) -> dict:
    """Nominal fp32 and int8 peaks of the cores this process may use (None where unknown)."""
    cores = min(machine.get("cores") or 1, machine.get("usable_cpus") or machine.get("cores") or 1)
    ghz = machine.get("ghz")
    isa = machine["isa"]
    fp32_per_cycle = isa["fp32"]["flops_per_cycle_per_core"]
    int8_macs = isa["int8"]["macs_per_cycle_per_core"]
    fp32 = {
        "isa": isa["fp32"]["isa"], "flops_per_cycle_per_core": fp32_per_cycle,
        "gflops": cores * ghz * fp32_per_cycle if ghz else None,
        "formula": f"cores x GHz x {FMA_UNITS} FMA units x {isa['fp32']['lanes']} fp32 lanes x 2 "
                   f"= {cores} x {ghz or '?'} x {fp32_per_cycle}",
    }
    int8 = {
        "isa": isa["int8"]["isa"], "ops_per_cycle_per_core": 2 * int8_macs if int8_macs else None,
        "gops": cores * ghz * 2 * int8_macs if ghz and int8_macs else None,
        "formula": f"cores x GHz x {int8_macs} int8 MACs/cycle x 2 = {cores} x {ghz or '?'} x "
                   f"{2 * int8_macs if int8_macs else '?'}",
    }
    vnni_lanes = {"AVX-512 VNNI": 16, "AVX-VNNI": 8}.get(isa.get("vnni"))
    if vnni_lanes and int8["isa"] != isa["vnni"]:  # AMX present: the VNNI peak too, for kernels without AMX
        macs = FMA_UNITS * vnni_lanes * 4
        int8["without_amx"] = {"isa": isa["vnni"], "gops": cores * ghz * 2 * macs if ghz else None}
    return {"cores": cores, "ghz": ghz, "clock_source": machine.get("clock_source"), "fma_units_assumed": FMA_UNITS,
            "fp32": fp32, "int8": int8,
            "caveat": "nominal: all-core turbo and the lower clock of heavy AVX-512/AMX code are not known here"}


def peak_for(precision: str | None, peaks: dict) -> tuple[float | None, str | None]:
    """(peak G(FL)OP/s, unit) a row of this precision is compared with; None for GPU precisions."""
    if precision == "int8":
        return peaks["int8"]["gops"], "GOP/s"
    if precision == "fp32":
        return peaks["fp32"]["gflops"], "GFLOP/s"
    return None, None


def describe_cpu(machine: dict) -> str:
    """One line naming the CPU, printed beside every speed table."""
    isa = machine["isa"]
    extras = [x for x in (isa.get("vnni"), "AMX" if isa.get("amx") else None) if x]
    ghz = machine.get("ghz")
    line = (f"CPU: {machine['cpu_model']}, {machine['cores']} cores ({machine.get('usable_cpus')} usable), "
            f"{ghz:.2f} GHz" if ghz else f"CPU: {machine['cpu_model']}, {machine['cores']} cores, clock unknown")
    line += f", {isa['fp32']['isa']}" + (f" + {' + '.join(extras)}" if extras else "")
    return line + f"; GPU: {machine.get('gpu') or 'none'}"
