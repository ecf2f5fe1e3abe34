"""Which INT8 graph OpenVINO should run: the shipped QDQ export, or NNCF post-training quantization
of the fp32 export on the same calibration slices. Speed and masks, in one process.

    pip install "segengine[quantize]"   # nncf: only this comparison uses it
    python -m segengine.bench.int8_ptq_compare --train-data kaggle_3m \
        --train-list ../shared/data/lgg/splits/train.txt --val-data val_kaggle_3m --threads 1

Calibration: ``export.api``'s own slices (the same 300 training slices, seed 0, 32 held out)
so the two INT8 graphs differ only in the quantizer. Speed: the minimum of interleaved batch-32
runs over the held-out slices (OpenVINO for both graphs; ONNX Runtime on the QDQ graph for
scale). Masks: each graph against torch on every validation patient (native protocol), as
``segengine validate`` measures (worst |dDSC|, worst and mean agreement). Prints one JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-data", required=True, type=Path)
    p.add_argument("--train-list", required=True)
    p.add_argument("--val-data", required=True, type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)

    import nncf
    import openvino as ov

    from segengine.bench.machine import describe_cpu, machine_info
    from segengine.engine.evaluation.metrics import dsc
    from segengine.engine.inference import registry
    from segengine.engine.inference.predict import model_input
    from segengine.engine.model.spec import load_model_spec
    from segengine.engine.postprocessing.finish import finish_patient
    from segengine.engine.postprocessing.postprocess import PostprocessConfig
    from segengine.engine.preprocessing.preprocess import preprocess_patient
    from segengine.engine.readers.registry import read_patient
    from segengine.export.api import N_VERIFY_INT8, _real_slices

    spec = load_model_spec()
    slices, info = _real_slices(spec, args.train_data, args.train_list, 300 + N_VERIFY_INT8, lambda *_: None)
    held = np.zeros(len(slices), bool)
    held[np.linspace(0, len(slices) - 1, N_VERIFY_INT8).round().astype(int)] = True
    calib, verify = slices[~held], slices[held]
    core = ov.Core()
    t = time.perf_counter()
    quantized = nncf.quantize(core.read_model(str(spec.export_path("onnx"))),
                              nncf.Dataset([calib[i:i + 8] for i in range(0, len(calib), 8)]),
                              subset_size=len(calib), preset=nncf.QuantizationPreset.PERFORMANCE,
                              ignored_scope=nncf.IgnoredScope(names=["/model/head/Conv"], validate=False))
    nncf_s = time.perf_counter() - t
    cfg = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "nncf.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        graphs = {"qdq (shipped .int8.onnx)": core.compile_model(str(spec.export_path("onnx-int8")), "CPU", cfg),
                  "nncf ptq": core.compile_model(str(xml), "CPU", cfg)}
    ort = registry.create("onnxruntime-int8", spec, threads=args.threads).load()
    ref = registry.create("torch", spec, threads=args.threads).load()

    times = {k: [] for k in [*graphs, "onnxruntime-int8 (qdq)"]}
    batch = np.ascontiguousarray(verify[:32])
    for _ in range(args.rounds):
        for k, cm in graphs.items():
            t0 = time.perf_counter()
            cm(batch)
            times[k].append((time.perf_counter() - t0) * 1e3 / len(batch))
        t0 = time.perf_counter()
        ort.infer(batch)
        times["onnxruntime-int8 (qdq)"].append((time.perf_counter() - t0) * 1e3 / len(batch))

    def predict(cm, x):
        return np.concatenate([cm(x[i:i + 32])[0][:, 0] for i in range(0, len(x), 32)])

    rows = {k: [] for k in graphs}
    post = PostprocessConfig()
    for folder in sorted(f for f in args.val_data.iterdir() if f.is_dir()):
        vol = read_patient(folder)
        pre = preprocess_patient(vol, "native", spec.preprocessing)
        x = model_input(pre, spec)
        st = finish_patient(vol, pre, ref.predict(x), "native", post, {})
        for k, cm in graphs.items():
            s = finish_patient(vol, pre, predict(cm, x), "native", post, {})
            rows[k].append((abs(dsc(s.mask, s.truth) - dsc(st.mask, st.truth)), dsc(s.mask, st.mask)))
    out = {
        "cpu": describe_cpu(machine_info()), "model_sha256": spec.sha256, "threads": args.threads,
        "calibration": {k: info[k] for k in ("num_patients", "seed")} | {"num_slices": int(len(calib))},
        "nncf": {"version": nncf.__version__, "seconds": round(nncf_s, 1), "preset": "PERFORMANCE",
                 "ignored": ["/model/head/Conv"]},
        "ms_per_slice_batch32_min": {k: round(min(v), 3) for k, v in times.items()},
        "vs_torch": {k: {"patients": len(r), "worst_abs_delta_dsc": round(max(a for a, _ in r), 5),
                         "worst_agreement": round(min(b for _, b in r), 5),
                         "mean_agreement": round(float(np.mean([b for _, b in r])), 5)} for k, r in rows.items()},
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
