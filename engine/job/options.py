"""Per-run input/output choices that ride along with the header limits.

``RunOptions`` is an :class:`readers.volume.SliceLimits` with more fields, so it travels wherever the
limits already travel (``PatientJob``, ``read_patient``, Ray workers) without changing those
signatures while other branches harden them; readers and writers read the fields they know
with ``getattr(limits, name, default)``, so a plain ``SliceLimits`` means "none chosen".
"""
from __future__ import annotations

from dataclasses import dataclass

from segengine.engine.core.errors import DataError
from segengine.engine.readers.volume import SliceLimits

SERIES_ROLES = ("flair", "pre", "post")


@dataclass(frozen=True)
class RunOptions(SliceLimits):
    series: tuple[tuple[str, str], ...] = ()  # DICOM: (role, SeriesInstanceUID or SeriesDescription or "none")
    spacing_mm: tuple[float, float, float] | None = None  # Kaggle slices: (slice, row, column) mm from --spacing
    save_probabilities: bool = False  # also write <id>_prob.nii.gz


def parse_series(values: tuple[str, ...] | list[str]) -> tuple[tuple[str, str], ...]:
    """``--series flair=<uid or description>`` (repeatable) as ((role, value), ...); one role once."""
    out: dict[str, str] = {}
    for v in values:
        role, sep, value = v.partition("=")
        role = role.strip().lower()
        if not sep or role not in SERIES_ROLES or not value.strip():
            raise DataError(f"--series {v!r}: expected ROLE=<SeriesInstanceUID or SeriesDescription>, "
                            f"ROLE one of {', '.join(SERIES_ROLES)} (pre/post may be 'none')")
        if role in out:
            raise DataError(f"--series {role} given twice")
        out[role] = value.strip()
    return tuple(out.items())


def parse_spacing(text: str | None) -> tuple[float, float, float] | None:
    """``--spacing SLICE,ROW,COLUMN`` in mm (the order of report.json's spacing_mm)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 < v < 100 for v in values):
        raise DataError(f"--spacing {text!r}: expected three positive millimetre values SLICE,ROW,COLUMN "
                        "(e.g. 3.3,0.94,0.94)")
    return values
