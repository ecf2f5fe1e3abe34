"""Every typed error of segengine, in one leaf module (it imports nothing from the project).

``str(err)`` is always one line. The CLI maps them to exit codes: bad input, models and
backends exit 2; running out of disk or memory, or a patient locked by another process, exit 1.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data; ``str(err)`` is a one-line message that names the file."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class OutputError(OSError):
    """OUT is not writable, overlaps the input, or already holds results; one-line message."""


class PatientBusyError(OutputError):
    """Another process holds the patient's lock in OUT."""


class ForeignEntryError(OutputError):
    """An entry of OUT the engine did not make (a symbolic link, a hard link, a FIFO...): left alone."""


class NotRegularFileError(DataError):
    """A file the engine must read is a FIFO, device, socket or folder; reading it would block or never end."""


class NotAFolderError(DataError):
    pass


class NoSlicesError(DataError):
    pass


class UnreadableSliceError(DataError):
    pass


class SliceFormatError(DataError):
    pass


class SliceShapeError(DataError):
    pass


class SliceNumberingError(DataError):
    pass


class OrphanMaskError(DataError):
    pass


class PatientIdError(DataError):
    pass


class SliceLimitError(DataError):
    pass


class ResultsExistError(OutputError):
    """OUT/<patient> is complete and --overwrite was not given."""


class ResourceError(RuntimeError):
    """The machine ran out of something (disk, memory) while a job ran; one-line message, exit 1."""


class DiskFullError(ResourceError):
    pass


class DicomError(DataError):
    """A DICOM study that cannot be used; one line naming the file, series or study."""


class NnunetError(DataError):
    """An nnU-Net-named case that cannot be used; one line naming the file."""


class MemoryBudgetError(SliceLimitError):
    """A patient whose headers claim more memory than ``--max-memory`` allows; refused before decoding."""


class ModelError(ValueError):
    """A model file is missing, corrupt, or does not match its card; one-line message."""


class EmptyVolumeError(ValueError):
    """The volume has no voxel above the 10% threshold, so there is nothing to crop to."""


class VerdictError(ModelError):
    """A verdict that cannot be recorded (not against torch, stale weights or export); one line."""


class BackendUnavailable(RuntimeError):
    """The backend's runtime (package, GPU, export file) is missing here; one-line message."""


class ExportError(RuntimeError):
    """An export could not be produced or did not verify; one-line message."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class ShapeMismatchError(ExportError):
    """An output (or input) shape differs from what the source model gives (or takes)."""

    def __init__(self, what: str, expected, got, kind: str = "output"):
        self.expected = tuple(expected)
        self.got = tuple(got)
        super().__init__(f"{what}: {kind} shape mismatch: expected {self.expected}, got {self.got}")


class ToleranceExceededError(ExportError):
    """The exported model's outputs differ from its source's by more than the tolerance."""

    def __init__(self, what: str, value: float, tolerance: float, metric: str = "max abs diff", cmp: str = "<="):
        self.value = float(value)
        self.tolerance = float(tolerance)
        self.metric = metric
        super().__init__(f"{what}: {metric} {self.value:.3g} is outside the tolerance ({metric} {cmp} {self.tolerance:.3g})")


class ExportToolMissing(ExportError):
    """A tool the export needs (TensorRT, a CUDA GPU, an exporter backend) is not available here."""


class NiftiError(DataError):
    """A NIfTI input that cannot be used; one line naming the file."""


class TritonRepositoryError(ExportError):
    """The generated repository does not parse as Triton's ModelConfig or breaks its layout."""


class ConverterMissing(ExportToolMissing):
    """onnxconverter-common (the float16 converter) is not installed."""


class CvInputError(ValueError):
    """A CV run folder or cv.json that cannot be compared; one line."""


class FoldError(ValueError):
    """Fold files are missing, inconsistent, or do not match the train list."""
