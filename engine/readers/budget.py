"""The memory a patient will take, estimated from its file headers before anything is decoded.

The side and slice limits (``readers.volume.SliceLimits``) bound each number alone, yet within them one
patient could still take 9 GB (512 slices of 1024 x 1024) and a float64 NIfTI 4 GB. So every
patient is also checked against a byte budget, ``SliceLimits.max_memory`` (``--max-memory``,
default ``io.DEFAULT_MAX_MEMORY_GB``), from what its headers claim:

- the decoded input: slices x height x width x channels x bytes per sample (a slice file holds
  one page; TIFF pages, NIfTI dtype and scaling included);
- the pipeline's working arrays per native pixel (:data:`WORK_BYTES_PER_PIXEL`: the cropped
  volume in uint8 and float32, the probabilities in float32, the mask);
- the model-grid arrays per slice (:data:`GRID_BYTES_PER_SLICE`: normalized slices, the 2.5D
  model input with its neighbours as channels, the grid probabilities).

A batch holds at most one patient per stage (``job.stages``: read, infer, write), so its
peak stays within a few budgets whatever the patients.
"""
from __future__ import annotations

import math

from segengine.engine.core.errors import MemoryBudgetError

GB = 10**9


WORK_BYTES_PER_PIXEL = 3 + 12 + 4 + 1  # crop as uint8 (3 channels) and float32, native probabilities, mask


GRID_SIDE, GRID_CHANNELS = 256, 9  # the shipped model's grid; a 2.5D input has 3 x 3 channels


GRID_BYTES_PER_SLICE = GRID_SIDE * GRID_SIDE * 4 * (3 + GRID_CHANNELS + 1)  # normalized, model input, probabilities


def patient_bytes(slices: int, pixels: int, decoded_bytes: int) -> int:
    """Bytes a patient takes through the pipeline: ``pixels`` native pixels over ``slices`` slices,
    ``decoded_bytes`` of decoded input."""
    return int(decoded_bytes + pixels * WORK_BYTES_PER_PIXEL + slices * GRID_BYTES_PER_SLICE)


def check_memory(source, slices: int, pixels: int, decoded_bytes: int, max_memory: int, what: str) -> int:
    """Refuse a patient over the budget with one line naming the limit and how to raise it."""
    need = patient_bytes(slices, pixels, decoded_bytes)
    if need > max_memory:
        raise MemoryBudgetError(f"{source}: needs about {need / GB:.1f} GB of memory ({what}), more than the limit of "
                                f"{max_memory / GB:g} GB per patient; raise it with --max-memory "
                                f"{math.ceil(need / GB * 10) / 10:g} if this machine has the memory")
    return need
