"""OUT's layout rules, in one place: a patient's folder appears complete or not at all
(``atomic_dir``), one writer per patient (``PatientLock``), a killed writer's leftovers repaired
(``recover_interrupted``, ``tidy_out``), results never inside an input (``refuse_overlap``) and
the one "results exist" rule (``refuse_existing``)."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from segengine.engine.core.atomic import current_umask, fsync_path, fsync_tree
from segengine.engine.core.errors import ForeignEntryError, OutputError, PatientBusyError, ResultsExistError
from segengine.engine.core.fsguard import (check_result_entry, disown, entry_kind, is_owned_dir, make_owned_dir,
                                           open_lock_file)
from segengine.engine.core.runtime import deferred_signals

LOCK_SUFFIX = ".segengine-lock"


def _lock_path(out: Path, patient_id: str) -> Path:
    return out / f".{patient_id}{LOCK_SUFFIX}"


def _overlap(target: Path, src: Path) -> str | None:
    if target == src:
        return "is"
    if src in target.parents:
        return "lies inside"
    if target in src.parents:
        return "contains"
    return None


def refuse_overlap(target: Path, inputs: list[Path]) -> None:
    """Refuse a results folder that is, contains or lies inside any input (both spellings resolved)."""
    targets = {Path(os.path.abspath(target)), target.resolve()}
    for src in inputs:
        for s in {Path(os.path.abspath(src)), src.resolve()}:
            for t in targets:
                relation = _overlap(t, s)
                if relation:
                    raise OutputError(f"{target}: results folder {relation} the input {src}; inputs are never "
                                      "written to (choose another --out)")


class PatientLock:
    """``flock`` on OUT/.<id>.segengine-lock, removed on release (safely: a waiter re-checks the inode)."""

    def __init__(self, out: Path, patient_id: str):
        self.path = _lock_path(out, patient_id)
        self.target = out / patient_id
        self.fd: int | None = None

    def acquire(self) -> "PatientLock":
        with deferred_signals():  # a lock file is never created without being recorded for release
            return self._acquire()

    def _acquire(self) -> "PatientLock":
        while True:
            fd = open_lock_file(self.path)  # never through a link planted in OUT (fsguard)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise PatientBusyError(f"{self.target}: another segengine process (pid {holder}) is writing this "
                                       "patient; skipped here") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the previous holder removed the file between our open and flock: retry
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with deferred_signals():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "PatientLock":
        try:
            return self.acquire()
        except BaseException:  # a signal raised after the lock was taken, before `with` owns it
            self.release()
            raise

    def __exit__(self, *exc) -> None:
        self.release()


def has_result(out: Path, patient_id: str) -> bool:
    """OUT/<id> is a result folder; ForeignEntryError when a link or file sits there (fsguard)."""
    return check_result_entry(out / patient_id)


def refuse_existing(out: Path, patient_id: str, overwrite: bool) -> None:
    """The one "results exist" rule: ResultsExistError unless --overwrite (a link or file there: ForeignEntryError)."""
    if has_result(out, patient_id) and not overwrite:
        raise ResultsExistError(f"{out / patient_id}: results exist (use --overwrite to replace them)")


def tidy_out(out: Path) -> list[str]:
    """Repair what dead writers left in OUT (temp folders, half-done replaces, lock files).

    Patients whose lock is held by a live process are left alone. Returns one note per repair.
    """
    notes = []
    names = {name for name, _, _ in temp_entries(out)}
    try:
        names |= {e.name[1:-len(LOCK_SUFFIX)] for e in os.scandir(out)
                  if e.name.startswith(".") and e.name.endswith(LOCK_SUFFIX) and len(e.name) > len(LOCK_SUFFIX) + 1}
    except FileNotFoundError:
        return notes
    for name in sorted(names):
        try:
            with PatientLock(out, name):
                did = recover_interrupted(out, name)
        except PatientBusyError:
            continue
        except ForeignEntryError as exc:  # a planted lock: left alone, said once
            notes.append(str(exc))
            continue
        if did:
            notes.append(f"{out / name}: {did} (left by an interrupted run)")
    return notes


# Temporary entries of atomic_dir beside OUT/<name>: ".<name>.partial-XXXXXXXX" (being written)
# and ".<name>.old-XXXXXXXX/old" (the previous result while it is being replaced); XXXXXXXX is
# tempfile's 8-character suffix, so the id "A.partial-x" never matches A's temp entries.
TEMP_ENTRY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-[a-z0-9_]{8}$")


def _temp_prefixes(name: str) -> tuple[str, str]:
    return f".{name}.partial-", f".{name}.old-"


def temp_entries(out: Path, name: str | None = None) -> list[tuple[str, str, Path]]:
    """(name, "partial"|"old", path) of atomic_dir's temporary entries in ``out`` (of ``name`` only if given)."""
    found = []
    try:
        entries = list(os.scandir(out))
    except FileNotFoundError:
        return []
    for entry in entries:
        m = TEMP_ENTRY.match(entry.name)
        if m and (name is None or m.group("name") == name):
            found.append((m.group("name"), m.group("kind"), Path(entry.path)))
    return found


def recover_interrupted(out: Path, name: str) -> str | None:
    """Finish or undo a replace of ``out/name`` that a killed writer left half done.

    Call only while no other writer of ``name`` can run (the patient lock is held). Temp
    folders being written are removed; a previous result set aside (``.old-``) is put back
    when ``out/name`` is missing, and deleted only when ``out/name`` is in place (a complete
    folder: it only ever gets there by one rename of a finished folder). Only temp folders
    the engine made are touched (``fsguard``: real folders with its owner marker; links and
    planted folders are left alone and reported). Returns what it did.
    """
    final = out / name
    did = []
    entries = temp_entries(out, name)
    for _, kind, path in sorted(entries, key=lambda e: e[1] != "old"):  # "old" first
        if not is_owned_dir(path, name, kind):
            did.append(f"left {path.name} alone ({'a symbolic link' if path.is_symlink() else 'not made by segengine'})")
            continue
        if kind == "old":
            kept = path / "old"
            if entry_kind(final) == "missing" and entry_kind(kept) == "dir":
                os.replace(kept, final)
                fsync_path(out)
                did.append("restored the previous result")
            if entry_kind(final) == "dir":
                shutil.rmtree(path, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            did.append("removed an unfinished temp folder")
    return "; ".join(did) or None


@contextmanager
def atomic_dir(out: Path, name: str, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out/name`` only if the block completes.

    Patients' results and Triton model folders are written this way, so a reader never sees
    a half-written folder. The files and folder are fsynced before the rename. Replacing is
    two renames (old aside, new in); a kill between them is undone by recover_interrupted at
    the next write, so the old result is only deleted once the new one is in place. Callers
    that may run concurrently hold a lock on ``name`` (see patient_job).
    """
    final = out / name
    recover_interrupted(out, name)
    refuse_existing(out, name, overwrite)  # a link or file at OUT/<name>: refused, left alone
    partial, old = _temp_prefixes(name)
    tmp = None
    try:
        with deferred_signals():
            tmp = make_owned_dir(out, partial, name, "partial")
        yield tmp
        fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; results follow the umask like any folder
        with deferred_signals():  # Ctrl-C/SIGTERM never split a replace; SIGKILL is undone by recover_interrupted
            if check_result_entry(final):
                trash = make_owned_dir(out, old, name, "old")
                os.replace(final, trash / "old")
                os.replace(tmp, final)
                fsync_path(out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
                fsync_path(out)
            disown(final)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            recover_interrupted(out, name)  # put a result set aside back if the new one is not in
        except OSError:
            pass
        raise
