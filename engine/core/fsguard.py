"""The one rule for what the engine touches on disk.

OUT may be shared (a team's results folder), so anything in it may have been planted:

- entries of OUT (lock files ``.X.segengine-lock``, temp folders ``.X.partial-XXXXXXXX`` and
  ``.X.old-XXXXXXXX``, result folders ``X``) are looked at with ``lstat`` and files in OUT
  are opened with ``O_NOFOLLOW``: nothing is ever moved, deleted, truncated or read
  through a symbolic link;
- the engine moves or deletes only what it made: its temp folders hold an owner marker
  (:data:`OWNER_MARKER`, naming the patient and the kind of folder), are owned by this
  user and are real folders; anything else named like them is left alone and reported;
- a lock file is a regular file with one link (never a hard link to someone's file).

Every file the engine *reads* (weights, card, manifest, sidecars, slices, NIfTI, lists,
reports) must be a regular file: a FIFO, a device (``/dev/zero``) or a socket would block
or never end, so it is refused with one line before anything opens it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from segengine.engine.core.errors import DataError, ForeignEntryError, NotRegularFileError, OutputError

OWNER_MARKER = ".segengine-owner"


MARKER_MAX_BYTES = 4096


def entry_kind(path: Path) -> str:
    """"missing", "link", "dir", "file" or "other" (FIFO, socket, device), by ``lstat``: links are never followed."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # no such entry, or a file where a folder of the path should be
        return "missing"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


_DESCRIBE = {"link": "a symbolic link", "file": "a file", "other": "a FIFO, socket or device", "dir": "a folder",
             "missing": "missing"}


def describe(kind: str) -> str:
    return _DESCRIBE[kind]


def _kind_of_mode(mode: int) -> str:
    return ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else
            "link" if stat.S_ISLNK(mode) else "other")


# ---------------------------------------------------------------- reading: regular files only
def require_regular_file(path: Path, what: str = "file") -> None:
    """Refuse a ``path`` that is not a regular file (links to one are fine) before anything opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotRegularFileError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise NotRegularFileError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO, socket or device"
        raise NotRegularFileError(f"{path}: the {what} is {kind}, not a regular file; refused (reading it could block)")


def read_regular(path: Path, what: str, max_bytes: int, follow: bool = True) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; opened non-blocking (and with
    ``follow=False``, without following a symbolic link), checked on the open descriptor."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(f"{path}: the {what} is a symbolic link; not followed") from None
        raise NotRegularFileError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(f"{path}: the {what} is {describe(_kind_of_mode(st.st_mode))}, not a regular file")
        if st.st_size > max_bytes:
            raise NotRegularFileError(f"{path}: the {what} is {st.st_size:,} bytes, more than the limit of "
                                      f"{max_bytes:,}")
        chunks, left = [], max_bytes + 1
        while left > 0:
            block = os.read(fd, min(left, 1 << 20))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
        data = b"".join(chunks)
        if len(data) > max_bytes:  # grew since fstat
            raise NotRegularFileError(f"{path}: the {what} is more than the limit of {max_bytes:,} bytes")
        return data
    finally:
        os.close(fd)


# ---------------------------------------------------------------- OUT: lock files
def open_lock_file(path: Path) -> int:
    """Open (or create) a lock file in OUT for writing, never through a link, never a file shared with another name."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # a link, a FIFO without reader, a folder
            raise ForeignEntryError(f"{path}: lock file is {describe(entry_kind(path))}, not one segengine made; "
                                    "left alone (remove it to run this patient)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = describe(_kind_of_mode(st.st_mode)) if not stat.S_ISREG(st.st_mode) else "a hard link to another file"
        raise ForeignEntryError(f"{path}: lock file is {what}, not one segengine made; left alone "
                                "(remove it to run this patient)")
    return fd


# ---------------------------------------------------------------- OUT: folders the engine made
def make_owned_dir(out: Path, prefix: str, name: str, kind: str) -> Path:
    """A new temp folder in ``out`` holding the owner marker: the proof it may later be moved or deleted."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=out))
    mark_owned(path, name, kind)
    return path


def mark_owned(path: Path, name: str, kind: str) -> None:
    """Write the owner marker into a folder the engine just created."""
    marker = {"made_by": "segengine", "name": name, "kind": kind, "pid": os.getpid()}
    fd = os.open(path / OWNER_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        json.dump(marker, fh)


def is_owned_dir(path: Path, name: str, kind: str) -> bool:
    """A real folder (not a link) of this user holding the marker of ``name``/``kind``."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return False
    try:
        marker = json.loads(read_regular(path / OWNER_MARKER, "owner marker", MARKER_MAX_BYTES, follow=False))
    except (DataError, ValueError, UnicodeDecodeError):
        return False
    return (isinstance(marker, dict) and marker.get("made_by") == "segengine" and marker.get("name") == name
            and marker.get("kind") == kind)


def remove_owned_dir(path: Path, name: str, kind: str) -> bool:
    """Delete ``path`` only if the engine made it (rmtree never follows the links inside)."""
    if not is_owned_dir(path, name, kind):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def disown(folder: Path) -> None:
    """Drop the owner marker of a temp folder that became a result (results keep no marker)."""
    try:
        os.unlink(folder / OWNER_MARKER)
    except FileNotFoundError:
        pass


def check_result_entry(final: Path) -> bool:
    """Whether ``OUT/<id>`` holds a result folder; ForeignEntryError if something else sits there
    (a link, a file): it is left alone, not replaced, not read, not counted as a result."""
    kind = entry_kind(final)
    if kind in ("link", "file", "other"):
        raise ForeignEntryError(f"{final}: {describe(kind)} where this patient's results go, not a folder "
                                "segengine made; left alone (remove it or choose another --out)")
    return kind == "dir"


def check_out_dir(out: Path, inputs: list[Path]) -> None:
    """Refuse an OUT inside an input folder; create OUT and prove it writable."""
    out_r = out.resolve()
    for src in inputs:
        src_r = src.resolve()
        if out_r == src_r or src_r in out_r.parents:
            raise OutputError(f"{out}: output folder lies inside the input folder {src}; inputs are never written to")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".segengine-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{out}: output folder is not writable ({exc.strerror or exc})") from None


def require_regular_or_absent(path: Path, option: str) -> None:
    """An output file we are given is a regular file (or a link to one) or absent: a FIFO, socket
    or device there would be replaced by the temp-file-and-rename write (or, written to, block),
    so it is refused with one line; its target is never opened."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # absent, a dangling link the rename replaces, or a
        return  # path through a file (refused next, by check_writable_file's folder check)
    except OSError as exc:
        raise OutputError(f"{path}: {option}: cannot check the file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path}: {option} names a folder, expected a file path")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path}: {option} names {describe(_kind_of_mode(st.st_mode))}, not a regular file; "
                          "refused (it would be replaced)")


def check_writable_file(path: Path, option: str) -> None:
    """Before any work: ``path`` can be created or replaced (its folder exists and is writable),
    and is a regular file or absent (require_regular_or_absent)."""
    path = Path(path)
    parent = path.parent
    require_regular_or_absent(path, option)
    if not parent.is_dir():
        why = "is not a folder" if parent.exists() else "does not exist"
        raise OutputError(f"{path}: {option}: {parent} {why}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".segengine-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{path}: {option}: folder {parent} is not writable ({exc.strerror or exc})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: {option}: file exists and is not writable")


def check_writable_dir(path: Path, option: str) -> None:
    """Before any work: ``path`` is (or can be made) a writable folder."""
    try:
        check_out_dir(path, [])
    except OutputError as exc:
        raise OutputError(f"{option}: {exc}") from None
