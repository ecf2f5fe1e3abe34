"""DICOM studies made from Kaggle patients, for tests and by hand (no DICOM data is committed).

    python tests/dicom_study.py kaggle_3m/TCGA_CS_6668_20011025 DEST [--layout per-series]
        [--in-plane transpose] [--tilt 12] [--sequences pre,flair,post]

Each Kaggle channel becomes one MR series (pre-contrast T1, FLAIR, post-contrast T1) with
pydicom headers, plus a 3-slice localizer that a reader must ignore. The geometry is written
from the dataset's own conventions, independently of segengine's reader: a Kaggle slice is
shown as a radiologist views an axial image, so its rows run anterior -> posterior, its
columns the patient's right -> left, and the slice number grows inferior -> superior; in
DICOM's patient frame (LPS) those are +y, +x and +z. ``--in-plane`` stores the frames
flipped or transposed relative to that view (the orientation vectors say so), ``--tilt``
rotates the whole grid (an oblique acquisition). File names are random and InstanceNumbers
shuffled, so only the positions tell the slice order. ``layout`` is ``one-folder`` (every
file in DEST) or ``per-series`` (DEST/<series number>/...).
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEQUENCES = {  # Kaggle channel, SeriesDescription, stored scale, MR tags
    "pre": (0, "AX T1 PRE", 3, {"ScanningSequence": "SE", "EchoTime": 12.0, "RepetitionTime": 500.0}),
    "flair": (1, "AX FLAIR", 7, {"ScanningSequence": ["SE", "IR"], "EchoTime": 120.0, "RepetitionTime": 9000.0,
                                 "InversionTime": 2500.0}),
    "post": (2, "AX T1 POST GAD", 5, {"ScanningSequence": "SE", "EchoTime": 12.0, "RepetitionTime": 500.0,
                                      "ContrastBolusAgent": "GADOLINIUM"}),
}
SPACING = (3.3, 0.94, 0.9)  # slice, row, column (mm)
# frame pixel (fr, fc) -> Kaggle (row, column) for an H x W slice
IN_PLANE = {
    "identity": lambda fr, fc, h, w: (fr, fc),
    "flip": lambda fr, fc, h, w: (h - 1 - fr, w - 1 - fc),
    "transpose": lambda fr, fc, h, w: (fc, fr),
}


def _rotation(degrees: float) -> np.ndarray:
    """A tilt about an oblique axis, so every world axis moves (not a pure in-plane rotation)."""
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


@dataclass
class Study:
    """What a test needs to map the study back onto the Kaggle slices, independently of segengine."""

    folder: Path
    in_plane: str
    slice_numbers: list[int]  # Kaggle slice numbers, in the order of the volume's first axis
    sop_to_slice: dict[str, tuple[str, int]] = field(default_factory=dict)  # SOPInstanceUID -> (sequence, Kaggle n)
    series_uid: dict[str, str] = field(default_factory=dict)  # sequence -> SeriesInstanceUID
    files: dict[str, list[Path]] = field(default_factory=dict)  # sequence -> files, in Kaggle slice order

    def frame_to_kaggle(self, frame: np.ndarray) -> np.ndarray:
        """A stored frame (rows, columns) as the Kaggle slice it shows."""
        return {"identity": frame, "flip": frame[::-1, ::-1], "transpose": frame.T}[self.in_plane]

    def seg_on_kaggle_slices(self, seg_path: Path, shape: tuple[int, int, int]) -> np.ndarray:
        """A DICOM SEG of this study as (D, H, W) Kaggle-layout slices, each frame placed through the
        FLAIR instance it references and this study's own map (not segengine's reader: that is what
        the SEG is checked against). A frame referencing anything but a FLAIR image is an error."""
        import highdicom as hd

        seg = hd.seg.segread(seg_path)
        vol = np.zeros(shape, bool)
        refs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                for f in seg.PerFrameFunctionalGroupsSequence]
        if refs:
            frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=refs, segment_numbers=[1])[..., 0]
            for uid, frame in zip(refs, frames):
                seq, number = self.sop_to_slice[uid]
                if seq != "flair":
                    raise AssertionError(f"SEG frame references a {seq} image ({uid})")
                vol[self.slice_numbers.index(number)] = self.frame_to_kaggle(frame) > 0
        return vol


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def make_study(patient_dir: Path, dest: Path, layout: str = "one-folder", in_plane: str = "identity",
               tilt: float = 0.0, sequences: tuple[str, ...] = ("pre", "flair", "post"), seed: int = 0,
               localizer: bool = True) -> Study:
    """Write ``patient_dir`` (a Kaggle folder) as a DICOM study under ``dest``; returns its map."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    from segengine.engine.readers.registry import read_patient

    vol = read_patient(patient_dir, with_mask=False)
    rng = random.Random(seed)
    d, h, w = vol.image.shape[:3]
    rot = _rotation(tilt)
    sd, sr, sc = SPACING
    origin = np.array([-120.0, -110.0, -40.0])
    # world (LPS, mm) of Kaggle voxel (slice k, row r, column c)
    axes = rot @ np.column_stack([[sc, 0, 0], [0, sr, 0], [0, 0, sd]])  # columns: +c, +r, +k

    def world(k: float, r: float, c: float) -> np.ndarray:
        return origin + axes @ np.array([c, r, k])

    to_k = IN_PLANE[in_plane]
    fh, fw = (w, h) if in_plane == "transpose" else (h, w)
    r0, c0 = to_k(0, 0, h, w)
    r1, c1 = to_k(0, 1, h, w)  # one step along the frame's row (column index + 1)
    r2, c2 = to_k(1, 0, h, w)  # one step down the frame's column (row index + 1)
    row_step = world(0, r1, c1) - world(0, r0, c0)
    col_step = world(0, r2, c2) - world(0, r0, c0)
    row_dir, col_dir = row_step / np.linalg.norm(row_step), col_step / np.linalg.norm(col_step)
    study_uid, frame_uid = _uid(vol.patient_id, "study"), _uid(vol.patient_id, "frame")
    study = Study(folder=dest, in_plane=in_plane, slice_numbers=vol.slice_numbers)
    names: set[str] = set()

    def new_name() -> str:
        while True:
            name = f"{rng.getrandbits(40):010x}"
            if name not in names:
                names.add(name)
                return name

    def write(ds: Dataset, series_number: int) -> Path:
        folder = dest / f"{series_number:03d}" if layout == "per-series" else dest
        folder.mkdir(parents=True, exist_ok=True)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / new_name()
        ds.save_as(path, enforce_file_format=True)
        return path

    def base(series_uid: str, number: int, description: str) -> Dataset:
        ds = Dataset()
        ds.SOPClassUID = MRImageStorage
        ds.Modality = "MR"
        ds.PatientName, ds.PatientID = "Anonymous^Kaggle", vol.patient_id[:64]
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", ""
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20010101", "120000", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, description
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer = "dicom_study.py"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelSpacing = [round(float(np.linalg.norm(col_step)), 6), round(float(np.linalg.norm(row_step)), 6)]
        ds.SliceThickness = sd
        return ds

    for number, seq in enumerate(sequences, start=2):
        channel, description, scale, tags = SEQUENCES[seq]
        series_uid = _uid(vol.patient_id, seq)
        study.series_uid[seq] = series_uid
        order = list(range(d))
        rng.shuffle(order)  # InstanceNumbers say nothing about position
        study.files[seq] = []
        for k in range(d):
            fr, fc = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
            rr, cc = to_k(fr, fc, h, w)
            frame = vol.image[k, rr, cc, channel].astype(np.uint16) * scale
            ds = base(series_uid, number, description)
            ds.SOPInstanceUID = _uid(vol.patient_id, seq, k)
            ds.InstanceNumber = order[k] + 1
            ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
            ds.ImagePositionPatient = [round(float(v), 6) for v in world(k, r0, c0)]
            ds.Rows, ds.Columns = fh, fw
            ds.MRAcquisitionType = "2D"
            for key, value in tags.items():
                setattr(ds, key, value)
            ds.PixelData = np.ascontiguousarray(frame).tobytes()
            study.files[seq].append(write(ds, number))
            study.sop_to_slice[ds.SOPInstanceUID] = (seq, vol.slice_numbers[k])
    if localizer:  # three sagittal 64 x 64 images of another grid: never a sequence of the patient
        uid = _uid(vol.patient_id, "localizer")
        for k in range(3):
            ds = base(uid, 1, "3-PLANE LOC")
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.SOPInstanceUID, ds.InstanceNumber = _uid(vol.patient_id, "localizer", k), k + 1
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            ds.ImagePositionPatient = [float(-10 + 10 * k), -120.0, 60.0]
            ds.Rows = ds.Columns = 64
            ds.PixelData = np.full((64, 64), 100, np.uint16).tobytes()
            write(ds, 1)
    return study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patient", type=Path, help="a Kaggle patient folder")
    parser.add_argument("dest", type=Path, help="the study folder to write (created)")
    parser.add_argument("--layout", choices=("one-folder", "per-series"), default="one-folder")
    parser.add_argument("--in-plane", choices=tuple(IN_PLANE), default="identity")
    parser.add_argument("--tilt", type=float, default=0.0, help="degrees of oblique tilt")
    parser.add_argument("--sequences", default="pre,flair,post")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    study = make_study(args.patient, args.dest, args.layout, args.in_plane, args.tilt,
                       tuple(s.strip() for s in args.sequences.split(",")), args.seed)
    print(f"wrote {sum(len(f) for f in study.files.values())} images of {len(study.files)} series to {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
