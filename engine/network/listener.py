"""``segengine listen``: a DICOM storage SCP that segments each study it receives.

Instances are written to a spool folder as they arrive (one folder per study, named by its
StudyInstanceUID, files named by SOPInstanceUID: a re-sent instance replaces itself), never
kept in memory. A study is complete when no instance of it arrived for ``quiet`` seconds, or,
with ``on_release``, when the association that sent it is released. Complete studies go to
``workers`` threads that segment them with ``run``'s job (``study_job``), so memory is bounded
by the model plus ``workers`` times --max-memory; each SEG is then C-STOREd to ``dest``. Callers
are checked twice: by host before a byte is read (``allow_hosts``) and by calling AE title at
association negotiation (``allow_aets``). A bad study, a lost connection, a full spool or OUT
disk is one line and the node goes on; ``drain()`` (SIGTERM) stops accepting, finishes the
studies in flight and returns.
"""
from __future__ import annotations

import errno
import itertools
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from segengine.engine.core.errors import DataError, OutputError
from segengine.engine.network.dimse import Peer, quiet_pynetdicom, store_files
from segengine.engine.network.errors import NetworkError
from segengine.engine.network.study_job import StudySegmenter, check_uid, write_index

STATUS_OK = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
DISK_FULL_RETRY_S = 30.0  # a study that met a full OUT disk is tried again after this long (while not stopping)


@dataclass
class Collecting:
    """A study being received."""

    uid: str
    folder: Path  # SPOOL/<n>/<uid>
    last: float  # monotonic time of the last instance
    callers: set[str] = field(default_factory=set)
    associations: set[int] = field(default_factory=set)
    instances: int = 0
    pending: int = 0  # instances being written now
    released: bool = False  # on_release: its association was released
    refused: int = 0  # instances refused (spool full)


@dataclass
class NodeSummary:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sent: int = 0
    not_sent: int = 0
    refused_callers: int = 0

    def line(self) -> str:
        return (f"studies: done {len(self.done)}, failed {len(self.failed)}, skipped {len(self.skipped)}; "
                f"SEG sent {self.sent}, not sent {self.not_sent}; callers refused {self.refused_callers}")


def _host_allowed(client: str, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    client = client.removeprefix("::ffff:")
    for entry in allowed:
        try:
            addresses = {a[4][0] for a in socket.getaddrinfo(entry, None)}
        except OSError:
            addresses = {entry}
        if client in addresses:
            return True
    return False


class Listener:
    def __init__(self, segmenter: StudySegmenter, out: Path, aet: str = "SEGENGINE", host: str = "127.0.0.1",
                 port: int = 11112, allow_aets: tuple[str, ...] = (), allow_hosts: tuple[str, ...] = (),
                 dest: Peer | None = None, quiet: float = 5.0, on_release: bool = False, workers: int = 1,
                 spool: Path | None = None, tries: int = 3, timeout: float = 10.0,
                 log: Callable[[str], None] = print):
        self.segmenter, self.out, self.aet, self.host, self.port = segmenter, Path(out), aet, host, port
        self.allow_aets, self.allow_hosts, self.dest = tuple(allow_aets), tuple(allow_hosts), dest
        self.quiet, self.on_release, self.workers, self.tries, self.timeout = quiet, on_release, workers, tries, timeout
        self.log = log
        self._own_spool = spool is None
        self.spool = Path(tempfile.mkdtemp(prefix="segengine-spool-")) if spool is None else Path(spool)
        self._batch = itertools.count(1)
        self._lock = threading.Lock()
        self._studies: dict[str, Collecting] = {}
        self._ready: queue.Queue = queue.Queue()
        self._busy = 0  # studies handed to workers and not finished
        self._accepting = True
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.summary = NodeSummary()
        self.disk_full_retry_s = DISK_FULL_RETRY_S
        self.ae = None
        self.server = None

    # ------------------------------------------------------------ start / stop
    def start(self) -> "Listener":
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
        from pynetdicom.transport import ThreadedAssociationServer

        quiet_pynetdicom()
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.spool}: spool folder not writable ({exc.strerror or exc})") from None
        ae = AE(ae_title=self.aet)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = max(self.timeout, 1.0)
        ae.maximum_associations = 32
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.allow_aets:
            ae.require_calling_aet = list(self.allow_aets)
        listener = self

        class GuardedServer(ThreadedAssociationServer):
            daemon_threads = True

            def verify_request(self, request, client_address) -> bool:  # socketserver: before any byte is read
                if _host_allowed(str(client_address[0]), listener.allow_hosts):
                    return True
                listener._refused(f"host {client_address[0]} is not on the allow-list (--allow-host)")
                return False

        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_RELEASED, self._on_released), (evt.EVT_ABORTED, self._on_aborted)]
        try:
            server = ae.make_server((self.host, self.port), evt_handlers=handlers, server_class=GuardedServer)
        except OSError as exc:
            if self._own_spool:
                shutil.rmtree(self.spool, ignore_errors=True)
            raise OutputError(f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc})") from None
        ae._servers.append(server)  # as AE.start_server does, so AE.shutdown() stops it
        self.ae, self.server = ae, server
        self.port = server.server_address[1]
        self._resume()
        self._spawn(server.serve_forever, "dicom-server")
        self._spawn(self._schedule, "study-scheduler")
        for i in range(self.workers):
            self._spawn(self._work, f"study-worker-{i}")
        return self

    def _resume(self) -> None:
        """Studies a stopped or killed listener left in --spool (received, not finished): segmented first."""
        batches = sorted(d for d in self.spool.iterdir() if d.is_dir() and len(d.name) == 6 and d.name.isdigit()) if not self._own_spool \
            else []
        if batches:
            self._batch = itertools.count(int(batches[-1].name) + 1)
        for batch in batches:
            for folder in sorted(d for d in batch.iterdir() if d.is_dir()):
                try:
                    uid = check_uid(folder.name)
                except DataError:
                    continue
                for part in folder.glob(".*.part"):  # an instance cut by the kill: never acknowledged
                    part.unlink(missing_ok=True)
                n = sum(1 for f in folder.iterdir() if f.suffix == ".dcm" and not f.name.startswith("."))
                self.log(f"segengine: {uid}: {n} instances left in {self.spool} by an earlier listener; segmenting them")
                with self._lock:
                    self._busy += 1
                self._ready.put(Collecting(uid, folder, time.monotonic(), {"earlier listener"}, instances=n))

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def drain(self, poll: float = 0.1) -> None:
        """Stop accepting associations; finish every study received (after its quiet period) and in flight."""
        with self._lock:
            self._accepting = False
        if self.ae is not None:
            self.ae.shutdown()  # closes the listening socket and aborts associations still open
        while True:
            with self._lock:
                idle = not self._studies and self._busy == 0 and self._ready.empty()
            if idle:
                break
            time.sleep(poll)
        self._stop.set()
        for _ in range(self.workers):
            self._ready.put(None)
        for t in self._threads:
            if t.name.startswith("study-"):
                t.join(timeout=30)
        if self.summary.done:
            write_index(self.out, self.log)
        self.segmenter.close()
        self.remove_own_spool()

    def remove_own_spool(self) -> None:
        """The temporary spool (no --spool) goes with the process, even when it is stopped hard."""
        if self._own_spool:
            shutil.rmtree(self.spool, ignore_errors=True)

    # ------------------------------------------------------------ events (association threads)
    def _refused(self, why: str) -> None:
        with self._lock:
            self.summary.refused_callers += 1
        self.log(f"segengine: refused a caller: {why}")

    def _on_rejected(self, event) -> None:
        rq = event.assoc.requestor
        self._refused(f"{rq.ae_title}@{rq.address} is not on the allow-list (--allow-aet)")

    def _on_released(self, event) -> None:
        if not self.on_release:
            return
        with self._lock:
            for rec in self._studies.values():
                if id(event.assoc) in rec.associations:
                    rec.released = True

    def _on_aborted(self, event) -> None:
        rq = event.assoc.requestor
        with self._lock:
            uids = [r.uid for r in self._studies.values() if id(event.assoc) in r.associations]
        if uids:
            self.log(f"segengine: {rq.ae_title}@{rq.address} disconnected mid-transfer of {', '.join(uids)}; "
                     f"what arrived is kept (a re-send completes it)")

    def _on_store(self, event) -> int:
        rq = event.assoc.requestor
        caller = f"{rq.ae_title}@{rq.address}"
        try:
            ds = event.dataset
            uid = check_uid(ds.get("StudyInstanceUID"))
            sop = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            data = event.encoded_dataset(include_meta=True)
        except DataError as exc:
            self.log(f"segengine: refused an instance from {caller}: {exc}")
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:  # noqa: BLE001 - an undecodable dataset from the network
            self.log(f"segengine: refused an instance from {caller}: cannot decode it ({type(exc).__name__})")
            return STATUS_CANNOT_UNDERSTAND
        with self._lock:
            if not self._accepting:
                return STATUS_OUT_OF_RESOURCES
            rec = self._studies.get(uid)
            if rec is None:
                rec = Collecting(uid, self.spool / f"{next(self._batch):06d}" / uid, time.monotonic())
                self._studies[uid] = rec
            rec.pending += 1
            rec.callers.add(caller)
            rec.associations.add(id(event.assoc))
        ok = False
        try:
            self._write(rec.folder, sop, data)
            ok = True
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
            with self._lock:
                first = rec.refused == 0
                rec.refused += 1
            if first:
                self.log(f"segengine: {uid}: {'spool disk full' if full else exc.strerror or exc} "
                         f"({self.spool}); refusing its instances (status A700) until there is room")
            return STATUS_OUT_OF_RESOURCES
        finally:
            with self._lock:
                rec.pending -= 1
                rec.last = time.monotonic()
                rec.instances += ok
        return STATUS_OK

    @staticmethod
    def _write(folder: Path, sop: str, data: bytes) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{sop}.dcm"
        tmp = folder / f".{sop}.part"  # dot files are never read as part of a study
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------ complete studies (scheduler, workers)
    def _schedule(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                done = [r for r in self._studies.values()
                        if r.pending == 0 and (r.released or now - r.last >= self.quiet)]
                for rec in done:
                    del self._studies[rec.uid]
                    self._busy += 1
            for rec in done:
                self._ready.put(rec)
            self._stop.wait(min(0.05, self.quiet / 4) if self.quiet > 0 else 0.05)

    def _work(self) -> None:
        while True:
            rec = self._ready.get()
            if rec is None:
                return
            later = False
            try:
                later = self._finish(rec)
            except Exception as exc:  # noqa: BLE001 - never lose the worker
                self.log(f"segengine: {rec.uid}: unexpected {type(exc).__name__}: {str(exc)[:300]}")
            finally:
                if later:  # still busy: back in the queue after the pause, its files kept
                    timer = threading.Timer(self.disk_full_retry_s, self._ready.put, args=(rec,))
                    timer.daemon = True
                    timer.start()
                else:
                    shutil.rmtree(rec.folder.parent, ignore_errors=True)
                    with self._lock:
                        self._busy -= 1

    def _finish(self, rec: Collecting) -> bool:
        """Segment, send, log; True when the study should be tried again later (OUT's disk was full)."""
        if rec.instances == 0:
            self.log(f"segengine: {rec.uid}: no instance stored ({rec.refused} refused); nothing segmented")
            with self._lock:
                self.summary.failed.append(rec.uid)
            return False
        outcome = self.segmenter.segment(rec.folder)
        if outcome.status == "full":
            with self._lock:
                stopping = not self._accepting
            if not stopping:
                self.log(f"segengine: {outcome.line}; the study waits in the spool, next try in "
                         f"{self.disk_full_retry_s:g} s")
                return True
            self.log(f"segengine: failed {outcome.line}; stopping, so the study is dropped: send it again")
        if not outcome.ok:
            with self._lock:
                (self.summary.skipped if outcome.status in ("exists", "busy") else self.summary.failed).append(rec.uid)
            if outcome.status != "full":
                self.log(f"segengine: {'skipped' if outcome.status != 'failed' else 'failed'} {outcome.line}")
            return False
        with self._lock:
            self.summary.done.append(rec.uid)
        line = f"{outcome.line} from {', '.join(sorted(rec.callers))}"
        failure = None
        if self.dest is not None and outcome.seg is None:
            line += "; no SEG was written, nothing sent"
        elif self.dest is not None:
            try:
                tries = store_files(self.dest, [outcome.seg], self.aet, self.tries, self.timeout,
                                    log=self.log, what=f"{rec.uid}: SEG")
                line += f"; SEG sent to {self.dest}" + (f" (try {tries})" if tries > 1 else "")
            except NetworkError as exc:
                failure = f"segengine: {exc}; results kept in {outcome.seg.parent}"
        with self._lock:
            if self.dest is not None:
                if line.endswith("nothing sent") or failure:
                    self.summary.not_sent += 1
                else:
                    self.summary.sent += 1
        self.log(line)
        if failure:
            self.log(failure)
        if self._ready.empty():  # the review page costs a read of every report: not while studies wait
            write_index(self.out, self.log)
        return False
