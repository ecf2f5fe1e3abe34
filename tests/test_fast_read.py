"""The plain-TIFF fast path (engine/tiff_fast.py) changes no pixel, no shape, no error and no mask.

Every slice and mask of the real fixture patients is read both ways and compared; files that
are not plain Kaggle slices go to tifffile exactly as before; and a whole `segengine run` writes
byte-identical results with the fast path on and off.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from conftest import VAL_PATIENTS
from segengine.engine.readers import kaggle as io, tiff_fast


def test_fast_reader_returns_tifffiles_pixels_and_shapes(kaggle_root):
    files = sorted(kaggle_root.glob("*/*.tif"))
    assert len(files) > 100 and any(f.name.endswith("_mask.tif") for f in files)
    for f in files:
        want = tifffile.imread(f)
        got = tiff_fast.read_tiff(f)
        assert got is not None, f  # a Kaggle slice is plain: the fast path takes it
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), f
        with tifffile.TiffFile(f) as tf:
            assert tiff_fast.tiff_shape(f) == tuple(tf.pages[0].shape), f


def _zlib(path, rgb):
    tifffile.imwrite(path, rgb, compression="zlib")


def _two_pages(path, rgb):
    tifffile.imwrite(path, np.stack([rgb, rgb]))


def _sixteen_bit(path, rgb):
    tifffile.imwrite(path, rgb.astype(np.uint16) * 257)


def _tiled(path, rgb):
    tifffile.imwrite(path, rgb, tile=(64, 64))


def _planar(path, rgb):
    tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), planarconfig="separate", photometric="rgb")


def _truncated(path, rgb):
    tifffile.imwrite(path, rgb)
    path.write_bytes(path.read_bytes()[:-1000])


def _not_a_tiff(path, rgb):
    path.write_bytes(b"GIF89a" + bytes(100))


def _ifd_far_beyond_the_end(path, rgb):
    """A small file whose header points its IFD 4 GB away: nothing is allocated for it."""
    tifffile.imwrite(path, rgb)
    data = bytearray(path.read_bytes())
    data[4:8] = (0xFFFFFFF0).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _ifd_after_the_pixels(path, rgb):
    from PIL import Image

    Image.fromarray(rgb).save(path)  # Pillow writes the IFD after the strips


def _volumetric(path, rgb):
    """One IFD holding 4 planes (ImageDepth): tifffile's shape is 4-D and the engine refuses it."""
    tifffile.imwrite(path, np.stack([rgb] * 4), photometric="rgb", volumetric=True)


def _without_bits_per_sample(path, rgb):
    """BitsPerSample left out: the TIFF default is 1 bit (tifffile reads booleans; the engine refuses them)."""
    tifffile.imwrite(path, rgb)
    _retag(path, 258, 65000)


def _strips_with_padding(path, rgb):
    """Each strip's byte count 16 more than its rows (as some writers pad): the pixels are the rows."""
    tifffile.imwrite(path, rgb, rowsperstrip=1)
    with tifffile.TiffFile(path) as tf:
        tag = tf.pages[0].tags[279]
        counts, at, code = list(tag.value), tag.valueoffset, {3: "H", 4: "I"}[int(tag.dtype)]
    data = bytearray(path.read_bytes())
    for i, c in enumerate(counts[:-1]):  # the last strip ends the file: its count stays
        struct.pack_into("<" + code, data, at + i * struct.calcsize(code), c + 16)
    path.write_bytes(bytes(data))


def _retag(path, tag: int, new: int) -> None:
    """Renumber one tag of the first IFD (a little-endian classic TIFF)."""
    data = bytearray(path.read_bytes())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    for i in range(n):
        if struct.unpack_from("<H", data, ifd + 2 + 12 * i)[0] == tag:
            struct.pack_into("<H", data, ifd + 2 + 12 * i, new)
    path.write_bytes(bytes(data))


def _big_endian(path, rgb):
    tifffile.imwrite(path, rgb, byteorder=">")


# (how the file is written, does the fast path read its pixels, its header)
VARIANTS = [(_zlib, False, False), (_two_pages, False, False), (_sixteen_bit, False, False), (_tiled, False, False),
            (_planar, False, False), (_truncated, False, True), (_not_a_tiff, False, False), (_big_endian, True, True),
            (_ifd_far_beyond_the_end, False, False), (_ifd_after_the_pixels, True, True), (_volumetric, False, False),
            (_without_bits_per_sample, False, False), (_strips_with_padding, True, True)]


def _engine_reads(path: Path) -> list:
    """What the engine makes of a slice file: its pixels and header shape, or the error it refuses it with."""
    got = []
    for read in (io.read_slice, io.slice_shape):
        try:
            got.append(read(path))
        except io.DataError as exc:
            got.append((type(exc), str(exc)))
    return got


@pytest.mark.parametrize("write, fast, fast_header", VARIANTS, ids=[w.__name__.strip("_") for w, _, _ in VARIANTS])
def test_other_tiffs_go_to_tifffile_as_before(kaggle_root, tmp_path, monkeypatch, write, fast, fast_header):
    """Whatever the fast path declines, the engine reads (or refuses, with the same line) exactly
    as with the fast path off: several pages and 16-bit samples refused from the header, etc."""
    rgb = tifffile.imread(sorted((kaggle_root / VAL_PATIENTS[0]).glob("*_1.tif"))[0])
    path = tmp_path / "slice_1.tif"
    write(path, rgb)
    assert (tiff_fast.read_tiff(path) is not None) == fast
    assert (tiff_fast.tiff_shape(path) is not None) == fast_header  # a truncated file's header is whole
    if fast_header:
        with tifffile.TiffFile(path) as tf:
            assert tiff_fast.tiff_shape(path) == tuple(tf.pages[0].shape)
    with_fast = _engine_reads(path)
    monkeypatch.setattr(tiff_fast, "read_tiff", lambda path: None)
    monkeypatch.setattr(tiff_fast, "tiff_shape", lambda path: None)
    without = _engine_reads(path)
    for a, b in zip(with_fast, without):
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        else:
            assert a == b


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".tif", ".gz", ".png")}


def test_run_writes_the_same_results_with_and_without_the_fast_reader(kaggle_root, tmp_path, monkeypatch):
    """The masks (tif, NIfTI) and images a run writes are byte for byte those of the tifffile path."""
    from segengine.engine.cli import main

    def run(out):
        res = CliRunner().invoke(main, ["run", "--patient", str(kaggle_root / VAL_PATIENTS[1]), "--out", str(out),
                                        "--backend", "onnxruntime-int8", "--threads", "1"])
        assert res.exit_code == 0, res.output
        return _digests(out)

    fast = run(tmp_path / "fast")
    monkeypatch.setattr(tiff_fast, "read_tiff", lambda path: None)
    monkeypatch.setattr(tiff_fast, "tiff_shape", lambda path: None)
    slow = run(tmp_path / "slow")
    assert any(name.endswith("_mask.tif") for name in fast) and fast == slow
