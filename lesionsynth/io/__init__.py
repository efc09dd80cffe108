"""All file I/O: reading and validating datasets, output layouts, atomic NIfTI and JSON writing."""

from .dataset import Case, CaseRef, DatasetSpec, open_dataset
from .nifti import load_nifti, save_nifti, voxel_spacing, write_bytes_atomic
from .validate import load_case

__all__ = ["Case", "CaseRef", "DatasetSpec", "load_case", "open_dataset", "load_nifti", "save_nifti",
           "voxel_spacing", "write_bytes_atomic"]
