"""The plain TIFF slices of the Kaggle layout, read without tifffile's general machinery.

Profiling `run --patients` (notes/openvino.md) showed reading as the slowest stage: tifffile
parses every tag of every file (about 2 ms a file, before any pixel), and the engine opens each
slice's header to check its size and then the file again to decode it. A Kaggle slice is one
uncompressed strip-organized 8-bit image (RGB or grayscale) with a handful of tags; this module
reads exactly that kind with one ``struct`` pass over the first IFD and one ``readinto``, and
answers None for anything else (compression, tiles, several pages, 16-bit, odd photometric or
fill order, a truncated strip...), which the caller then hands to tifffile as before. So the
pixels and shapes are tifffile's own (tests/test_openvino.py compares them file by file) and
every error message stays tifffile's.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

# tag -> name of the baseline fields read; any other tag in this set's complement is ignored
# only if it cannot change the pixels (see _PIXEL_TAGS)
_FIELDS = {256: "width", 257: "height", 258: "bits", 259: "compression", 262: "photometric", 266: "fill_order",
           273: "strip_offsets", 274: "orientation", 277: "samples", 278: "rows_per_strip", 279: "strip_counts",
           284: "planar", 317: "predictor", 322: "tile_width", 338: "extra_samples", 339: "sample_format",
           32997: "depth"}  # ImageDepth: one IFD holding several planes (tifffile's shape is 4-D)


_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}  # BYTE, SHORT, LONG, LONG8


_HEAD = 4096  # the header and first IFD of a Kaggle slice lie in its first 200 bytes


def _ifd(path: Path) -> tuple[dict, int] | None:
    """The first IFD's baseline fields and the file size, or None if not a plain classic TIFF."""
    with open(path, "rb") as fh:
        head = fh.read(_HEAD)
        size = os.fstat(fh.fileno()).st_size
        if len(head) < 8 or head[:4] not in (b"II*\0", b"MM\0*"):
            return None  # BigTIFF and anything else: tifffile
        bo = "<" if head[:2] == b"II" else ">"
        (offset,) = struct.unpack(bo + "I", head[4:8])
        if offset + 2 > size:
            return None
        if offset + 2 > len(head):  # the IFD after the pixels: read it where it is
            fh.seek(offset)
            head, offset = fh.read(_HEAD), 0
        (n,) = struct.unpack(bo + "H", head[offset:offset + 2])
        end = offset + 2 + 12 * n + 4
        if end > len(head):
            return None
        fields: dict = {}
        for i in range(n):
            tag, typ, count = struct.unpack(bo + "HHI", head[offset + 2 + 12 * i:offset + 10 + 12 * i])
            if tag not in _FIELDS:
                continue
            if typ not in _TYPES:
                return None
            code, width = _TYPES[typ]
            raw = head[offset + 10 + 12 * i:offset + 14 + 12 * i]
            if count * width > 4:  # the values live elsewhere in the file
                (pos,) = struct.unpack(bo + "I", raw)
                if pos + count * width > size:
                    return None
                fh.seek(pos)
                raw = fh.read(count * width)
                if len(raw) != count * width:
                    return None
            fields[_FIELDS[tag]] = struct.unpack(bo + code * count, raw[:count * width])
        (next_ifd,) = struct.unpack(bo + "I", head[end - 4:end])
    if next_ifd != 0:
        return None  # several pages: tifffile decides what a page series is
    return fields, size


def _plain(fields: dict) -> tuple[int, int, int] | None:
    """(height, width, samples) of an uncompressed, contiguous, strip-organized 8-bit unsigned
    RGB or grayscale image, else None."""
    one = lambda key, default: fields.get(key, (default,))  # noqa: E731
    samples = one("samples", 1)[0]
    photometric = one("photometric", -1)[0]
    if ("width" not in fields or "height" not in fields or "strip_offsets" not in fields
            or "strip_counts" not in fields or "tile_width" in fields or "extra_samples" in fields):
        return None
    if (one("compression", 1)[0] != 1 or one("fill_order", 1)[0] != 1 or one("orientation", 1)[0] != 1
            or one("predictor", 1)[0] != 1 or one("planar", 1)[0] != 1 or one("depth", 1)[0] != 1):
        return None
    if not ((samples == 3 and photometric == 2) or (samples == 1 and photometric == 1)):
        return None
    if set(one("bits", 1)) != {8} or set(one("sample_format", 1)) != {1}:  # absent BitsPerSample: 1 bit
        return None
    return fields["height"][0], fields["width"][0], samples


def tiff_shape(path: Path) -> tuple[int, ...] | None:
    """(H, W) or (H, W, 3) of a plain slice from its header (what tifffile's page shape says), else None."""
    try:
        parsed = _ifd(path)
        shape = _plain(parsed[0]) if parsed else None
    except (OSError, struct.error, ValueError):
        return None
    if shape is None:
        return None
    h, w, s = shape
    return (h, w) if s == 1 else (h, w, s)


def read_tiff(path: Path) -> np.ndarray | None:
    """The pixels of a plain slice (as ``tifffile.imread`` returns them), else None."""
    try:
        parsed = _ifd(path)
        if parsed is None:
            return None
        fields, size = parsed
        shape = _plain(fields)
        if shape is None:
            return None
        h, w, s = shape
        offsets, counts = fields["strip_offsets"], fields["strip_counts"]
        rows = min(fields.get("rows_per_strip", (h,))[0], h) or h
        # strip i holds rows i*rows.. of the image, whatever its byte count says beyond them (padding)
        sizes = [min(rows, h - i * rows) * w * s for i in range(-(-h // rows))]
        if (len(offsets) != len(sizes) or len(counts) != len(sizes) or any(c < n for c, n in zip(counts, sizes))
                or any(o + n > size for o, n in zip(offsets, sizes))):
            return None  # short, missing or truncated strips: tifffile's error, not ours
        out = np.empty(h * w * s, dtype=np.uint8)
        pos = 0
        with open(path, "rb") as fh:
            for o, n in zip(offsets, sizes):
                fh.seek(o)
                if fh.readinto(memoryview(out)[pos:pos + n]) != n:
                    return None
                pos += n
    except (OSError, struct.error, ValueError):
        return None
    return out.reshape((h, w) if s == 1 else (h, w, s))
