"""All file I/O: reading and validating datasets, output layouts, atomic image (NIfTI, MetaImage, NRRD) and
JSON writing."""

from .dataset import Case, CaseRef, DatasetSpec, open_dataset
from .images import IMAGE_ENDINGS, image_info, load_image, save_image
from .nifti import load_nifti, save_nifti, voxel_spacing, write_bytes_atomic
from .validate import load_case

__all__ = ["Case", "CaseRef", "DatasetSpec", "IMAGE_ENDINGS", "image_info", "load_case", "open_dataset",
           "load_image", "load_nifti", "save_image", "save_nifti", "voxel_spacing", "write_bytes_atomic"]
