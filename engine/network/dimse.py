"""DICOM peers (``AET@HOST:PORT``) and C-STORE of finished files to one, with retries (pynetdicom)."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from segengine.engine.core.errors import DataError
from segengine.engine.network.errors import NetworkError

PEER = re.compile(r"^(?P<aet>[^@\\]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.:-]+):(?P<port>[0-9]{1,5})$")
AET = re.compile(r"^[ -~]{1,16}$")  # default character repertoire, no backslash, not only spaces


def check_aet(value: str, option: str) -> str:
    text = value.strip()
    if not text or not AET.match(value) or "\\" in value:
        raise DataError(f"{option} {value!r}: an AE title is 1 to 16 printable ASCII characters without a backslash")
    return text


@dataclass(frozen=True)
class Peer:
    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, option: str = "--dest") -> "Peer":
        m = PEER.match(text.strip())
        port = int(m["port"]) if m else 0
        if not m or not 0 < port < 65536:
            raise DataError(f"{option} {text!r}: expected AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)")
        return cls(check_aet(m["aet"], option), m["host"].strip("[]"), port)

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def quiet_pynetdicom() -> None:
    """pynetdicom logs every association at INFO and tracebacks at ERROR: segengine prints its own one-liners."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


SUCCESS_OR_WARNING = {0x0000, 0x0001, 0x0107, 0x0116} | set(range(0xB000, 0xB100))


def _send_once(peer: Peer, files: list[Path], calling_aet: str, timeout: float) -> None:
    """One association: every file stored, or NetworkError saying why not."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for cls in sorted({str(ds.SOPClassUID) for ds in datasets}):
        syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in datasets if str(ds.SOPClassUID) == cls}
        ae.add_requested_context(cls, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet)
    if not assoc.is_established:
        why = ("association rejected" if assoc.is_rejected else "association aborted" if assoc.is_aborted
               else "cannot connect")
        raise NetworkError(why)
    try:
        for f, ds in zip(files, datasets):
            status = assoc.send_c_store(ds)
            if not status or "Status" not in status:
                raise NetworkError(f"connection lost while storing {f.name}")
            if int(status.Status) not in SUCCESS_OR_WARNING:
                raise NetworkError(f"{f.name} refused with status 0x{int(status.Status):04X}")
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()


def store_files(peer: Peer, files: list[Path], calling_aet: str = "SEGENGINE", tries: int = 3, timeout: float = 10.0,
                log: Callable[[str], None] | None = None, what: str = "SEG") -> int:
    """C-STORE ``files`` to ``peer`` in one association, retried ``tries`` times with a growing pause;
    returns the try that succeeded, or raises NetworkError with one line (the last reason)."""
    quiet_pynetdicom()
    last = ""
    for attempt in range(1, tries + 1):
        try:
            _send_once(peer, files, calling_aet, timeout)
            return attempt
        except NetworkError as exc:
            last = str(exc)
        except OSError as exc:
            last = exc.strerror or str(exc)
        if attempt < tries:
            if log:
                log(f"segengine: {what} to {peer}: {last}; retrying ({attempt} of {tries} tries)")
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
    raise NetworkError(f"{what} not stored to {peer} after {tries} tries ({last})")
