"""Tensors in and out of the lesion work: any dtype a loader produces, on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from ..io.output import stored_values


def to_numpy(data) -> np.ndarray:
    """A tensor (a MetaTensor too) or an array as a numpy array, without a copy where none is needed."""
    if isinstance(data, torch.Tensor):
        data = data.detach().as_subclass(torch.Tensor)
        if data.dtype in (torch.bfloat16,):  # numpy has no bfloat16
            data = data.float()
        return data.cpu().numpy()
    return np.asarray(data)


def torch_dtype(reference) -> torch.dtype:
    """The dtype of a tensor, or of an array as torch names it."""
    if isinstance(reference, torch.Tensor):
        return reference.dtype
    return torch.from_numpy(np.zeros(0, dtype=np.asarray(reference).dtype)).dtype


def channels_like(values: np.ndarray, reference) -> torch.Tensor:
    """Float32 channels as a contiguous tensor of `reference`'s dtype: floats cast, integers rounded and
    clipped as `generate` writes an integer channel (`io.output.stored_values`)."""
    dtype = torch_dtype(reference)
    if dtype.is_floating_point:
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    return torch.from_numpy(np.ascontiguousarray(stored_values(values, torch.zeros(0, dtype=dtype).numpy().dtype)))


def label_like(label: np.ndarray, reference) -> torch.Tensor:
    """A uint8 label (1, X, Y, Z) as a contiguous tensor of `reference`'s dtype."""
    return torch.from_numpy(np.ascontiguousarray(label)).to(torch_dtype(reference))
