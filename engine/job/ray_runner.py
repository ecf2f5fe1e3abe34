"""`segengine run --patients ROOT --out OUT --ray [ADDRESS]`: an archive spread over a Ray cluster.

Each worker is a long-lived Ray actor that loads the model once and segments one patient
per call with the same code as a local run (``job.patient_job.process_patient``: patient id, lock,
atomic write into ``OUT/<patient>/``). The driver hands patients
out one at a time (pull model), so a slow node never hoards work. A worker that dies
mid-patient (node lost, OOM, killed) is replaced and its patient is put back at the front
of the queue for the next free worker, up to ``max_attempts`` tries. Patients whose
results already exist in OUT are skipped, so re-running a job resumes it.

``--backend auto`` is resolved once, here in the driver, as a local run with the same ``--threads``
resolves it (no ``--threads``: by the figures for the whole machine), and each worker is handed
that name: workers never probe, so the same command gives the same backend, and the same masks,
with or without ``--ray`` and with any number of workers; report.json names it.

ROOT, OUT and a non-default ``--model`` must be reachable under the same paths from every
node (a shared filesystem), and every node needs segengine installed.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from segengine.engine.core.errors import BackendUnavailable, DataError, ForeignEntryError, NotAFolderError
from segengine.engine.core.fsguard import check_out_dir
from segengine.engine.core.runtime import BLAS_ENV_VARS, THREAD_ENV_VARS
from segengine.engine.inference import registry
from segengine.engine.inference.ensemble import load_plan
from segengine.engine.job.batch import JobSummary, select_batch
from segengine.engine.job.options import RunOptions
from segengine.engine.job.patient_job import RunSetup, process_patient
from segengine.engine.outputs.results_dir import has_result, tidy_out
from segengine.engine.postprocessing.postprocess import PostprocessConfig
from segengine.engine.readers.registry import unique_patient_ids
from segengine.engine.readers.volume import DEFAULT_LIMITS, SliceLimits

DEFAULT_MAX_ATTEMPTS = 3


WORKER_START_TIMEOUT_S = 600  # a worker actor loads the model; more than this and it is not being scheduled


def check_workers(workers: int, threads: int, cpus: int) -> None:
    """Refuse more worker CPUs than the cluster has: Ray would wait forever to place the extra actors."""
    if workers * threads > cpus:
        fit = cpus // threads
        hint = f"use --workers {fit} or fewer" if fit else f"use --threads {cpus} or fewer"
        raise BackendUnavailable(f"--workers {workers} x --threads {threads} needs {workers * threads} CPUs, but the "
                                 f"Ray cluster has {cpus}; {hint}")


def worker_gpus(name: str, workers: int, cluster_gpus: float) -> float:
    """The GPU share of each worker actor: 0 for a CPU backend; for a GPU backend the cluster's GPUs
    split among the workers (at most one each). Ray hides the GPUs from an actor that asks for none."""
    if not registry.runs_on_gpu(name):
        return 0
    if cluster_gpus <= 0 and name == "torch":  # the reference runs where it is placed (here: CPUs only)
        return 0
    if cluster_gpus <= 0:
        raise BackendUnavailable(f"backend {name} runs on a GPU but the Ray cluster has none; "
                                 "pick a CPU backend with --backend")
    return min(1.0, cluster_gpus / workers)


def _id_or_name(folder: Path) -> str:
    """The patient's id, or its folder's name when the input is gone or ill by now."""
    from segengine.engine.readers.registry import patient_id_of

    try:
        return patient_id_of(folder)
    except (DataError, OSError):
        return folder.name


class SegmentWorker:
    """Ray actor body: one backend session for the actor's lifetime, one patient per call."""

    def __init__(self, model: str | None, backend_name: str, threads: int, post: dict, batch_size: int,
                 overwrite: bool, gif: bool, limits: dict | None = None, ensemble: bool | str | None = None,
                 tta: bool = False):
        if backend_name == "auto":  # the driver resolves auto once for the whole run (run_patients_ray)
            raise BackendUnavailable("a Ray worker is given the run's resolved backend, never 'auto'")
        t = time.perf_counter()
        self.spec = load_plan(model, ensemble, tta)
        self.backend = registry.create(backend_name, self.spec, threads=threads).load()
        self.load_s = time.perf_counter() - t
        # limits: SliceLimits plus --series/--spacing/--save-probabilities
        self.setup = RunSetup(self.backend, backend_name, self.spec, PostprocessConfig(**post), batch_size, overwrite,
                              gif, RunOptions(**(limits or {})))

    def pid(self) -> int:
        return os.getpid()

    def process(self, folder: str, out: str) -> dict:
        """{"patient", "status": "done"|"skipped"|"busy"|"failed", "line"|"error"}; data errors are results."""
        from segengine.engine.core.errors import PatientBusyError, ResultsExistError
        from segengine.engine.job.batch import _summary_line, patient_error


        t0 = time.perf_counter()
        try:
            rep = process_patient(Path(folder), Path(out), self.setup)
        except ResultsExistError as exc:
            return {"patient": _id_or_name(Path(folder)), "status": "skipped", "error": str(exc)}
        except PatientBusyError as exc:
            return {"patient": _id_or_name(Path(folder)), "status": "busy", "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - any failure of one patient is its line; the batch goes on
            return {"patient": Path(folder).name, "status": "failed", "error": patient_error(exc)}
        return {"patient": rep["patient"], "status": "done", "line": _summary_line(rep, time.perf_counter() - t0),
                "pid": os.getpid(), "review": rep.get("review")}


def run_patients_ray(patients_root: Path, out: Path, backend_name: str, model: Path | None, address: str | None = None,
                     workers: int | None = None, threads: int | None = None, batch_size: int = 32, postprocess: bool = True,
                     fill_holes: bool = False, gif: bool = False, overwrite: bool = False,
                     max_attempts: int = DEFAULT_MAX_ATTEMPTS, echo: Callable[..., None] = print,
                     on_submit: Callable[[str, int], None] | None = None,
                     limits: SliceLimits = DEFAULT_LIMITS, ensemble: bool | Path | None = None,
                     tta: bool = False, threshold: float = 0.5, patients_file: str | None = None) -> JobSummary:
    """Segment every patient under ``patients_root`` on Ray; returns the job summary.

    ``address`` None starts a local Ray instance (or reuses one already initialised in this
    process); otherwise it is passed to ``ray.init`` ("auto", "ray://head:10001", ...).
    ``on_submit(patient, worker_pid)`` is called as each patient is handed to a worker.
    ``threads``: intra-op threads of each worker (None: 1); ``auto`` is resolved at ``threads`` as
    given, as a local run resolves it, so both pick the same backend.
    """
    try:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError
    except ImportError:
        raise BackendUnavailable("--ray needs Ray: pip install 'segengine[scale]'") from None
    from tqdm import tqdm

    if not patients_root.is_dir():
        raise NotAFolderError(f"{patients_root}: no such folder")
    check_out_dir(out, [patients_root])
    for note in tidy_out(out):
        echo(f"segengine: {note}")
    spec = load_plan(model, ensemble, tta)
    name = registry.resolve(backend_name, spec, threads)  # the run's one choice, as a local run's with these --threads
    threads = threads or 1
    # a bad patient's id is None: its worker reports it as failed; two patients sharing an id are refused
    folders = select_batch(patients_root, patients_file)
    ids = unique_patient_ids(folders)
    summary = JobSummary()
    todo = []
    for f, pid in ids.items():
        try:
            exists = pid is not None and has_result(out, pid)
        except ForeignEntryError:  # a link planted at OUT/<id>: its worker reports it as this patient's failure
            exists = False
        if exists and not overwrite:
            summary.skipped.append(pid)
        else:
            todo.append(f)
    if not todo:
        summary.echo(echo)
        return summary

    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": address} if address else {"num_cpus": os.cpu_count(), "object_store_memory": 200 * 2**20}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError...
            raise BackendUnavailable(f"cannot start or reach Ray ({address or 'local'}): "
                                     f"{str(exc).splitlines()[0][:200]}") from None
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_workers = max(1, min(workers or cpus // max(threads, 1), len(todo)))
        check_workers(n_workers, threads, cpus)
        gpus = worker_gpus(name, n_workers, float(ray.cluster_resources().get("GPU", 0)))
        summary.workers = n_workers
        post = asdict(PostprocessConfig.from_card(spec.card, largest_component=postprocess, fill_holes_2d=fill_holes,
                                                  threshold=threshold))
        model_arg = None if model is None else str(Path(model).resolve())
        ensemble_arg = ensemble if ensemble in (None, True, False) else str(Path(ensemble).resolve())
        actor_cls = ray.remote(SegmentWorker).options(
            num_cpus=threads, num_gpus=gpus, max_restarts=0, runtime_env={"env_vars": {**{var: str(threads) for var in THREAD_ENV_VARS},
                                                         **{var: "1" for var in BLAS_ENV_VARS}}})

        def new_worker():
            actor = actor_cls.remote(model_arg, name, threads, post, batch_size, overwrite, gif, asdict(limits),
                                     ensemble_arg, tta)
            try:
                return actor, ray.get(actor.pid.remote(), timeout=WORKER_START_TIMEOUT_S)
            except GetTimeoutError:
                ray.kill(actor)
                raise BackendUnavailable(f"a Ray worker did not start within {WORKER_START_TIMEOUT_S} s (not enough "
                                         f"free CPUs for {n_workers} workers x {threads} threads?); try fewer --workers"
                                         ) from None

        try:
            idle = [new_worker() for _ in range(n_workers)]
        except RayActorError as exc:
            raise BackendUnavailable(f"Ray workers could not load the model: {str(exc).splitlines()[0][:200]}") from None
        pending = deque(todo)
        attempts: Counter[str] = Counter()
        inflight = {}
        t_start = time.perf_counter()
        bar = tqdm(total=len(folders), initial=len(summary.skipped), desc="patients", unit="patient", file=sys.stderr,
                   disable=None)
        while pending or inflight:
            while idle and pending:
                (actor, pid), folder = idle.pop(), pending.popleft()
                attempts[folder.name] += 1
                inflight[actor.process.remote(str(folder.resolve()), str(out.resolve()))] = (actor, pid, folder)
                if on_submit:
                    on_submit(folder.name, pid)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor, pid, folder = inflight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError:
                summary.workers_lost += 1
                if attempts[folder.name] < max_attempts:
                    summary.retried.append(folder.name)
                    pending.appendleft(folder)
                    bar.write(f"segengine: worker {pid} died on {folder.name}; retrying it on another worker")
                else:
                    summary.failed.append((folder.name, f"worker died on each of {attempts[folder.name]} attempts"))
                    bar.update(1)
                try:
                    idle.append(new_worker())
                except RayActorError:
                    bar.write("segengine: could not start a replacement worker")
                if not idle and not inflight and pending:
                    summary.failed.extend((f.name, "no Ray worker left") for f in pending)
                    pending.clear()
                continue
            idle.append((actor, pid))
            if result["status"] == "done":
                summary.done.append(result["patient"])
                summary.note_review(result)
                bar.write(result["line"])
            elif result["status"] == "skipped":
                summary.skipped.append(result["patient"])
            elif result["status"] == "busy":
                summary.busy.append(result["patient"])
                bar.write(f"segengine: {result['error']}")
            else:
                summary.failed.append((result["patient"], result["error"]))
                bar.write(f"segengine: failed {result['patient']}: {result['error']}")
            bar.update(1)
        bar.close()
        summary.elapsed_s = time.perf_counter() - t_start
        for actor, _ in idle:
            ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()
    for note in tidy_out(out):  # what workers killed while writing left; restores a result set aside
        echo(f"segengine: {note}")
    summary.echo(echo)
    return summary
