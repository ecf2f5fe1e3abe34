"""``segengine pull``: studies from a DICOMweb server (QIDO-RS, WADO-RS), SEG back by STOW-RS.

Credentials never come from the command line: $SEGENGINE_DICOMWEB_TOKEN (a bearer token), or
$SEGENGINE_DICOMWEB_USER with $SEGENGINE_DICOMWEB_PASSWORD (HTTP basic), or a netrc-style file
(``--netrc FILE``, else requests' own ~/.netrc look-up); a URL with user:password@ is refused.
Every request is retried on a lost connection, a timeout or a 5xx/429 answer, with a growing
pause; after the last try it is one line (NetworkError). Series that are no images of the
patient (SEG, SR, PR, KO, documents) are not fetched, so a study's own SEGs never come back in.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from segengine.engine.core.errors import DataError, OutputError
from segengine.engine.network.errors import NetworkError
from segengine.engine.network.study_job import StudySegmenter, check_uid, write_index
from segengine.engine.outputs.results_dir import has_result

ENV_USER, ENV_PASSWORD, ENV_TOKEN = "SEGENGINE_DICOMWEB_USER", "SEGENGINE_DICOMWEB_PASSWORD", "SEGENGINE_DICOMWEB_TOKEN"
NOT_IMAGES = {"SEG", "SR", "PR", "KO", "DOC", "RTSTRUCT", "RTPLAN", "REG", "OT"}
STUDY_UID, MODALITY, SERIES_UID, STUDY_INSTANCES = "0020000D", "00080060", "0020000E", "00201208"
SERIES_INSTANCES = "00201209"


class CutShort(Exception):
    """A WADO-RS answer that ended before every instance the server listed: retried like a lost connection
    (a multipart body cut mid-transfer decodes without error, just shorter)."""


def _count(item: dict, tag: str) -> int | None:
    n = (item.get(tag, {}).get("Value") or [None])[0]
    return int(n) if isinstance(n, (int, float, str)) and str(n).isdigit() else None


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DataError(f"{url!r}: expected a DICOMweb base URL such as http://host:8042/dicom-web")
    if parts.username or parts.password:
        raise DataError(f"{parts.scheme}://{parts.hostname}...: credentials in the URL are refused (they would show "
                        f"in process lists and logs); use ${ENV_USER}/${ENV_PASSWORD}, ${ENV_TOKEN} or --netrc FILE")
    return url.rstrip("/")


def _auth(url: str, netrc_file: Path | None) -> tuple[Any, dict[str, str]]:
    """(requests auth, extra headers) from the environment or a netrc-style file."""
    token = os.environ.get(ENV_TOKEN)
    if token:
        return None, {"Authorization": f"Bearer {token.strip()}"}
    user = os.environ.get(ENV_USER)
    if user:
        return (user, os.environ.get(ENV_PASSWORD, "")), {}
    if netrc_file is not None:
        import netrc

        try:
            entry = netrc.netrc(str(netrc_file)).authenticators(urlsplit(url).hostname or "")
        except (OSError, netrc.NetrcParseError) as exc:
            raise DataError(f"--netrc {netrc_file}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
        if entry is None:
            raise DataError(f"--netrc {netrc_file}: no 'machine {urlsplit(url).hostname}' entry (nor a default)")
        return (entry[0] or "", entry[2] or ""), {}
    return None, {}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:300]


class DicomWeb:
    """A DICOMweb server with retries; every failure after them is a NetworkError of one line."""

    def __init__(self, url: str, netrc_file: Path | None = None, tries: int = 3, timeout: float = 30.0,
                 log: Callable[[str], None] = print):
        import requests
        from dicomweb_client.api import DICOMwebClient

        logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL)
        self.url, self.tries, self.log = check_url(url), tries, log
        auth, headers = _auth(self.url, netrc_file)
        session = requests.Session()
        if auth is not None:
            session.auth = auth
        self.client = DICOMwebClient(self.url, session=session, headers=headers or None, timeout=timeout)

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        import requests

        last = ""
        for attempt in range(1, self.tries + 1):
            try:
                return fn()
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                last = f"HTTP {code} {getattr(exc.response, 'reason', '') or ''}".strip()
                if code in (401, 403):
                    raise NetworkError(f"{self.url}: {what}: {last} (credentials: ${ENV_USER}/${ENV_PASSWORD}, "
                                       f"${ENV_TOKEN} or --netrc FILE)") from None
                if code < 500 and code != 429:
                    raise NetworkError(f"{self.url}: {what}: {last}") from None
            except (requests.RequestException, OSError) as exc:
                last = _one_line(exc)
            except CutShort as exc:
                last = str(exc)
            except Exception as exc:  # noqa: BLE001 - a truncated multipart body may fail inside the decoder
                last = f"{type(exc).__name__}: {_one_line(exc)}"
            if attempt < self.tries:
                self.log(f"segengine: {self.url}: {what}: {last}; retrying ({attempt} of {self.tries} tries)")
                time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        raise NetworkError(f"{self.url}: {what} failed after {self.tries} tries ({last})")

    def studies(self, filters: dict[str, str]) -> dict[str, int | None]:
        """{StudyInstanceUID: number of instances (None when the server does not say)} matching ``filters``."""
        found = self.call("QIDO-RS study search", lambda: self.client.search_for_studies(
            search_filters=filters or None, fields=["NumberOfStudyRelatedInstances"], get_remaining=True))
        out: dict[str, int | None] = {}
        for item in found:
            try:
                uid = check_uid((item.get(STUDY_UID, {}).get("Value") or [""])[0])
            except DataError:
                continue
            out[uid] = _count(item, STUDY_INSTANCES)
        return out

    def fetch_study(self, uid: str, folder: Path) -> int:
        """Every image series of the study into ``folder`` (files named by SOPInstanceUID); returns the count."""
        series = self.call(f"QIDO-RS series of {uid}", lambda: self.client.search_for_series(
            study_instance_uid=uid, fields=["NumberOfSeriesRelatedInstances"]))
        count = 0
        folder.mkdir(parents=True, exist_ok=True)
        for item in series:
            modality = str((item.get(MODALITY, {}).get("Value") or [""])[0]).upper()
            if modality in NOT_IMAGES:
                continue
            series_uid = check_uid((item.get(SERIES_UID, {}).get("Value") or [""])[0], "SeriesInstanceUID")
            expected = _count(item, SERIES_INSTANCES)

            def get(series_uid=series_uid, expected=expected) -> int:
                n = 0
                for ds in self.client.iter_series(uid, series_uid):
                    sop = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
                    tmp = folder / f".{sop}.part"
                    try:
                        ds.save_as(tmp, enforce_file_format=True)
                        os.replace(tmp, folder / f"{sop}.dcm")
                    finally:
                        tmp.unlink(missing_ok=True)
                    n += 1
                if expected is not None and n < expected:
                    raise CutShort(f"the answer ended after {n} of {expected} instances")
                return n

            count += self.call(f"WADO-RS series {series_uid} of {uid}", get)
        return count

    def store(self, path: Path, study_uid: str) -> None:
        from pydicom import dcmread

        ds = dcmread(path)
        self.call(f"STOW-RS of {path.name}", lambda: self.client.store_instances([ds], study_instance_uid=study_uid))


def parse_query(items: tuple[str, ...]) -> dict[str, str]:
    """``--query KEY=VALUE`` (repeatable; QIDO-RS attribute keywords or tags) as search filters."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise DataError(f"--query {item!r}: expected KEYWORD=VALUE (e.g. PatientID=P001, StudyDate=20240101-)")
        out[key.strip()] = value.strip()
    return out


class Puller:
    """Fetch, segment, store back: one study at a time, one line each."""

    def __init__(self, web: DicomWeb, segmenter: StudySegmenter, out: Path, spool: Path | None = None,
                 log: Callable[[str], None] = print):
        self.web, self.segmenter, self.out, self.log = web, segmenter, Path(out), log
        self._own_spool = spool is None
        self.spool = Path(tempfile.mkdtemp(prefix="segengine-pull-")) if spool is None else Path(spool)
        self.failed = 0
        self.done = 0

    def one(self, uid: str) -> bool:
        """Fetch, segment and STOW one study; False (and one line) when it failed."""
        folder = self.spool / uid
        try:
            shutil.rmtree(folder, ignore_errors=True)
            try:
                n = self.web.fetch_study(uid, folder)
            except OSError as exc:
                raise OutputError(f"{self.spool}: cannot write the fetched study ({exc.strerror or exc})") from None
            if n == 0:
                raise DataError(f"{uid}: the study holds no image series; nothing segmented")
            outcome = self.segmenter.segment(folder)
            if not outcome.ok:
                bad = outcome.status in ("failed", "full")
                self.log(f"segengine: {'failed' if bad else 'skipped'} {outcome.line}")
                self.failed += bad
                return not bad
            if outcome.seg is None:
                self.log(f"{outcome.line}; no SEG was written, nothing sent")
            else:
                self.web.store(outcome.seg, uid)
                self.log(f"{outcome.line}; SEG stored to {self.web.url}")
            self.done += 1
            write_index(self.out, self.log)
            return True
        except (NetworkError, DataError, OutputError) as exc:
            self.log(f"segengine: failed {uid}: {exc}")
            self.failed += 1
            return False
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def watch(self, filters: dict[str, str], interval: float, stop: threading.Event, overwrite: bool = False) -> None:
        """Poll for studies; each is taken once it is seen with the same instance count on two polls
        in a row (still arriving otherwise) and has no results in OUT (unless ``overwrite``, once per run)."""
        seen: dict[str, int | None] = {}
        handled: set[str] = set()
        while not stop.is_set():
            try:
                now = self.web.studies(filters)
            except NetworkError as exc:
                self.log(f"segengine: {exc}; polling again in {interval:g} s")
                now = None
            for uid, count in (now or {}).items():
                if uid in handled or (not overwrite and has_result(self.out, uid)):
                    continue
                if uid in seen and seen[uid] == count:
                    handled.add(uid)
                    self.one(uid)
                    if stop.is_set():
                        break
            if now is not None:
                seen = now
            stop.wait(interval)

    def close(self) -> None:
        if self._own_spool:
            shutil.rmtree(self.spool, ignore_errors=True)
