"""The one place that picks how a pasted lesion is resampled: numpy/scipy on the CPU, or torch on a device."""

from __future__ import annotations

from functools import partial

from .paste import resample_on_cpu


def lesion_resampler(device: str = "cpu", torch_on_cpu: bool = False):
    """The resampling function `paste.paste_patch` is given for `device` (as `torch_backend.resolve_device`
    returns it): "cpu" is the numpy/scipy path, any other device the torch twin on that device.
    `torch_on_cpu` runs the torch twin on the CPU (its tests, where no GPU is)."""
    if device == "cpu" and not torch_on_cpu:
        return resample_on_cpu
    from .torch_backend import resample_on_torch  # imports torch itself only when called

    return partial(resample_on_torch, device=device)
