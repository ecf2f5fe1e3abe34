"""The `segengine` command line. Heavy libraries load inside commands, so --help is instant."""
from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import click

from segengine.engine.core.atomic import write_json_atomic
from segengine.engine.core.runtime import BLAS_ENV_VARS, bound_thread_pools, threads_from_argv
from segengine.engine.inference.backends import NAMES as BACKEND_NAMES


class SegengineGroup(click.Group):
    """Sets the thread variables from --threads before any command runs, hence before numpy loads."""

    def main(self, args=None, *rest, **kwargs):
        bound_thread_pools(threads_from_argv(list(sys.argv[1:] if args is None else args)))
        for var in BLAS_ENV_VARS:
            os.environ.setdefault(var, "1")
        from segengine.engine.core.terminal import safe_streams

        with safe_streams():  # every printed line: names escaped, encoding errors replaced (engine.terminal)
            return super().main(args, *rest, **kwargs)


EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"segengine: error: {message}", err=True)
    sys.exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (Ray, schedulers, `timeout`): unwinds like Ctrl-C, so temp folders are removed."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def user_errors(fn):
    """Turn the typed errors of bad input, models and backends into one line and exit 2.

    A full disk or exhausted memory is one line and exit 1; SIGINT exits 130 and SIGTERM 143,
    both after the temp folders of the patient being written are removed.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import threading

        from segengine.engine.core.errors import (BackendUnavailable, DataError, EmptyVolumeError, ModelError,
                                                  OutputError, PatientBusyError, ResourceError)

        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
        try:
            return fn(*args, **kwargs)
        except (PatientBusyError, ResourceError) as exc:
            fail(str(exc), 1)
        except (DataError, ModelError, BackendUnavailable, OutputError, EmptyVolumeError) as exc:
            fail(str(exc))
        except MemoryError:
            fail("out of memory (try fewer --threads, a smaller --batch-size, or fewer patients at once)", 1)
        except Terminated:
            fail("terminated (SIGTERM); nothing partial left", 143)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _set_threads(threads: int | None) -> None:
    """Thread env for libraries not loaded yet (SegengineGroup.main already did this from the arguments)."""
    if threads:
        bound_thread_pools(str(threads))


def _check_paths(files: dict[str, Path | None] | None = None, folders: dict[str, Path | None] | None = None) -> None:
    """Refuse unwritable --json/--plot files and --out folders before any work is done."""
    from segengine.engine.core.fsguard import check_writable_dir, check_writable_file

    for option, path in (files or {}).items():
        if path is not None:
            check_writable_file(path, option)
    for option, path in (folders or {}).items():
        if path is not None:
            check_writable_dir(path, option)


@click.group(cls=SegengineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="segengine")
def main() -> None:
    """segengine: segment FLAIR abnormalities (lower-grade glioma) in brain MRI slices.

    \b
    Examples:
      segengine run --patient kaggle_3m/TCGA_CS_4941_19960909 --out results
      segengine run --patients kaggle_3m --out results --backend onnxruntime
      segengine run --patient case.nii.gz --out results      (4D: pre-contrast, FLAIR, post-contrast)
      segengine report results                               (rewrite results/index.html)
      segengine evaluate --model --data kaggle_3m --patients-file val.txt --protocol reference
      segengine validate --data kaggle_3m --backend onnxruntime-int8
      segengine bench --data kaggle_3m --patients 10 --json bench.json --plot bench.png
      segengine bench --data kaggle_3m --ensemble --tta --backends torch     (accurate mode's cost)
    """


THREADS_HELP = "intra-op threads of the backend (default: all cores); also bounds the OpenMP/MKL pools"
MODEL_HELP = "model .pt with its card beside it (default: the shipped model)"
AUTO_HELP = ("auto = the fastest on this CPU (ms/slice from `segengine bench` or a one-time probe, cached in "
             "~/.cache/segengine) of the backends available here that passed `segengine validate` for this model; "
             "triton = the model served by a Triton server at $SEGENGINE_TRITON_URL")


def threads_option(fn):
    return click.option("--threads", type=click.IntRange(1, 256), default=None, help=THREADS_HELP)(fn)


def accurate_mode_options(fn):
    """--ensemble [MANIFEST] and --tta, read by engine.ensemble.load_plan."""
    fn = click.option("--tta", is_flag=True, help="accurate mode: also average left-right mirrored slices")(fn)
    return click.option("--ensemble", is_flag=False, flag_value="", default=None, type=str, metavar="[MANIFEST]",
                        help="accurate mode: average the fold ensemble (bare: the shipped one; or a *.ensemble.json)")(fn)


def _ensemble_arg(model, ensemble: str | None) -> bool | Path | None:
    """--ensemble's value for load_plan (bare: True, the shipped one); refuses it beside --model
    (bare --model included, which load_plan cannot see), before any work."""
    if model is not None and ensemble is not None:
        fail("give --model or --ensemble, not both")
    return None if ensemble is None else (True if ensemble == "" else Path(ensemble))


def max_memory_option(fn):
    """--max-memory GB: the per-patient memory budget checked from the headers (engine.budget)."""
    # 2.0 = io.DEFAULT_MAX_MEMORY_GB, written out so --help does not import numpy (a test holds them equal)
    return click.option("--max-memory", type=click.FloatRange(0.01, 100000), default=2.0, show_default=True,
                        metavar="GB", help="refuse patients whose headers claim more memory than this "
                        "(decoded slices + working arrays), before decoding")(fn)


def _gb(value: float) -> int:
    return int(value * 10**9)


# --------------------------------------------------------------------------- run
def input_output_options(fn):
    """--series, --spacing, --save-probabilities: carried by options.RunOptions with the limits."""
    fn = click.option("--save-probabilities", is_flag=True,
                      help="also write OUT/<patient>/<patient>_prob.nii.gz, the probabilities on the input's grid")(fn)
    fn = click.option("--spacing", default=None, metavar="SLICE,ROW,COL",
                      help="voxel spacing in mm of Kaggle tif slices (NIfTI and DICOM carry their own): volumes in "
                           "mm3 and HD95 in mm")(fn)
    return click.option("--series", multiple=True, metavar="ROLE=UID|DESCRIPTION",
                        help="DICOM: which series is flair, pre or post (by SeriesInstanceUID or SeriesDescription; "
                             "pre/post may be 'none'); repeatable")(fn)


def run_options(limits, series: tuple[str, ...], spacing: str | None, save_probabilities: bool):
    """The limits as options.RunOptions, carrying the reader/writer choices."""
    from dataclasses import asdict

    from segengine.engine.job.options import RunOptions, parse_series, parse_spacing

    return RunOptions(**asdict(limits), series=parse_series(series), spacing_mm=parse_spacing(spacing),
                      save_probabilities=save_probabilities)


def _load_spec(model: str | None):
    from segengine.engine.model.spec import load_model_spec

    return load_model_spec(model or None)


@main.command()
@click.option("--patient", "patient_dir", type=click.Path(path_type=Path),
              help="one patient: a folder of <patient>_<n>.tif slices, a 4D case.nii[.gz], a folder of "
                   "*_flair.nii[.gz] or nnU-Net <case>_0000.nii.gz files, or a DICOM study folder")
@click.option("--patients", "patients_root", type=click.Path(path_type=Path),
              help="a folder of patients (kaggle_3m; NIfTI cases, nnU-Net imagesTs cases and DICOM study "
                   "folders may sit beside tif folders)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="results go to OUT/<patient>/")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="auto", show_default=True, help=AUTO_HELP)
@click.option("--model", type=click.Path(path_type=Path), default=None, help=MODEL_HELP)
@accurate_mode_options
@click.option("--batch-size", type=click.IntRange(1, 512), default=32, show_default=True,
              help="slices per inference call (a patient's slices are split into equal batches of at most this)")
@threads_option
@click.option("--no-postprocess", is_flag=True, help="threshold only: keep every component")
@click.option("--fill-holes", is_flag=True, help="also fill holes slice by slice after the largest-component step")
@click.option("--gif", is_flag=True, help="also write slices.gif (all slices with outlines)")
@click.option("--overwrite", is_flag=True, help="replace existing results in OUT")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="with --patients: spread patients over a Ray cluster (bare --ray: a local Ray instance; "
                   "ADDRESS: auto, ray://head:10001, ...)")
@click.option("--workers", type=click.IntRange(1, 100000), default=None,
              help="with --ray: worker actors (default: cluster CPUs / --threads)")
@click.option("--max-side", type=click.IntRange(1, 65536), default=1024, show_default=True,
              help="refuse slices wider or taller than this (checked from the file header, before decoding)")
@click.option("--min-side", type=click.IntRange(1, 65536), default=32, show_default=True,
              help="refuse slices narrower or shorter than this")
@click.option("--max-slices", type=click.IntRange(1, 100000), default=512, show_default=True,
              help="refuse patients with more slices than this")
@max_memory_option
@input_output_options
@user_errors
def run(patient_dir, patients_root, out, backend, model, ensemble, tta, batch_size, threads, no_postprocess, fill_holes,
        gif, overwrite, ray_address, workers, max_side, min_side, max_slices, max_memory, series, spacing,
        save_probabilities):
    """Segment one patient (--patient) or every patient under a folder (--patients).

    \b
    Writes OUT/<patient>/: <patient>_<n>_mask.tif per input slice (uint8 0/255),
    <patient>_mask.nii.gz, overlay.png, report.json, review.html (and slices.gif with
    --gif), and OUT/index.html, the review page of the batch (open it from disk).
    Each patient is written to a temporary folder and renamed when complete.
    A patient is a folder of Kaggle slices, a 4D case.nii[.gz] (pre, FLAIR, post on the
    last axis), a folder of *_flair.nii[.gz] (+ *_pre, *_post, *_mask), a folder of nnU-Net
    <case>_0000/_0001/_0002.nii.gz, or a DICOM study (OUT/<patient>/ also gets <patient>_seg.dcm).

    \b
    Examples:
      segengine run --patient kaggle_3m/TCGA_CS_4941_19960909 --out results
      segengine run --patients kaggle_3m --out results --backend onnxruntime --threads 2
      segengine run --patient case.nii.gz --out results                 (4D NIfTI)
      segengine run --patient study_dir --out results --series flair="AX FLAIR"   (DICOM)
      segengine run --patients kaggle_3m --out results --ray            (local Ray, 1 worker per CPU)
      segengine run --patient kaggle_3m/TCGA_CS_4941_19960909 --out results --ensemble --tta
      segengine run --patients /shared/kaggle_3m --out /shared/results --ray auto
    """
    from segengine.engine.job.batch import run_patients
    from segengine.engine.readers.volume import SliceLimits

    ensemble = _ensemble_arg(model, ensemble)
    if (patient_dir is None) == (patients_root is None):
        fail("give exactly one of --patient DIR or --patients ROOT")
    if min_side > max_side:
        fail(f"--min-side {min_side} is larger than --max-side {max_side}")
    limits = run_options(SliceLimits(min_side=min_side, max_side=max_side, max_slices=max_slices,
                                      max_memory=_gb(max_memory)), series, spacing, save_probabilities)
    if ray_address is not None:
        if patients_root is None:
            fail("--ray distributes an archive: use it with --patients ROOT")
        from segengine.engine.job.ray_runner import run_patients_ray

        summary = run_patients_ray(patients_root, out, backend, model, address=ray_address or None, workers=workers,
                                   threads=threads or 1, batch_size=batch_size, postprocess=not no_postprocess,
                                   fill_holes=fill_holes, gif=gif, overwrite=overwrite, echo=click.echo, limits=limits,
                                   ensemble=ensemble, tta=tta)
        _write_review_index(out)
        sys.exit(1 if summary.failed else 0)
    if workers is not None:
        fail("--workers needs --ray")
    _set_threads(threads)
    code = run_patients(patient_dir=patient_dir, patients_root=patients_root, out=out, backend_name=backend,
                        model=model, batch_size=batch_size, threads=threads, postprocess=not no_postprocess,
                        fill_holes=fill_holes, gif=gif, overwrite=overwrite, echo=click.echo, limits=limits,
                        ensemble=ensemble, tta=tta)
    _write_review_index(out)
    sys.exit(code)


def _write_review_index(out: Path) -> None:
    """OUT/index.html after a run; a page that cannot be written costs a warning, not the run."""
    from segengine.engine.outputs.review_page import write_index

    try:
        write_index(out)
    except OSError as exc:
        click.echo(f"segengine: warning: review page not written ({exc})", err=True)


# --------------------------------------------------------------------------- report
@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@user_errors
def report(out):
    """(Re)write OUT/index.html, the review page of every patient result in OUT.

    \b
    `run` writes it too; use this after a Ray job, an interrupted or partial run, or
    when results were added by hand. Open it from disk: no server, no network.

    \b
    Example:
      segengine report results && xdg-open results/index.html
    """
    from segengine.engine.outputs.review_page import rewrite_index

    path, n, flagged = rewrite_index(out)
    click.echo(f"wrote {path} ({n} patients, {flagged} flagged for review)")


# --------------------------------------------------------------------------- evaluate
@main.command()
@click.option("--data", "data_root", required=True, type=click.Path(path_type=Path), help="ground truth: folder of patient folders")
@click.option("--pred", "pred_root", type=click.Path(path_type=Path), help="predicted masks: PRED/<patient>/<patient>_<n>_mask.tif")
@click.option("--model", is_flag=False, flag_value="", default=None, type=str,
              help="evaluate a model instead of --pred (bare --model: the shipped one)")
@click.option("--protocol", type=click.Choice(["reference", "native"]), default="native", show_default=True,
              help="reference: course preprocessing, 256x256 grid, no first/last slice; native: every original slice")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="auto", show_default=True,
              help="with --model: as for run (" + AUTO_HELP.split(";")[0] + "; ...); torch scores the PyTorch weights")
@click.option("--patients-file", type=click.Path(), help="only these patients (one id per line)")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="write metrics.json and dsc.png here")
@threads_option
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="with --model")
@click.option("--no-postprocess", is_flag=True, help="with --model: keep every component")
@click.option("--fill-holes", is_flag=True, help="with --model: fill holes slice by slice")
@accurate_mode_options
@max_memory_option
@user_errors
def evaluate(data_root, pred_root, model, protocol, backend, patients_file, out_dir, threads, threshold, no_postprocess,
             fill_holes, ensemble, tta, max_memory):
    """Score predicted masks (--pred) or a model (--model) per patient: DSC, HD95, precision, recall.

    \b
    Examples:
      segengine evaluate --data kaggle_3m --pred results --patients-file val.txt --out eval
      segengine evaluate --model --data kaggle_3m --patients-file val.txt --protocol reference
      segengine evaluate --ensemble --tta --data kaggle_3m --patients-file val.txt
    """
    from segengine.engine.evaluation.evaluate import format_table, score_predictions, write_result
    from segengine.engine.readers.volume import SliceLimits

    limits = SliceLimits(max_memory=_gb(max_memory))

    if (pred_root is None) == (model is None and ensemble is None):
        fail("give exactly one of --pred PRED_ROOT or --model [PATH] / --ensemble [MANIFEST]")
    ensemble = _ensemble_arg(model, ensemble)
    if pred_root is not None and tta:
        fail("--tta averages a model's predictions: use it with --model or --ensemble, not --pred")
    _check_paths(folders={"--out": out_dir})
    _set_threads(threads)
    if pred_root is not None:
        if not pred_root.is_dir():
            fail(f"{pred_root}: no such folder")
        result = score_predictions(data_root, pred_root, patients_file, limits=limits)
    else:
        from segengine.engine.evaluation.evaluate import evaluate_model
        post = {"threshold": threshold, "largest_component": not no_postprocess, "fill_holes_2d": fill_holes}
        result = evaluate_model(data_root, model or None, protocol, backend, patients_file, threads, post,
                                ensemble=ensemble, tta=tta, limits=limits)
    click.echo(format_table(result))
    s = result["summary"]["dsc"]
    click.echo(f"\nDSC ({result['protocol']} protocol, {s['n']} patients): mean {s['mean']:.4f}  median {s['median']:.4f}")
    if out_dir:
        write_result(result, out_dir)
        click.echo(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'dsc.png'}")


# --------------------------------------------------------------------------- validate
@main.command()
@click.option("--data", "data_root", required=True, type=click.Path(path_type=Path),
              help="ground truth: a folder of patients (Kaggle layout, NIfTI or DICOM)")
@click.option("--patients-file", type=click.Path(), help="only these patients (default: every patient under --data)")
@click.option("--backend", required=True, type=click.Choice(BACKEND_NAMES[1:]), help="the backend under test")
@click.option("--against", type=click.Choice(BACKEND_NAMES[1:]), default="torch", show_default=True,
              help="the backend it must segment like (a verdict is recorded only against torch)")
@click.option("--model", type=click.Path(path_type=Path), default=None, help=MODEL_HELP)
@threads_option
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write every figure here")
@click.option("--record", is_flag=True, help="store the verdict in the export's sidecar (what --backend auto trusts)")
@max_memory_option
@user_errors
def validate(data_root, patients_file, backend, against, model, threads, json_path, record, max_memory):
    """Prove an exported backend segments like PyTorch, patient by patient (native protocol).

    \b
    Tolerances: fp32 |dDSC| <= 0.001, agreement >= 0.999; fp16 |dDSC| <= 0.002,
    agreement >= 0.995 (and an FP16 range report); int8 |dDSC| <= 0.005, agreement >= 0.98.
    --record needs --against torch. Exit 1 on FAIL.

    \b
    Example:
      segengine validate --data kaggle_3m --patients-file val.txt --backend onnxruntime-int8
    """
    from segengine.engine.evaluation.validate import compute
    from segengine.engine.inference import verdict

    _check_paths(files={"--json": json_path})
    _set_threads(threads)
    spec = _load_spec(model)
    if record:
        verdict.refuse_unrecordable(backend, against)
    from segengine.engine.readers.volume import SliceLimits

    result = compute(spec, data_root, patients_file, backend, against, threads,
                             limits=SliceLimits(max_memory=_gb(max_memory)))
    click.echo(verdict.format_result(result))
    if json_path:
        write_json_atomic(json_path, result)
    if record:
        click.echo(f"recorded verdict in {verdict.record(spec, result).name}")
    sys.exit(0 if result["passed"] else 1)


# --------------------------------------------------------------------------- export
@main.command()
@click.option("--model", type=click.Path(path_type=Path), default=None, help=MODEL_HELP)
@click.option("--kinds", default="onnx,onnx-int8,onnx-fp16,tensorrt-fp16", show_default=True,
              help="comma list of onnx, onnx-int8, onnx-fp16, tensorrt-fp16")
@click.option("--data", "data_root", type=click.Path(path_type=Path), help="training patients for INT8 calibration")
@click.option("--train-list", type=click.Path(), help="calibration patients (training split only)")
@click.option("--calibration-slices", type=int, default=300, show_default=True,
              help="INT8: training slices whose activation ranges set the quantization scales")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset of the exported graph")
@click.option("--triton", "triton_repo", type=click.Path(path_type=Path),
              help="instead of exporting, write a Triton model repository here from the current exports")
@click.option("--triton-device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="instance group of the ONNX models (TensorRT plans are always GPU)")
@click.option("--max-batch-size", type=click.IntRange(1, 1024), default=64, show_default=True, help="with --triton")
@click.option("--bench-json", type=click.Path(path_type=Path), help="with --triton: `segengine bench --json` file "
              "whose fastest batch sizes become Triton's preferred_batch_size (default 8, 32)")
@click.option("--overwrite", is_flag=True, help="with --triton: replace model folders that exist")
@user_errors
def export(model, kinds, data_root, train_list, calibration_slices, opset, triton_repo, triton_device, max_batch_size,
           bench_json, overwrite):
    """Export to ONNX (fp32), ONNX INT8 (static QDQ), ONNX float16 and a TensorRT FP16 engine, each verified.

    \b
    Files land beside the weights (<name>.onnx, <name>.int8.onnx, <name>.fp16.onnx, <name>.fp16.plan),
    each with a sidecar <file>.json naming the weights' SHA-256 it came from.
    With --triton REPO, the current exports are laid out as a Triton Inference Server
    model repository (REPO/<model>/config.pbtxt, REPO/<model>/1/model.onnx|model.plan),
    each config checked against Triton's ModelConfig message.

    \b
    Examples:
      segengine export --data kaggle_3m --train-list ../shared/data/lgg/splits/train.txt
      segengine export --triton triton_repo --bench-json docs/bench.json
    """
    from segengine.engine.core.errors import ExportError
    from segengine.export.api import export_model

    spec = _load_spec(model)
    wanted = tuple(k.strip() for k in kinds.split(",") if k.strip())
    if triton_repo is not None:
        from segengine.export.triton import write_repository

        try:
            write_repository(spec, triton_repo, device=triton_device, max_batch_size=max_batch_size,
                             bench_json=bench_json, overwrite=overwrite, kinds=wanted, log=click.echo)
        except ExportError as exc:
            fail(str(exc))
        return
    try:
        results = export_model(spec, kinds=wanted, data_root=data_root, train_list=train_list,
                               calibration_slices_n=calibration_slices, opset=opset, log=click.echo)
    except ExportError as exc:
        fail(str(exc), 1)
    for kind, res in results.items():
        click.echo(f"{kind:>14}: " + (f"skipped ({res['skipped']})" if "skipped" in res else "ok"))


# --------------------------------------------------------------------------- bench
@main.command()
@click.option("--data", "data_root", type=click.Path(path_type=Path), help="patients to time (default: synthetic slices, no end-to-end)")
@click.option("--patients", "n_patients", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="patients timed end to end (the first also warms up)")
@click.option("--backends", default="torch,onnxruntime,onnxruntime-int8,openvino,openvino-int8,tensorrt", show_default=True,
              help="comma list: torch and every backend auto may pick (those not usable here are listed with the "
                   "reason, not timed); onnxruntime-fp16, a CPU emulation of the FP16 numerics, is timed only by name")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="comma list of slices per inference call")
@threads_option
@click.option("--warmup", type=click.IntRange(0, 1000), default=3, show_default=True, help="untimed calls first")
@click.option("--iterations", type=click.IntRange(1, 100000), default=20, show_default=True, help="timed calls per figure")
@click.option("--no-reference", is_flag=True, help="skip timing the course's reference pipeline")
@click.option("--model", type=click.Path(path_type=Path), default=None, help=MODEL_HELP)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write every figure here (with the CPU "
              "and the model's SHA-256)")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="write the latency/throughput chart here")
@accurate_mode_options
@user_errors
def bench(data_root, n_patients, backends, batch_sizes, threads, warmup, iterations, no_reference, model, json_path, plot_path,
          ensemble, tta):
    """Latency and throughput per backend and batch size, end to end per patient, vs the reference.

    \b
    Example:
      segengine bench --data kaggle_3m --patients 10 --json bench.json --plot bench.png
      segengine bench --data kaggle_3m --ensemble --tta --backends torch     (accurate mode's cost)
    """
    from segengine.bench.bench import format_table, plot, run_bench

    _check_paths(files={"--json": json_path, "--plot": plot_path})
    _set_threads(threads)
    from segengine.engine.inference.ensemble import load_plan

    spec = load_plan(model, _ensemble_arg(model, ensemble), tta)
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        fail(f"--batch-sizes {batch_sizes!r}: expected integers like 1,8,32")
    if min(sizes) < 1:
        fail(f"--batch-sizes {batch_sizes!r}: batch sizes must be 1 or more")
    names = tuple(b.strip() for b in backends.split(",") if b.strip())
    unknown = [b for b in names if b not in BACKEND_NAMES[1:]]
    if unknown or not names:
        fail(f"--backends {backends!r}: unknown backend {unknown[0]!r} (known: {', '.join(BACKEND_NAMES[1:])})"
             if unknown else "--backends names no backend")
    result = run_bench(spec, data_root=data_root, patients=n_patients, backends=names, batch_sizes=sizes,
                       threads=threads, warmup=warmup, iterations=iterations, reference=not no_reference, log=click.echo)
    click.echo(format_table(result))
    if json_path:
        write_json_atomic(json_path, result)
    if plot_path:
        plot(result, plot_path)


# --------------------------------------------------------------------------- train
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.pass_context
def train(ctx):
    """Train a model (segengine train --help lists every option).

    \b
    Example:
      segengine train --data ../shared/data/lgg --out runs/resunet16 --steps 4000
    """
    from segengine.train.train import main as train_main

    args = ["--help" if a == "--help-train" else a for a in ctx.args]
    sys.exit(train_main(args))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.pass_context
def cv(ctx):
    """Cross-validate a training recipe over patient folds (segengine cv --help lists every option).

    \b
    Examples:
      segengine cv --out runs/cv/a1 --folds 5 --record docs/cv/a1.json -- --steps 4000
      segengine cv compare runs/cv/a1 runs/cv/b1
    """
    from segengine.train.cv import main as cv_main

    sys.exit(cv_main(["--help" if a == "--help-cv" else a for a in ctx.args]))


if __name__ == "__main__":  # pragma: no cover
    main()
