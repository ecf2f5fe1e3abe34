"""The `segengine` command line. Heavy libraries load inside commands, so --help is instant."""
from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import click

from segengine.engine.core.atomic import write_json_atomic
from segengine.engine.core.cli_sections import SectionedCommand
from segengine.engine.core.runtime import BLAS_ENV_VARS, bound_thread_pools, threads_from_argv
from segengine.engine.inference.backends import NAMES as BACKEND_NAMES


# Shared option groups (as Polygraphy's argument groups): one option has one meaning in every command
# (--patients is always a folder of patients, --model always a PATH), and each command's --help lists
# its options under these headings, in this order; an option named nowhere here is under "Options".
OPTION_SECTIONS = {
    "Patients": ("--patient", "--patients", "--patients-file", "--data", "--pred", "--num-patients", "--train-list",
                 "--series", "--spacing"),
    "Model": ("--model", "--ensemble", "--tta", "--backend", "--against", "--backends", "--batch-size",
              "--batch-sizes", "--threads"),
    "Mask": ("--threshold", "--no-postprocess", "--fill-holes"),
    "Input limits": ("--max-side", "--min-side", "--max-slices", "--max-memory"),
}


class CommandWithSections(SectionedCommand):
    """Every segengine command: its --help groups the options under OPTION_SECTIONS' headings."""

    sections = OPTION_SECTIONS


class SegengineGroup(click.Group):
    """Sets the thread variables from --threads before any command runs, hence before numpy loads."""

    command_class = CommandWithSections

    def main(self, args=None, *rest, **kwargs):
        bound_thread_pools(threads_from_argv(list(sys.argv[1:] if args is None else args)))
        for var in BLAS_ENV_VARS:
            os.environ.setdefault(var, "1")
        from segengine.engine.core.terminal import safe_streams

        with safe_streams():  # every printed line: names escaped, encoding errors replaced (engine.terminal)
            return super().main(args, *rest, **kwargs)


EXIT_BAD_INPUT = 2


class FiniteFloatRange(click.FloatRange):
    """The one type of every float option: a FloatRange that also refuses NaN and infinities (NaN
    passes every comparison of a range check, so ``--threshold nan`` would score DSC 0 and
    ``--max-memory nan`` end in a traceback); a usage error, exit 2, before any work."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        import math

        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


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
    """Refuse unwritable --json/--plot files and --out folders before any work is done; an output
    file must be a regular file or absent (a FIFO, socket or device there is refused, never replaced)."""
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
      segengine evaluate --data kaggle_3m --patients-file val.txt --protocol reference
      segengine validate --data kaggle_3m --backend onnxruntime-int8
      segengine bench --data kaggle_3m --num-patients 10 --json bench.json --plot bench.png
      segengine bench --data kaggle_3m --ensemble --tta --backends torch     (accurate mode's cost)
    """


THREADS_HELP = "intra-op threads of the backend (default: all cores); also bounds the OpenMP/MKL pools"
MODEL_HELP = "model .pt with its card beside it (default: the shipped model)"
AUTO_HELP = ("auto = the fastest on this CPU (ms/slice from `segengine bench` or a one-time probe, cached in "
             "~/.cache/segengine) of the backends available here that passed `segengine validate` for this model; "
             "triton = the model served by a Triton server at $SEGENGINE_TRITON_URL")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cap_threads(ctx, param, value):
    """More threads than cores only oversubscribe them (issue 30: --threads 256 on 2 cores took 115 s
    instead of 2 s): the value is capped at the cores available, with one note on stderr."""
    cores = available_cores()
    if value is not None and value > cores:
        click.echo(f"note: --threads {value} is more than the {cores} cores available here; using {cores}", err=True)
        return cores
    return value


def threads_option(fn):
    return click.option("--threads", type=click.IntRange(1, 256), default=None, callback=_cap_threads,
                        help=THREADS_HELP + "; capped at the cores available")(fn)


class OutPath(click.Path):
    """An output folder: ``--out ""`` is refused (click.Path would make it ``.``, the current folder)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty: name the output folder (e.g. --out results)", param, ctx)
        return super().convert(value, param, ctx)


class ModelPath(click.Path):
    """A --model value: a path; the empty value of a bare ``--model`` (evaluate's older spelling) is the
    shipped model, None (click.Path would make it ``.``)."""

    def convert(self, value, param, ctx):
        return None if value == "" else super().convert(value, param, ctx)


# `segengine export --kinds`: backend name -> export kind; export/api.py's KIND_BACKENDS, written out
# so --help does not import numpy (a test holds them equal)
EXPORT_BACKENDS = {"onnxruntime": "onnx", "onnxruntime-int8": "onnx-int8", "onnxruntime-fp16": "onnx-fp16",
                   "tensorrt": "tensorrt-fp16"}


def model_option(help_text: str = MODEL_HELP, bare_ok: bool = False):
    """--model PATH, one definition for run, evaluate, validate, bench and export; ``bare_ok`` keeps
    evaluate's older bare ``--model`` (the shipped model) working."""
    bare = {"is_flag": False, "flag_value": ""} if bare_ok else {}
    return click.option("--model", type=ModelPath(path_type=Path), default=None, metavar="PATH", help=help_text, **bare)


def given(ctx: click.Context, name: str) -> bool:
    """The option was on the command line (a bare --model included, whose value is None)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


PATIENTS_FILE_HELP = "only these patients (one id per line, as OUT/<patient>/ names them)"


def patients_file_option(help_text: str = PATIENTS_FILE_HELP):
    """--patients-file FILE, one definition for every command that takes a batch (run, evaluate, validate)."""
    return click.option("--patients-file", type=click.Path(), default=None, metavar="FILE", help=help_text)


THRESHOLD_HELP = "probability above which a voxel is tumor"


def threshold_option(help_text: str = THRESHOLD_HELP):
    """--threshold P in [0, 1], one definition for run and evaluate (the model's masks)."""
    return click.option("--threshold", type=FiniteFloatRange(0, 1), default=0.5, show_default=True, help=help_text)


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
    return click.option("--max-memory", type=FiniteFloatRange(0.01, 100000), default=2.0, show_default=True,
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
@click.option("--out", required=True, type=OutPath(path_type=Path), help="results go to OUT/<patient>/")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="auto", show_default=True, help=AUTO_HELP)
@model_option()
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
@patients_file_option("with --patients: only these patients (one id per line, as OUT/<patient>/ names them)")
@threshold_option()
@user_errors
def run(patient_dir, patients_root, out, backend, model, ensemble, tta, batch_size, threads, no_postprocess, fill_holes,
        gif, overwrite, ray_address, workers, max_side, min_side, max_slices, max_memory, series, spacing,
        save_probabilities, patients_file, threshold):
    """Segment one patient (--patient) or every patient under a folder (--patients).

    \b
    Writes OUT/<patient>/: <patient>_<n>_mask.tif per input slice (uint8 0/255),
    <patient>_mask.nii.gz, overlay.png, report.json, review.html (and slices.gif with
    --gif), and OUT/index.html, the review page of the batch (open it from disk).
    Each patient is written to a temporary folder and renamed when complete.
    A patient is a folder of Kaggle slices, a 4D case.nii[.gz] (pre, FLAIR, post on the
    last axis), a folder of *_flair.nii[.gz] (+ *_pre, *_post, *_mask), a folder of nnU-Net
    <case>_0000/_0001/_0002.nii.gz, or a DICOM study (OUT/<patient>/ also gets <patient>_seg.dcm).
    Cases of an nnU-Net imagesTs/ (--patients DatasetXXX or --patients imagesTs) also get
    OUT/<case>.nii.gz, as nnUNetv2_predict writes them; labelsTs/<case>.nii.gz scores them.

    \b
    Examples:
      segengine run --patient kaggle_3m/TCGA_CS_4941_19960909 --out results
      segengine run --patients kaggle_3m --out results --backend onnxruntime --threads 2
      segengine run --patient case.nii.gz --out results                 (4D NIfTI)
      segengine run --patient study_dir --out results --series flair="AX FLAIR"   (DICOM)
      segengine run --patients kaggle_3m --out results --ray            (local Ray, 1 worker per CPU)
      segengine run --patients Dataset501_LGG --out results             (nnU-Net: imagesTs, labelsTs)
      segengine run --patients kaggle_3m --patients-file val.txt --out results --threshold 0.4
      segengine run --patient kaggle_3m/TCGA_CS_4941_19960909 --out results --ensemble --tta
      segengine run --patients /shared/kaggle_3m --out /shared/results --ray auto
    """
    from segengine.engine.job.batch import run_patients
    from segengine.engine.readers.volume import SliceLimits

    ensemble = _ensemble_arg(model, ensemble)
    if (patient_dir is None) == (patients_root is None):
        fail("give exactly one of --patient DIR or --patients ROOT")
    if patients_file is not None and patients_root is None:
        fail("--patients-file selects patients of a batch: use it with --patients ROOT")
    if patient_dir is not None:
        _refuse_folder_of_patients(patient_dir)
    if min_side > max_side:
        fail(f"--min-side {min_side} is larger than --max-side {max_side}")
    limits = run_options(SliceLimits(min_side=min_side, max_side=max_side, max_slices=max_slices,
                                      max_memory=_gb(max_memory)), series, spacing, save_probabilities)
    if ray_address is not None:
        if patients_root is None:
            fail("--ray distributes an archive: use it with --patients ROOT")
        from segengine.engine.job.ray_runner import run_patients_ray

        summary = run_patients_ray(patients_root, out, backend, model, address=ray_address or None, workers=workers,
                                   threads=threads, batch_size=batch_size, postprocess=not no_postprocess,
                                   fill_holes=fill_holes, gif=gif, overwrite=overwrite, echo=click.echo, limits=limits,
                                   ensemble=ensemble, tta=tta, threshold=threshold, patients_file=patients_file)
        _write_review_index(out)
        sys.exit(1 if summary.failed else 0)
    if workers is not None:
        fail("--workers needs --ray")
    _set_threads(threads)
    from segengine.engine.core.errors import NoSlicesError

    try:
        code = run_patients(patient_dir=patient_dir, patients_root=patients_root, out=out, backend_name=backend,
                            model=model, batch_size=batch_size, threads=threads, postprocess=not no_postprocess,
                            fill_holes=fill_holes, gif=gif, overwrite=overwrite, echo=click.echo, limits=limits,
                            ensemble=ensemble, tta=tta, threshold=threshold, patients_file=patients_file)
    except NoSlicesError:
        if patient_dir is not None and _holds_patients(patient_dir):
            _refuse_folder_of_patients(patient_dir, force=True)
        raise
    _write_review_index(out)
    sys.exit(code)


def _holds_patients(folder: Path) -> bool:
    """A folder that is no patient but holds some (sub-folders, NIfTI cases, an nnU-Net imagesTs/)."""
    from segengine.engine.readers.nifti import is_nifti_file

    try:
        entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    except OSError:
        return False
    return any(e.is_dir() for e in entries) or sum(is_nifti_file(e) for e in entries) > 1


def _refuse_folder_of_patients(folder: Path, force: bool = False) -> None:
    """--patient given a folder of patients (an nnU-Net dataset folder at once; others once no reader took
    them, ``force``): one line that names --patients."""
    import shlex

    from segengine.engine.readers.nnunet import images_folder

    if force or (folder.is_dir() and images_folder(folder) is not None):
        fail(f"{folder}: a folder of patients, not one patient; segment them all with --patients "
             f"{shlex.quote(str(folder))}")


def _write_review_index(out: Path) -> None:
    """OUT/index.html after a run, its path printed last; a page that cannot be written costs a warning, not the run."""
    from segengine.engine.outputs.review_page import write_index

    try:
        path, _, _ = write_index(out)
    except OSError as exc:
        click.echo(f"segengine: warning: review page not written ({exc})", err=True)
        return
    click.echo(f"review page: {path}")


# --------------------------------------------------------------------------- listen, pull (engine/network)
def network_job_options(fn):
    """What `listen` and `pull` share with `run`: the model, its backend, the mask, the limits, OUT."""
    for option in reversed((
            click.option("--out", required=True, type=OutPath(path_type=Path),
                         help="results go to OUT/<StudyInstanceUID>/, as `run` writes them"),
            click.option("--backend", type=click.Choice(BACKEND_NAMES), default="auto", show_default=True,
                         help=AUTO_HELP),
            model_option(),
            threads_option, threshold_option(), max_memory_option,
            click.option("--series", multiple=True, metavar="ROLE=UID|DESCRIPTION",
                         help="which series is flair, pre or post (as for run); repeatable"),
            click.option("--overwrite", is_flag=True, help="segment a study again when OUT holds its results"),
            click.option("--spool", type=click.Path(path_type=Path), default=None,
                         help="where received studies wait (default: a temporary folder, removed at exit)"),
            click.option("--tries", type=click.IntRange(1, 100), default=3, show_default=True,
                         help="tries of each transfer to or from the PACS before giving up with one line"),
            click.option("--timeout", type=FiniteFloatRange(0.1, 3600), default=10.0, show_default=True,
                         help="seconds without an answer that count as a lost connection"))):
        fn = option(fn)
    return fn


def _network_setup(out: Path, backend: str, model, threads, threshold, max_memory, series, overwrite, log):
    """OUT checked, the model loaded once, as `run` resolves it; returns a StudySegmenter."""
    from segengine.engine.core.fsguard import check_out_dir
    from segengine.engine.network.study_job import StudySegmenter, load_setup
    from segengine.engine.outputs.results_dir import tidy_out
    from segengine.engine.readers.volume import SliceLimits

    limits = run_options(SliceLimits(max_memory=_gb(max_memory)), series, None, False)
    check_out_dir(out, [])
    for note in tidy_out(out):
        log(f"segengine: {note}")
    _set_threads(threads)
    setup, load_s = load_setup(backend, model, threads, limits, overwrite, threshold=threshold)
    log(f"model {setup.spec.name} on {setup.name}, loaded in {load_s:.2f} s")
    return StudySegmenter(setup, out)


def _line_logger():
    """Thread-safe log: "segengine: ..." lines (refusals, failures) to stderr, results to stdout."""
    import threading

    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            click.echo(line, err=line.startswith("segengine:"))

    return log


def _wait_for_signal():
    """Block until SIGTERM or SIGINT; a second one interrupts at once (exit 130/143)."""
    import threading

    stop = threading.Event()

    def first(signum, frame):
        if stop.is_set():
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        stop.set()

    signal.signal(signal.SIGTERM, first)
    previous_int = signal.signal(signal.SIGINT, first)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        signal.signal(signal.SIGINT, previous_int)
    return stop


@main.command()
@click.option("--aet", default="SEGENGINE", show_default=True, help="this node's AE title")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0: every interface; no TLS: keep it on a trusted network)")
@click.option("--port", type=click.IntRange(0, 65535), default=11112, show_default=True, help="TCP port (0: any free)")
@click.option("--allow-aet", multiple=True, metavar="AET", help="calling AE titles accepted; repeatable")
@click.option("--allow-host", multiple=True, metavar="HOST", help="caller hosts accepted (name or address); repeatable")
@click.option("--dest", default=None, metavar="AET@HOST:PORT", help="C-STORE each SEG to this node (e.g. the PACS)")
@click.option("--quiet", type=FiniteFloatRange(0, 86400), default=5.0, show_default=True,
              help="a study is complete when no instance of it arrived for this many seconds")
@click.option("--on-release", is_flag=True, help="also: a study is complete when its sender releases the association")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="studies segmented at once (memory: about --max-memory each)")
@network_job_options
@user_errors
def listen(aet, host, port, allow_aet, allow_host, dest, quiet, on_release, workers, out, backend, model, threads,
           threshold, max_memory, series, overwrite, spool, tries, timeout):
    """A DICOM storage SCP: segment each study sent to it, C-STORE the SEG to --dest.

    \b
    Callers must be on the allow-list (--allow-aet and/or --allow-host; at least one is required).
    A study is segmented by `run`'s job once no instance arrived for --quiet seconds; a bad study
    is one line and the node goes on. SIGTERM (or Ctrl-C) stops accepting, finishes the studies
    received and exits; a second one stops at once.

    \b
    Example:
      segengine listen --aet SEGENGINE --port 11112 --allow-aet ORTHANC --dest ORTHANC@pacs:4242 --out results
    """
    from segengine.engine.network.dimse import Peer, check_aet
    from segengine.engine.network.listener import Listener

    aet = check_aet(aet, "--aet")
    allow_aets = tuple(check_aet(a, "--allow-aet") for a in allow_aet)
    if not allow_aets and not allow_host:
        fail("give the callers to accept: --allow-aet AET and/or --allow-host HOST (nothing is accepted from others)")
    peer = Peer.parse(dest) if dest else None
    log = _line_logger()
    segmenter = _network_setup(out, backend, model, threads, threshold, max_memory, series, overwrite, log)
    node = Listener(segmenter, out, aet, host, port, allow_aets, tuple(allow_host), peer, quiet, on_release, workers,
                    spool, tries, timeout, log)
    try:
        node.start()
    except BaseException:
        segmenter.close()
        node.remove_own_spool()
        raise
    log(f"listening as {aet} on {host}:{node.port}; callers: {', '.join(allow_aets + tuple(allow_host))}; "
        f"SEG to {peer or 'OUT only'}; quiet {quiet:g} s; memory: model + {workers} x {max_memory:g} GB")
    try:
        _wait_for_signal()
        log("segengine: stopping: no new associations; finishing the studies received")
        node.drain()
    finally:
        node.remove_own_spool()
    log(node.summary.line())  # a clean stop exits 0: each bad study or unsent SEG had its own line


@main.command()
@click.argument("url")
@click.option("--study", "study_uid", default=None, metavar="UID", help="the StudyInstanceUID to segment")
@click.option("--query", multiple=True, metavar="KEY=VALUE",
              help="QIDO-RS filter (e.g. PatientID=P001, StudyDate=20240101-); repeatable: every match")
@click.option("--watch", is_flag=True, help="keep polling for new studies (matching --query) until SIGTERM")
@click.option("--interval", type=FiniteFloatRange(0.1, 86400), default=10.0, show_default=True,
              help="with --watch: seconds between polls")
@click.option("--netrc", "netrc_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="credentials from this netrc-style file (machine HOST login USER password SECRET)")
@network_job_options
@user_errors
def pull(url, study_uid, query, watch, interval, netrc_file, out, backend, model, threads, threshold, max_memory,
         series, overwrite, spool, tries, timeout):
    """Fetch a study from a DICOMweb server (WADO-RS), segment it, store the SEG back (STOW-RS).

    \b
    Credentials: $SEGENGINE_DICOMWEB_TOKEN, or $SEGENGINE_DICOMWEB_USER and
    $SEGENGINE_DICOMWEB_PASSWORD, or --netrc FILE; never on the command line.

    \b
    Examples:
      segengine pull http://pacs:8042/dicom-web --study 1.2.3.4 --out results
      segengine pull http://pacs:8042/dicom-web --query ModalitiesInStudy=MR --watch --out results
    """
    from segengine.engine.network.dicomweb import DicomWeb, Puller, check_url, parse_query
    from segengine.engine.network.study_job import check_uid

    check_url(url)
    filters = parse_query(query)
    if study_uid is not None:
        study_uid = check_uid(study_uid)
        if query or watch:
            fail("give --study UID, or --query/--watch, not both")
    elif not query and not watch:
        fail("give --study UID, --query KEY=VALUE or --watch")
    log = _line_logger()
    web = DicomWeb(url, netrc_file, tries, timeout, log)
    # one search before the model loads: a wrong URL, bad credentials or an unknown study is one line at once
    uids = list(web.studies({"StudyInstanceUID": study_uid} if study_uid else filters))
    if study_uid and study_uid not in uids:
        fail(f"{url}: no study {study_uid}", 1)
    segmenter = _network_setup(out, backend, model, threads, threshold, max_memory, series, overwrite, log)
    puller = Puller(web, segmenter, out, spool, log)
    try:
        if watch:
            import threading

            stop = threading.Event()
            worker = threading.Thread(target=puller.watch, args=(filters, interval, stop, overwrite), daemon=True)
            worker.start()
            _wait_for_signal()
            log("segengine: stopping after the study in hand")
            stop.set()
            worker.join()
        else:
            for uid in ([study_uid] if study_uid else uids):
                puller.one(uid)
            if not uids:
                log(f"segengine: no study matches {' '.join(query)}")
    finally:
        puller.close()
        segmenter.close()
    log(f"studies: done {puller.done}, failed {puller.failed}")
    sys.exit(1 if puller.failed else 0)


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
@click.option("--data", "data_root", required=True, type=click.Path(path_type=Path),
              help="ground truth: a folder of patients, or an nnU-Net dataset folder / imagesTs / labelsTs (its "
                   "labelsTs/<case>.nii.gz are the truth)")
@click.option("--pred", "pred_root", type=click.Path(path_type=Path),
              help="predicted masks: PRED/<patient>/<patient>_<n>_mask.tif, or NIfTI predictions PRED/<case>.nii.gz "
                   "(nnUNetv2_predict's output, or run's for nnU-Net input) matched by case name")
@model_option("score this model .pt (its card beside it); without --pred and --ensemble: the shipped model "
              "(a bare --model, the older spelling, also means it)", bare_ok=True)
@click.option("--protocol", type=click.Choice(["reference", "native"]), default="native", show_default=True,
              help="reference: course preprocessing, 256x256 grid, no first/last slice; native: every original slice")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="auto", show_default=True,
              help="with --model: as for run (" + AUTO_HELP.split(";")[0] + "; ...); torch scores the PyTorch weights")
@patients_file_option()
@click.option("--out", "out_dir", type=OutPath(path_type=Path), help="write metrics.json and dsc.png here (and "
              "nnU-Net's summary.json when --pred holds NIfTI predictions)")
@threads_option
@threshold_option("with --model: " + THRESHOLD_HELP)
@click.option("--no-postprocess", is_flag=True, help="with --model: keep every component")
@click.option("--fill-holes", is_flag=True, help="with --model: fill holes slice by slice")
@accurate_mode_options
@max_memory_option
@user_errors
def evaluate(data_root, pred_root, model, protocol, backend, patients_file, out_dir, threads, threshold, no_postprocess,
             fill_holes, ensemble, tta, max_memory):
    """Score predicted masks (--pred) or a model (--model PATH; default: the shipped one) per patient:
    DSC, HD95, precision, recall.

    \b
    Examples:
      segengine evaluate --data kaggle_3m --pred results --patients-file val.txt --out eval
      segengine evaluate --data Dataset501_LGG --pred nnunet_out --out eval   (+ eval/summary.json)
      segengine evaluate --data kaggle_3m --patients-file val.txt --protocol reference   (the shipped model)
      segengine evaluate --model runs/a1/model/a1.pt --data kaggle_3m --patients-file val.txt
      segengine evaluate --ensemble --tta --data kaggle_3m --patients-file val.txt
    """
    from segengine.engine.evaluation.evaluate import format_table, score_predictions, write_result
    from segengine.engine.readers.volume import SliceLimits

    limits = SliceLimits(max_memory=_gb(max_memory))

    model_given = given(click.get_current_context(), "model")  # a bare --model is None, the shipped model
    if pred_root is not None and (model_given or ensemble is not None):
        fail("give --pred PRED_ROOT or a model (--model PATH / --ensemble [MANIFEST]), not both")
    if model_given and ensemble is not None:
        fail("give --model or --ensemble, not both")
    ensemble = _ensemble_arg(model, ensemble)
    if pred_root is not None and tta:
        fail("--tta averages a model's predictions: use it with --model or --ensemble, not --pred")
    _check_paths(folders={"--out": out_dir})
    if out_dir is not None:  # the two files written into it: regular or absent, as every output file
        _check_paths(files={"--out": out_dir / "metrics.json"})
        _check_paths(files={"--out": out_dir / "dsc.png"})
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
        click.echo(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'dsc.png'}"
                   + (f" and {out_dir / 'summary.json'} (nnU-Net's format)" if "nnunet_summary" in result else ""))


# --------------------------------------------------------------------------- validate
@main.command()
@click.option("--data", "data_root", required=True, type=click.Path(path_type=Path),
              help="ground truth: a folder of patients (Kaggle layout, NIfTI or DICOM)")
@patients_file_option("only these patients (default: every patient under --data)")
@click.option("--backend", required=True, type=click.Choice(BACKEND_NAMES[1:]), help="the backend under test")
@click.option("--against", type=click.Choice(BACKEND_NAMES[1:]), default="torch", show_default=True,
              help="the backend it must segment like (a verdict is recorded only against torch)")
@model_option()
@threads_option
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write every figure here")
@click.option("--record", is_flag=True, help="store the verdict in the export's sidecar (what --backend auto trusts)")
@click.option("--batch-size", type=click.IntRange(1, 512), default=32, show_default=True,
              help="as `run`'s: a patient's slices are split into equal batches of at most this")
@max_memory_option
@user_errors
def validate(data_root, patients_file, backend, against, model, threads, json_path, record, batch_size, max_memory):
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
                     limits=SliceLimits(max_memory=_gb(max_memory)), batch_size=batch_size)
    click.echo(verdict.format_result(result))
    if json_path:
        write_json_atomic(json_path, result)
    if record:
        click.echo(f"recorded verdict in {verdict.record(spec, result).name}")
    sys.exit(0 if result["passed"] else 1)


# --------------------------------------------------------------------------- export
@main.command()
@model_option()
@click.option("--kinds", default=",".join(EXPORT_BACKENDS), show_default=True, metavar="BACKEND,...",
              help="comma list of the backends to export for: " + ", ".join(EXPORT_BACKENDS)
                   + " (the older names " + ", ".join(EXPORT_BACKENDS.values()) + " still work)")
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
    """Export for each backend, each export verified: onnxruntime (ONNX fp32; openvino runs it too),
    onnxruntime-int8 (static QDQ; and openvino-int8), onnxruntime-fp16 (ONNX float16), tensorrt (an FP16 engine).

    \b
    Files land beside the weights (<name>.onnx, <name>.int8.onnx, <name>.fp16.onnx, <name>.fp16.plan),
    each with a sidecar <file>.json naming the weights' SHA-256 it came from.
    With --triton REPO, the current exports are laid out as a Triton Inference Server
    model repository (REPO/<model>/config.pbtxt, REPO/<model>/1/model.onnx|model.plan),
    each config checked against Triton's ModelConfig message.

    \b
    Examples:
      segengine export --data kaggle_3m --train-list ../shared/data/lgg/splits/train.txt
      segengine export --kinds onnxruntime,onnxruntime-int8 --data kaggle_3m --train-list train.txt
      segengine export --triton triton_repo --bench-json docs/bench.json
    """
    from segengine.engine.core.errors import ExportError
    from segengine.export.api import KIND_BACKENDS, export_kind, export_model

    try:  # named as the backends or by the older kind names; refused before any work
        wanted = tuple(dict.fromkeys(export_kind(k.strip()) for k in kinds.split(",") if k.strip()))
    except ExportError as exc:
        fail(f"--kinds {kinds!r}: {exc}")
    if not wanted:
        fail(f"--kinds {kinds!r} names no backend (known: {', '.join(KIND_BACKENDS.values())})")
    spec = _load_spec(model)
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
                               calibration_slices_n=calibration_slices, opset=opset, log=_echo_as_backends)
    except ExportError as exc:
        fail(str(exc), 1)
    for kind, res in results.items():
        click.echo(f"{KIND_BACKENDS[kind]:>16}: " + (f"skipped ({res['skipped']})" if "skipped" in res else "ok"))


def _echo_as_backends(line: str) -> None:
    """export_model's progress, each line's leading export kind (``onnx-int8: wrote ...``) said as its backend."""
    from segengine.export.api import KIND_BACKENDS

    kind, sep, rest = str(line).partition(": ")
    click.echo(f"{KIND_BACKENDS[kind]}{sep}{rest}" if sep and kind in KIND_BACKENDS else line)


# --------------------------------------------------------------------------- bench
@main.command()
@click.option("--data", "data_root", type=click.Path(path_type=Path), help="patients to time (default: synthetic slices, no end-to-end)")
@click.option("--num-patients", "n_patients", type=click.IntRange(1, 1000), default=10, show_default=True,
              metavar="N", help="how many patients under --data are timed end to end (the first also warms up)")
@click.option("--patients", "patients_count", default=None, hidden=True, metavar="N",
              help="deprecated spelling of --num-patients (--patients is a folder of patients in every other command)")
@click.option("--backends", default="torch,onnxruntime,onnxruntime-int8,openvino,openvino-int8,tensorrt", show_default=True,
              help="comma list: torch and every backend auto may pick (those not usable here are listed with the "
                   "reason, not timed); onnxruntime-fp16, a CPU emulation of the FP16 numerics, is timed only by name")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="comma list of slices per inference call")
@threads_option
@click.option("--warmup", type=click.IntRange(0, 1000), default=3, show_default=True, help="untimed calls first")
@click.option("--iterations", type=click.IntRange(1, 100000), default=20, show_default=True, help="timed calls per figure")
@click.option("--no-reference", is_flag=True, help="skip timing the course's reference pipeline")
@model_option()
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write every figure here (with the CPU "
              "and the model's SHA-256)")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="write the latency/throughput chart here, "
              "a PNG under exactly this name (no .png is added)")
@accurate_mode_options
@user_errors
def bench(data_root, n_patients, patients_count, backends, batch_sizes, threads, warmup, iterations, no_reference, model, json_path, plot_path,
          ensemble, tta):
    """Latency and throughput per backend and batch size, end to end per patient, vs the reference.

    \b
    Example:
      segengine bench --data kaggle_3m --num-patients 10 --json bench.json --plot bench.png
      segengine bench --data kaggle_3m --ensemble --tta --backends torch     (accurate mode's cost)
    """
    from segengine.bench.bench import format_table, plot, run_bench

    n_patients = _bench_patient_count(n_patients, patients_count)

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


def _bench_patient_count(n_patients: int, patients_count: str | None) -> int:
    """bench's count is --num-patients N; the older ``--patients N`` still works, with a one-line
    deprecation on stderr (recorded commands keep running); ``--patients ROOT``, the folder it means
    in every other command, is refused with a hint at --data."""
    if patients_count is None:
        return n_patients
    if given(click.get_current_context(), "n_patients"):
        fail("give --num-patients N, not also --patients (its deprecated spelling)")
    if not patients_count.strip().isdigit():
        fail(f"bench --patients {patients_count!r}: bench times the patients under --data ROOT; how many is "
             "--num-patients N")
    try:
        count = click.IntRange(1, 1000).convert(patients_count, None, None)
    except click.BadParameter as exc:
        fail(f"--num-patients: {exc.message}")
    click.echo(f"segengine: warning: bench --patients N is deprecated, use --num-patients {count} "
               "(--patients is a folder of patients elsewhere)", err=True)
    return count


# --------------------------------------------------------------------------- train
# train and cv: Click commands in train/cli.py (click only: --help stays instant) that hand the arguments to
# train/train.py's and train/cv.py's parsers, the ones `python -m segengine.train.train` uses
from segengine.train.cli import cv as _cv_command, train as _train_command  # noqa: E402

main.add_command(_train_command)
main.add_command(_cv_command)


if __name__ == "__main__":  # pragma: no cover
    main()
