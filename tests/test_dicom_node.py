"""segengine as a DICOM node, against a real Orthanc started here (Debian's orthanc, orthanc-dicomweb, dcmtk).

The study is a real Kaggle patient written as DICOM (tests/dicom_study.py) and sent to Orthanc
with dcmtk's storescu. ``listen`` gets it from Orthanc (C-STORE to the DicomModalities entry
naming it) and stores the SEG back; ``pull`` fetches it by WADO-RS and stores the SEG by STOW-RS.
Each SEG is read back through Orthanc's REST API: in the same study, referencing the FLAIR
instances, and its mask equal to `segengine run`'s on the same files. Under CI=true a missing
Orthanc, plugin or storescu fails these tests; elsewhere they skip and say what to install.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import VAL_PATIENTS, running_in_ci

pytestmark = [pytest.mark.network, pytest.mark.slow]

EXE = Path(sys.executable).with_name("segengine")
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
USER, PASSWORD = "segengine-test", "not-a-secret"
QUIET = 1.0
WAIT_S = 60  # upper bound for anything to appear (a loaded CI machine), never a speed check


# ---------------------------------------------------------------- tools and Orthanc
def _missing() -> str | None:
    if not shutil.which("Orthanc"):
        return "Orthanc not found (apt-get install orthanc orthanc-dicomweb dcmtk)"
    if _plugin() is None:
        return f"the Orthanc DICOMweb plugin not found in {', '.join(map(str, PLUGIN_DIRS))} (apt-get install orthanc-dicomweb)"
    if not shutil.which("storescu"):
        return "dcmtk's storescu not found (apt-get install dcmtk)"
    try:
        import dicomweb_client  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} not installed (pip install -e '.[network]')"
    return None


def _plugin() -> Path | None:
    for d in PLUGIN_DIRS:
        found = sorted(d.glob("libOrthancDicomWeb.so*")) if d.is_dir() else []
        if found:
            return found[0]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, folder: Path):
        self.folder = folder
        self.http, self.dicom, self.listener_port = _free_port(), _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "segengine-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "HttpsVerifyPeers": False,
            # only the declared modalities may store, each from its host: segengine's listener and storescu
            "DicomModalities": {"segengine": ["SEGENGINE", "127.0.0.1", self.listener_port],
                                "storescu": ["STORESCU", "127.0.0.1", 104]},
            "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True, "DicomCheckCalledAet": True,
            "Plugins": [str(_plugin())], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "SaveJobs": False, "StableAge": 60, "LimitFindResults": 0,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        self.log = open(folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen(["Orthanc", str(folder / "config.json")], cwd=folder, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                self.get("/system")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)

    def _request(self, method: str, path: str, **kw):
        import requests

        r = requests.request(method, self.url + path, auth=(USER, PASSWORD), timeout=30, **kw)
        r.raise_for_status()
        return r

    def get(self, path: str):
        return self._request("GET", path).json()

    def post(self, path: str, body) -> dict:
        return self._request("POST", path, data=json.dumps(body)).json()

    def study_id(self, study_uid: str) -> str | None:
        found = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        return found[0] if found else None

    def segs(self, study_uid: str) -> list[dict]:
        """The SEG instances of a study: [{ID, SOPInstanceUID, ...}]."""
        sid = self.study_id(study_uid)
        if sid is None:
            return []
        out = []
        for series in self.get(f"/studies/{sid}/series"):
            if series["MainDicomTags"].get("Modality") == "SEG":
                out += self.get(f"/series/{series['ID']}/instances")
        return out

    def instance_file(self, orthanc_id: str, dest: Path) -> Path:
        dest.write_bytes(self._request("GET", f"/instances/{orthanc_id}/file").content)
        return dest

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    why = _missing()
    if why:
        if running_in_ci():  # CI must exercise the network node, not report it skipped
            pytest.fail(f"{why}: CI installs it (.ci/setup)")
        pytest.skip(why)
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


def storescu(folder: Path, port: int, calling: str = "STORESCU", called: str = "SEGENGINE") -> subprocess.Popen:
    return subprocess.Popen(["storescu", "-aet", calling, "-aec", called, "+sd", "+r", "-nh", "127.0.0.1", str(port),
                             str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def send(folder: Path, port: int, **kw) -> subprocess.CompletedProcess:
    p = storescu(folder, port, **kw)
    out, _ = p.communicate(timeout=WAIT_S)
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(errors="replace"))


# ---------------------------------------------------------------- studies
@pytest.fixture(scope="module")
def study(kaggle_root, tmp_path_factory, orthanc):
    """The study of one real patient, in Orthanc (sent by storescu), with `segengine run`'s SEG of the same files."""
    from dicom_study import make_study

    root = tmp_path_factory.mktemp("node")
    made = make_study(kaggle_root / VAL_PATIENTS[0], root / "study")
    r = send(made.folder, orthanc.dicom, called="ORTHANC")
    assert r.returncode == 0, r.stdout
    proc = subprocess.run([str(EXE), "run", "--patient", str(made.folder), "--out", str(root / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    made.run_seg = root / "run" / "study" / "study_seg.dcm"
    made.uid = _study_uid(made)
    return made


def _study_uid(made) -> str:
    import pydicom

    return str(pydicom.dcmread(made.files["flair"][0], stop_before_pixels=True).StudyInstanceUID)


def clone(made, dest: Path, index: int, slices: range = range(8, 16), tag: str = "clone") -> tuple[Path, str]:
    """A new small study (FLAIR only, a few contiguous slices) of the same patient, every UID new."""
    import pydicom
    from pydicom.uid import generate_uid

    study_uid, series_uid = generate_uid(entropy_srcs=[tag, str(index), "study"]), generate_uid()
    dest.mkdir(parents=True)
    for k in slices:
        ds = pydicom.dcmread(made.files["flair"][k])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"{tag}-{index}"
        ds.save_as(dest / f"{k:03d}.dcm", enforce_file_format=True)
    return dest, study_uid


def assert_seg_matches_run(orthanc: Orthanc, made, seg_sop: str, tmp: Path) -> None:
    """The SEG in Orthanc: in the study, referencing its FLAIR series and images, mask equal to run's."""
    import pydicom

    segs = {s["MainDicomTags"]["SOPInstanceUID"]: s for s in orthanc.segs(made.uid)}
    assert seg_sop in segs, f"SEG {seg_sop} is not in study {made.uid} in Orthanc"
    path = orthanc.instance_file(segs[seg_sop]["ID"], tmp / f"{seg_sop}.dcm")
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == made.uid
    assert {s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence} == {made.series_uid["flair"]}
    shape = (len(made.slice_numbers),) + made.frame_to_kaggle(np.zeros(pydicom.dcmread(
        made.files["flair"][0]).pixel_array.shape)).shape
    got = made.seg_on_kaggle_slices(path, shape)  # raises if a frame references anything but a FLAIR image
    want = made.seg_on_kaggle_slices(made.run_seg, shape)
    assert want.sum() > 0
    assert np.array_equal(got, want)


# ---------------------------------------------------------------- a running segengine
class Node:
    """A segengine process whose output lines are collected as they come."""

    def __init__(self, *args: str, env: dict | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([str(EXE), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, *words: str, count: int = 1, timeout: float = WAIT_S) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = [ln for ln in list(self.lines) if all(w in ln for w in words)]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"segengine exited {self.proc.returncode}:\n" + "\n".join(self.lines))
            if time.monotonic() > deadline:
                raise AssertionError(f"no line with {words} after {timeout} s:\n" + "\n".join(self.lines))
            time.sleep(0.05)

    def wait(self) -> int:
        code = self.proc.wait(WAIT_S * 3)
        self._reader.join(5)
        return code

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(WAIT_S)
        self._reader.join(5)
        return code


def start_listener(out: Path, port: int, *args: str) -> Node:
    node = Node("listen", "--port", str(port), "--quiet", str(QUIET), "--out", str(out), *args)
    node.wait_line("listening as")
    return node


def _seg_sop(out: Path, uid: str) -> str:
    return json.loads((out / uid / "report.json").read_text())["dicom"]["seg"]["sop_instance_uid"]


@pytest.fixture(scope="module")
def listener(orthanc, tmp_path_factory):
    out = tmp_path_factory.mktemp("listen-out")
    node = start_listener(out, orthanc.listener_port, "--allow-aet", "ORTHANC", "--allow-aet", "STORESCU",
                          "--dest", f"ORTHANC@127.0.0.1:{orthanc.dicom}", "--workers", "2")
    node.out = out
    yield node
    assert node.stop() == 0, "\n".join(node.lines)


# ---------------------------------------------------------------- listen
def test_listen_segments_a_study_orthanc_sends(orthanc, study, listener, tmp_path):
    sid = orthanc.study_id(study.uid)
    job = orthanc.post("/modalities/segengine/store", {"Resources": [sid], "Synchronous": True})
    sent = time.monotonic()
    assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == 87
    line = listener.wait_line(study.uid, "SEG sent")[0]
    print(f"SEG sent {time.monotonic() - sent:.2f} s after the last instance (quiet period {QUIET} s)")
    assert "from ORTHANC@127.0.0.1" in line
    assert_seg_matches_run(orthanc, study, _seg_sop(listener.out, study.uid), tmp_path)
    assert (listener.out / study.uid / f"{study.uid}_mask.nii.gz").is_file()
    deadline = time.monotonic() + WAIT_S  # the review page is written after the line
    while not (listener.out / "index.html").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert study.uid in (listener.out / "index.html").read_text()


def test_listen_refuses_a_caller_not_on_the_allow_list(orthanc, study, listener, tmp_path):
    folder, uid = clone(study, tmp_path / "stranger", 0, tag="stranger")
    before = len(listener.lines)
    r = send(folder, orthanc.listener_port, calling="STRANGER")
    assert r.returncode != 0
    listener.wait_line("refused a caller", "STRANGER@127.0.0.1")
    time.sleep(QUIET + 0.5)
    assert not any(uid in ln for ln in listener.lines[before:])
    assert not (listener.out / uid).exists() and orthanc.study_id(uid) is None


def test_listen_study_without_flair_is_one_line_and_nothing_is_sent(orthanc, study, kaggle_root, listener, tmp_path):
    from dicom_study import make_study

    made = make_study(kaggle_root / VAL_PATIENTS[1], tmp_path / "noflair", sequences=("pre", "post"), localizer=False)
    uid = _study_uid_of(made.folder)
    n_before = orthanc.instance_count()
    r = send(made.folder, orthanc.listener_port)
    assert r.returncode == 0, r.stdout
    lines = listener.wait_line("failed", uid)
    assert len(lines) == 1 and "FLAIR" in lines[0] and "nothing sent" in lines[0]
    assert not (listener.out / uid).exists()
    assert orthanc.instance_count() == n_before and orthanc.study_id(uid) is None


def _study_uid_of(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(p for p in folder.rglob("*") if p.is_file()), stop_before_pixels=True)
               .StudyInstanceUID)


def test_listen_ten_studies_at_once_none_lost_or_duplicated(orthanc, study, listener, tmp_path):
    studies = [clone(study, tmp_path / f"s{i}", i, tag="ten") for i in range(10)]
    senders = [storescu(folder, orthanc.listener_port) for folder, _ in studies]
    for p in senders:
        p.communicate(timeout=WAIT_S)
        assert p.returncode == 0
    for _, uid in studies:
        listener.wait_line(uid, "SEG sent")
    for _, uid in studies:
        assert len([ln for ln in listener.lines if uid in ln and "SEG sent" in ln]) == 1
        segs = orthanc.segs(uid)
        assert [s["MainDicomTags"]["SOPInstanceUID"] for s in segs] == [_seg_sop(listener.out, uid)]


# ---------------------------------------------------------------- Orthanc going away mid-transfer
class CuttingProxy:
    """A TCP relay to ``port`` that cuts chosen connections after ``after`` bytes in one direction
    (``up``: what the client sends, ``down``: what it receives): the PACS going away mid-transfer."""

    def __init__(self, port: int, after: int, direction: str, cut: int):
        self.port, self.after, self.direction, self.cut = port, after, direction, cut  # cut: connections to cut
        self.connections = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.listen_port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            cut = self.connections <= self.cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                client.close()
                continue
            for a, b, d in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pump, args=(a, b, cut and d == self.direction, (client, upstream)),
                                 daemon=True).start()

    def _pump(self, src, dst, cutting: bool, both) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if cutting and sent + len(data) > self.after:
                    dst.sendall(data[:max(self.after - sent, 0)])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in both:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.server.close()


def test_listen_retries_a_pacs_gone_mid_transfer_then_one_line_and_drains_on_sigterm(orthanc, study, tmp_path):
    proxy = CuttingProxy(orthanc.dicom, after=4096, direction="up", cut=1)  # the first SEG transfer is cut
    out = tmp_path / "out"
    node = start_listener(out, _free_port(), "--allow-host", "127.0.0.1", "--tries", "2", "--timeout", "5",
                          "--dest", f"ORTHANC@127.0.0.1:{proxy.listen_port}")
    try:
        folder, uid = clone(study, tmp_path / "retry", 0, tag="retry")
        assert send(folder, node_port(node)).returncode == 0
        assert "(try 2)" in node.wait_line(uid, "SEG sent")[0]
        assert len(node.wait_line(uid, "retrying")) == 1
        assert [s["MainDicomTags"]["SOPInstanceUID"] for s in orthanc.segs(uid)] == [_seg_sop(out, uid)]

        proxy.cut = proxy.connections + 100  # Orthanc is gone for good: every transfer is cut
        folder, uid = clone(study, tmp_path / "gone", 0, tag="gone")
        assert send(folder, node_port(node)).returncode == 0
        line = node.wait_line(uid, "not stored")[0]
        assert "after 2 tries" in line and "connection lost" in line
        assert (out / uid / f"{uid}_seg.dcm").is_file() and orthanc.study_id(uid) is None

        # SIGTERM while a study is still arriving (its quiet period not over): it is finished, then exit 0
        proxy.cut = 0
        folder, uid = clone(study, tmp_path / "drain", 0, tag="drain")
        assert send(folder, node_port(node)).returncode == 0
        node.proc.send_signal(signal.SIGTERM)  # once: a second one would stop at once
        assert node.wait() == 0, "\n".join(node.lines)
        assert any(uid in ln and "SEG sent" in ln for ln in node.lines), "\n".join(node.lines)
        assert orthanc.segs(uid)
    finally:
        node.stop(signal.SIGKILL) if node.proc.poll() is None else None
        proxy.close()


def node_port(node: Node) -> int:
    line = node.wait_line("listening as")[0]
    return int(line.split(" on ")[1].split(";")[0].rsplit(":", 1)[1])


def test_listener_refuses_a_host_not_on_the_allow_list(tmp_path):
    """In-process, without a model: a host not allowed is cut before a byte is read; nothing is stored."""
    if _missing() and not running_in_ci():
        pytest.skip(_missing())
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from segengine.engine.network.listener import Listener

    class NoModel:
        def segment(self, folder):
            raise AssertionError("nothing may be segmented")

        def close(self):
            pass

    lines: list[str] = []
    node = Listener(NoModel(), tmp_path / "out", port=0, allow_hosts=("192.0.2.7",), log=lines.append).start()
    try:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SEGENGINE")
        assert not assoc.is_established
        assert any("host 127.0.0.1 is not on the allow-list" in ln for ln in lines), lines
    finally:
        node.drain()
    assert node.summary.refused_callers == 1 and not node.summary.done


def _mr_association(port: int):
    """An MR-storage association from STORESCU to the in-process listener on ``port`` (5 s timeouts)."""
    from pynetdicom import AE
    from pydicom.uid import MRImageStorage

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(MRImageStorage)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title="SEGENGINE")


def _tiny_mr(study_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = study_uid, generate_uid(), "MR", "tiny"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = bytes(32)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_listener_full_spool_answers_out_of_resources_in_one_line(tmp_path, monkeypatch):
    """In-process, without a model: a full spool disk refuses the instances (status A700), one line, nothing segmented."""
    if _missing() and not running_in_ci():
        pytest.skip(_missing())
    import errno


    from segengine.engine.network.listener import Listener

    def full(folder, sop, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    class NoModel:
        def segment(self, folder):
            raise AssertionError("nothing may be segmented")

        def close(self):
            pass

    monkeypatch.setattr(Listener, "_write", staticmethod(full))
    lines: list[str] = []
    node = Listener(NoModel(), tmp_path / "out", port=0, allow_aets=("STORESCU",), quiet=0.2,
                    log=lines.append).start()
    try:
        assoc = _mr_association(node.port)
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(_tiny_mr("1.2.3.4.5")).Status) for _ in range(3)]
        assoc.release()
        assert statuses == [0xA700] * 3
        deadline = time.monotonic() + WAIT_S
        while not any("nothing segmented" in ln for ln in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        node.drain()
    assert [ln for ln in lines if "1.2.3.4.5" in ln] == [
        f"segengine: 1.2.3.4.5: spool disk full ({node.spool}); refusing its instances (status A700) until there is room",
        "segengine: 1.2.3.4.5: no instance stored (3 refused); nothing segmented"]
    assert node.summary.failed == ["1.2.3.4.5"] and not (tmp_path / "out").exists()


def test_listener_on_release_completes_a_study_without_waiting_for_quiet(tmp_path):
    """In-process, a stand-in for the model: with on_release the study is handed over when its association
    is released, long before a 60 s quiet period; every instance is in its folder, once."""
    if _missing() and not running_in_ci():
        pytest.skip(_missing())
    from segengine.engine.network.listener import Listener
    from segengine.engine.network.study_job import StudyOutcome

    seen: list[list[str]] = []

    class Recorder:
        def segment(self, folder):
            seen.append(sorted(p.name for p in folder.iterdir()))
            return StudyOutcome(folder.name, "done", f"{folder.name}: recorded")

        def close(self):
            pass

    lines: list[str] = []
    (tmp_path / "out").mkdir()  # as `listen` makes it before it starts
    node = Listener(Recorder(), tmp_path / "out", port=0, allow_aets=("STORESCU",), quiet=60, on_release=True,
                    log=lines.append).start()
    try:
        assoc = _mr_association(node.port)
        sent = [_tiny_mr("1.2.3.4.6") for _ in range(3)]
        assert [int(assoc.send_c_store(ds).Status) for ds in sent + sent[:1]] == [0] * 4  # one re-sent
        assoc.release()
        deadline = time.monotonic() + WAIT_S
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        node.drain()
    assert seen == [sorted(f"{ds.SOPInstanceUID}.dcm" for ds in sent)]
    assert lines == ["1.2.3.4.6: recorded from STORESCU@127.0.0.1"] and node.summary.done == ["1.2.3.4.6"]


def test_listener_resumes_its_spool_and_survives_a_caller_gone_mid_study(tmp_path):
    """In-process, a stand-in for the model: a study a killed listener left in --spool is segmented at start;
    a caller that aborts mid-study costs one line, and what it sent is segmented after the quiet period."""
    if _missing() and not running_in_ci():
        pytest.skip(_missing())
    from segengine.engine.network.listener import Listener
    from segengine.engine.network.study_job import StudyOutcome

    seen: dict[str, list[str]] = {}

    class Recorder:
        def segment(self, folder):
            seen[folder.name] = sorted(p.name for p in folder.iterdir())
            return StudyOutcome(folder.name, "done", f"{folder.name}: recorded")

        def close(self):
            pass

    spool, out = tmp_path / "spool", tmp_path / "out"
    left = spool / "000007" / "1.2.3.4.7"
    left.mkdir(parents=True)
    for name in ("1.1.dcm", "1.2.dcm", ".1.3.part"):
        (left / name).write_bytes(b"x")
    out.mkdir()
    lines: list[str] = []
    node = Listener(Recorder(), out, port=0, allow_aets=("STORESCU",), quiet=0.3, spool=spool,
                    log=lines.append).start()
    try:
        assoc = _mr_association(node.port)
        sent = [_tiny_mr("1.2.3.4.8") for _ in range(2)]
        assert [int(assoc.send_c_store(ds).Status) for ds in sent] == [0, 0]
        assoc.abort()
        deadline = time.monotonic() + WAIT_S
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        node.drain()
    assert seen == {"1.2.3.4.7": ["1.1.dcm", "1.2.dcm"], "1.2.3.4.8": sorted(f"{d.SOPInstanceUID}.dcm" for d in sent)}
    assert lines[0] == f"segengine: 1.2.3.4.7: 2 instances left in {spool} by an earlier listener; segmenting them"
    assert any("STORESCU@127.0.0.1 disconnected mid-transfer of 1.2.3.4.8" in ln for ln in lines), lines
    assert list(spool.iterdir()) == []  # finished studies leave nothing behind; the spool itself is the user's


def test_listener_keeps_a_study_that_met_a_full_out_disk_and_tries_again(tmp_path):
    """In-process, a stand-in for the model: OUT's disk full is one line; the study waits in the spool, then succeeds."""
    if _missing() and not running_in_ci():
        pytest.skip(_missing())
    from segengine.engine.network.listener import Listener
    from segengine.engine.network.study_job import StudyOutcome

    tries: list[int] = []

    class FullOnce:
        def segment(self, folder):
            tries.append(len(list(folder.glob("*.dcm"))))
            if len(tries) == 1:
                return StudyOutcome(folder.name, "full", f"{folder.parent.parent}: no space left on device")
            return StudyOutcome(folder.name, "done", f"{folder.name}: recorded")

        def close(self):
            pass

    (tmp_path / "out").mkdir()
    lines: list[str] = []
    node = Listener(FullOnce(), tmp_path / "out", port=0, allow_aets=("STORESCU",), quiet=0.2, on_release=True,
                    log=lines.append)
    node.disk_full_retry_s = 0.3
    node.start()
    try:
        assoc = _mr_association(node.port)
        assert int(assoc.send_c_store(_tiny_mr("1.2.3.4.9")).Status) == 0
        assoc.release()
        deadline = time.monotonic() + WAIT_S
        while len(tries) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        node.drain()
    assert tries == [1, 1] and node.summary.done == ["1.2.3.4.9"] and not node.summary.failed
    assert lines[0].endswith("no space left on device; the study waits in the spool, next try in 0.3 s")


@pytest.mark.parametrize("args, message", [
    (["listen", "--out", "{tmp}"], "give the callers to accept"),
    (["listen", "--out", "{tmp}", "--allow-aet", "X", "--dest", "PACS"], "expected AET@HOST:PORT"),
    (["listen", "--out", "{tmp}", "--allow-aet", "WAY-TOO-LONG-AE-TITLE"], "1 to 16 printable ASCII"),
    (["pull", "http://127.0.0.1:9/dicom-web", "--out", "{tmp}"], "give --study UID, --query"),
    (["pull", "ftp://pacs/dicom-web", "--study", "1.2", "--out", "{tmp}"], "expected a DICOMweb base URL"),
    (["pull", "http://127.0.0.1:9/dicom-web", "--study", "1.2.x", "--out", "{tmp}"], "is not a DICOM UID"),
    (["pull", "http://127.0.0.1:9/dicom-web", "--query", "PatientID", "--out", "{tmp}"], "expected KEYWORD=VALUE"),
])
def test_bad_arguments_are_one_line_before_any_work(args, message, tmp_path):
    from click.testing import CliRunner

    from segengine.engine.cli import main

    out = tmp_path / "out"
    r = CliRunner().invoke(main, [a.replace("{tmp}", str(out)) for a in args])
    assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output
    assert not out.exists()


# ---------------------------------------------------------------- pull (DICOMweb)
CREDS = {"SEGENGINE_DICOMWEB_USER": USER, "SEGENGINE_DICOMWEB_PASSWORD": PASSWORD}


def test_pull_fetches_segments_and_stores_back(orthanc, study, tmp_path):
    out = tmp_path / "out"
    node = Node("pull", orthanc.dicomweb, "--study", study.uid, "--out", str(out), env=CREDS)
    assert node.wait() == 0, "\n".join(node.lines)
    assert any(study.uid in ln and "SEG stored" in ln for ln in node.lines), node.lines
    assert_seg_matches_run(orthanc, study, _seg_sop(out, study.uid), tmp_path)


def test_pull_without_credentials_or_with_them_in_the_url_is_one_line(orthanc, study, tmp_path):
    env = {k: "" for k in CREDS} | {"HOME": str(tmp_path)}  # no ~/.netrc either
    p = subprocess.run([str(EXE), "pull", orthanc.dicomweb, "--study", study.uid, "--out", str(tmp_path / "a")],
                       capture_output=True, text=True, env={**os.environ, **env}, timeout=WAIT_S)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "401" in p.stderr and "SEGENGINE_DICOMWEB_USER" in p.stderr
    assert not (tmp_path / "a" / study.uid).exists()
    url = orthanc.dicomweb.replace("http://", f"http://{USER}:{PASSWORD}@")
    p = subprocess.run([str(EXE), "pull", url, "--study", study.uid, "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=WAIT_S)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "credentials in the URL are refused" in p.stderr
    assert PASSWORD not in p.stderr and not (tmp_path / "b").exists()
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    p = subprocess.run([str(EXE), "pull", orthanc.dicomweb, "--study", "1.2.3.999", "--netrc", str(netrc),
                        "--out", str(tmp_path / "c")], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=WAIT_S)
    assert p.returncode == 1 and p.stderr.strip() == f"segengine: error: {orthanc.dicomweb}: no study 1.2.3.999"


def test_pull_retries_a_server_gone_mid_transfer_then_one_line(orthanc, study, tmp_path):
    proxy = CuttingProxy(orthanc.http, after=200_000, direction="down", cut=10**6)  # every WADO-RS answer is cut
    try:
        out = tmp_path / "out"
        node = Node("pull", f"http://127.0.0.1:{proxy.listen_port}/dicom-web", "--study", study.uid, "--out", str(out),
                    "--tries", "2", env=CREDS)
        assert node.wait() == 1, "\n".join(node.lines)
        failed = [ln for ln in node.lines if ln.startswith("segengine: failed")]
        assert len(failed) == 1 and "WADO-RS" in failed[0] and "after 2 tries" in failed[0], node.lines
        assert any("retrying (1 of 2 tries)" in ln for ln in node.lines)
        assert not (out / study.uid).exists()
    finally:
        proxy.close()


def test_pull_watch_takes_new_studies_until_sigterm(orthanc, study, tmp_path):
    out = tmp_path / "out"
    node = Node("pull", orthanc.dicomweb, "--watch", "--query", "PatientID=watch-0", "--interval", "0.3",
                "--out", str(out), env=CREDS)
    try:
        node.wait_line("loaded in")
        folder, uid = clone(study, tmp_path / "w", 0, tag="watch")
        assert send(folder, orthanc.dicom, called="ORTHANC").returncode == 0
        node.wait_line(uid, "SEG stored")
        assert [s["MainDicomTags"]["SOPInstanceUID"] for s in orthanc.segs(uid)] == [_seg_sop(out, uid)]
        time.sleep(1.0)  # more polls: the study (now with its SEG) is not taken again
        assert len([ln for ln in node.lines if uid in ln]) == 1
    finally:
        code = node.stop()
    assert code == 0, "\n".join(node.lines)
