"""Tensors in and out of the lesion work: any dtype a loader produces; the work runs on the CPU and its results go
back to the input's device."""

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
    """Float32 channels as a contiguous tensor of `reference`'s dtype and device: floats cast, integers
    rounded and clipped as `generate` writes an integer channel (`io.output.stored_values`)."""
    dtype = torch_dtype(reference)
    if not dtype.is_floating_point:
        values = stored_values(values, torch.zeros(0, dtype=dtype).numpy().dtype)
    return torch.from_numpy(np.ascontiguousarray(values)).to(device=device_of(reference), dtype=dtype)


def label_like(label: np.ndarray, reference) -> torch.Tensor:
    """A uint8 label (1, X, Y, Z) as a contiguous tensor of `reference`'s dtype and device."""
    return torch.from_numpy(np.ascontiguousarray(label)).to(device=device_of(reference), dtype=torch_dtype(reference))


def device_of(reference) -> torch.device:
    return reference.device if isinstance(reference, torch.Tensor) else torch.device("cpu")
