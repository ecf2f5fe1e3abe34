"""The one atomic file write of segengine: a temporary file beside the target, fsynced, renamed.

A reader sees the old file or the new one, never half of one, whether the writer is the
engine (reports, review pages, sidecars, the speed cache), the exporters (ONNX, INT8, FP16
files verified before they are put in place) or training (checkpoints, caches, ensembles).
Folders of results are made atomic by ``outputs.results_dir.atomic_dir`` on top of these.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file and folder under ``folder`` on disk before it is renamed into place."""
    for root, _dirs, files in os.walk(folder):
        for f in files:
            fsync_path(Path(root) / f)
        fsync_path(Path(root))


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def temp_path_beside(path: Path, tag: str) -> Path:
    """A fresh hidden temporary name in ``path``'s folder (so the final ``os.replace`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}.tmp")


@contextmanager
def atomic_file(path: Path, tag: str = "write") -> Iterator[Path]:
    """Yield a temporary path; when the block completes it is fsynced and renamed onto ``path``
    (mode as the umask gives), else removed. Writers that need a file name (torch.save,
    np.savez, onnx.save) and checks before the rename (export verification) use it directly."""
    path = Path(path)
    tmp = temp_path_beside(path, tag)
    try:
        yield tmp
        if tmp.exists():  # a writer may produce nothing on purpose; then nothing is replaced
            fsync_path(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())
