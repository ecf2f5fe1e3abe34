"""``segengine bench``'s human views: the text table (CPU named beside every table) and the plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from segengine.bench.machine import describe_cpu
from segengine.bench.measure import E2E_BATCH_SIZE, STAGES
from segengine.engine.core.atomic import atomic_file


def _fmt(v, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A plain-text report of ``run_bench``'s result; the CPU is named above every table."""
    m, s, peaks = result["machine"], result["settings"], result["peak"]
    cpu = describe_cpu(m)
    out = [
        cpu,
        "software: python " + m["python"] + ", " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"peak (nominal): fp32 {_fmt(peaks['fp32']['gflops'])} GFLOP/s ({peaks['fp32']['isa']}: "
        f"{peaks['fp32']['formula']}); int8 {_fmt(peaks['int8']['gops'])} GOP/s ({peaks['int8']['isa']}: "
        f"{peaks['int8']['formula']}"
        + (f"; {peaks['int8']['without_amx']['isa']}: {_fmt(peaks['int8']['without_amx']['gops'])} GOP/s"
           if peaks["int8"].get("without_amx") else "") + f"); clock from {peaks['clock_source']}",
        f"model: {result['model']['name']}, {result['model']['gflop_per_slice']:.2f} GFLOP/slice; "
        f"threads {s['threads'] or 'default'} (torch {s['torch_threads']}); warm-up {s['warmup']}, "
        f"{s['iterations']} timed iterations; input: {s['input']['source']}",
        "",
        f"model only (latency per batch, ms) -- {cpu}",
    ]
    rows = []
    for r in result["model_only"]:
        if r.get("status") != "ok":
            rows.append([r["backend"], _fmt(r.get("batch_size"), "d")] + ["-"] * 9 + [r["status"]])
            continue
        lat = r["latency_ms"]
        sp = r.get("speedup_vs_reference")
        rows.append([r["backend"], str(r["batch_size"]), _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(lat["p99"]),
                     _fmt(lat["mean"]), _fmt(r["per_slice_ms"], ".2f"), _fmt(r["throughput_slices_s"]),
                     _fmt(r["gflops_achieved"]), _fmt(r.get("pct_of_peak"), ".0f"),
                     (_fmt(sp, ".1f") + "x") if sp else "-", f"ok ({r['iterations']} it)"])
    ref = result.get("reference")
    if ref:
        mo = ref["model_only"]
        lat = mo["latency_ms"]
        rows.append(["reference", str(mo["batch_size"]), _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(lat["p99"]),
                     _fmt(lat["mean"]), _fmt(mo["per_slice_ms"], ".2f"), _fmt(mo["throughput_slices_s"]),
                     _fmt(mo["gflops_achieved"]), _fmt(mo.get("pct_of_peak"), ".0f"), "1.0x",
                     f"ok ({mo['iterations']} it)"])
    out.append(_table(["backend", "batch", "p50", "p95", "p99", "mean", "ms/slice", "slices/s", "G(FL)OP/s",
                       "%peak", "vs ref", "status"], rows))
    out.append("%peak: fp32 rows of the fp32 peak, int8 rows of the int8 peak (nominal FLOP count of the fp32 model)")
    if ref:
        out.append(f"reference: {ref['gflop_per_slice']:.2f} GFLOP/slice, {ref['weights_note']}")

    if result["end_to_end"] or (ref and ref.get("end_to_end")):
        out += ["", f"end to end per patient (s; the engine's patient job: read -> segment(native, batch "
                    f"{E2E_BATCH_SIZE}) -> write every output; mean after 1 warm-up patient) -- {cpu}"]
        rows = []
        for r in result["end_to_end"]:
            if r.get("status") != "ok":
                rows.append([r["backend"]] + ["-"] * 12 + [r["status"]])
                continue
            st = r["stages_s"]
            sp = r.get("speedup_vs_reference")
            am = r["amortized"]
            rows.append([r["backend"], _fmt(r["per_patient_s"], ".2f")] + [_fmt(st[k], ".3f") for k in STAGES]
                        + [_fmt(am["per_patient_s"], ".2f"), _fmt(r["infer_alone"]["per_patient_s"], ".3f"),
                           _fmt(am["vs_infer_alone"], ".2f") + "x", _fmt(r["load_s"], ".2f"),
                           (_fmt(sp, ".1f") + "x") if sp else "-",
                           (_fmt(am.get("speedup_vs_reference"), ".1f") + "x") if am.get("speedup_vs_reference") else "-",
                           "ok"])
        re2e = ref.get("end_to_end") if ref else None
        if re2e:
            st = re2e["stages_s"]
            rows.append(["reference", _fmt(re2e["per_patient_s"], ".2f")] + [_fmt(st[k], ".3f") for k in STAGES]
                        + ["-", "-", "-", _fmt(ref["load_s"], ".2f"), "1.0x", "-", "ok"])
        out.append(_table(["backend", "per patient", *STAGES, "amortized", "infer alone", "amort./infer", "load",
                           "vs ref", "amort. vs ref", "status"], rows))
        if result["end_to_end"]:
            pts = next((r["patients"] for r in result["end_to_end"] if r.get("status") == "ok"), s["patients"])
            out.append(f"patients: {', '.join(pts)}; amortized = total wall / N of the run --patients loop "
                       "(read, infer and write stages overlapped); infer alone = predict_patient per patient with "
                       "nothing else running")
    if result.get("notes"):
        out += ["", "notes:"] + [f"  - {n}" for n in result["notes"]]
    return "\n".join(out)


def plot(result: dict, path) -> Path:
    """PNG: latency per slice and throughput per backend x batch size, end to end per patient;
    dashed lines mark the reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    ok = [r for r in result["model_only"] if r.get("status") == "ok"]
    names = list(dict.fromkeys(r["backend"] for r in result["model_only"]))
    sizes = sorted({r["batch_size"] for r in ok}) or result["settings"]["batch_sizes"]
    ref = result.get("reference")
    e2e = [r for r in result.get("end_to_end", []) if r.get("status") == "ok"]
    ref_e2e = ref.get("end_to_end") if ref else None
    panels = 3 if (e2e or ref_e2e) else 2
    fig = Figure(figsize=(5.2 * panels, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    width = 0.8 / max(len(names), 1)
    xs = np.arange(len(sizes))
    for j, name in enumerate(names):
        rows = {r["batch_size"]: r for r in ok if r["backend"] == name}
        lat = [rows[b]["per_slice_ms"] if b in rows else np.nan for b in sizes]
        thr = [rows[b]["throughput_slices_s"] if b in rows else np.nan for b in sizes]
        label = name if rows else f"{name} (not available)"
        axes[0].bar(xs + (j - (len(names) - 1) / 2) * width, lat, width, label=label)
        axes[1].bar(xs + (j - (len(names) - 1) / 2) * width, thr, width, label=label)
    if ref:
        mo = ref["model_only"]
        axes[0].axhline(mo["per_slice_ms"], color="k", ls="--", lw=1, label=f"reference (batch {mo['batch_size']})")
        axes[1].axhline(mo["throughput_slices_s"], color="k", ls="--", lw=1, label=f"reference (batch {mo['batch_size']})")
    for ax, title, ylabel, key in ((axes[0], "model-only latency per slice (p50)", "ms per slice", "per_slice_ms"),
                                   (axes[1], "model-only throughput", "slices / s", "throughput_slices_s")):
        vals = [r[key] for r in ok] + ([ref["model_only"][key]] if ref else [])
        vals = [v for v in vals if v and v > 0]
        if vals:
            ax.set_ylim(min(vals) / 2, max(vals) * 2)
        ax.set_xlim(-0.5, len(sizes) - 0.5)
        ax.set_xticks(xs, [str(b) for b in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    if panels == 3:
        ax = axes[2]
        labels, bottoms = [], None
        bars = [(r["backend"], r["stages_s"]) for r in e2e]
        if ref_e2e:
            bars.append(("reference", ref_e2e["stages_s"]))
        labels = [b[0] for b in bars]
        bottoms = np.zeros(len(bars))
        for stage in STAGES:
            vals = np.array([b[1][stage] for b in bars])
            ax.bar(labels, vals, bottom=bottoms, label=stage)
            bottoms += vals
        for r in e2e:
            ax.plot([r["backend"]], [r["amortized"]["per_patient_s"]], "k_", ms=18)
        ax.set_ylabel("seconds per patient")
        ax.set_title("end to end per patient (- : amortized, --patients)")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"segengine bench: {result['model']['name']}, {result['settings']['threads'] or 'default'} threads; "
                 f"{describe_cpu(result['machine'])}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "plot") as tmp:  # PNG under exactly the given name (savefig would add .png to a bare one)
        fig.savefig(tmp, dpi=110, format="png")
    return path
