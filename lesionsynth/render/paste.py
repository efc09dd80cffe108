"""Paste one bank lesion into a case: one resampling of all channels and the mask, intensity matching,
brightness and noise, feathered blending. Pure functions of (case arrays, lesion arrays, parameters)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..geometry import spacing_of
from .transform import elastic_field, source_coordinates, source_from_target, target_box


@dataclass
class Patch:
    """New values for a box of a case; `core` marks the voxels that become lesion."""

    box: tuple[slice, ...]
    channels: np.ndarray   # (C, X, Y, Z) float32
    label: np.ndarray      # (X, Y, Z) uint8
    core: np.ndarray       # (X, Y, Z) bool

    def apply(self, channels: np.ndarray, label: np.ndarray) -> None:
        channels[(slice(None),) + self.box] = self.channels
        label[self.box] = self.label


@dataclass(frozen=True)
class PasteSettings:
    """Fixed (not random) settings of pasting."""

    is_ct: tuple[bool, ...]
    feather_mm: float = 0.5
    backend: str = "numpy"


def _local_stats(channel: np.ndarray, tissue: np.ndarray) -> tuple[float, float]:
    """(median, noise sd) of a channel over local normal tissue."""
    from ..bank import noise_sd

    if tissue.sum() < 20:
        return float("nan"), 0.0
    return float(np.median(channel[tissue])), noise_sd(channel, tissue)


def resample_lesion(src_image: np.ndarray, src_mask: np.ndarray, src_affine, src_centre, tgt_affine, tgt_shape,
                    op: dict) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
    """Resample the lesion's channels and mask onto the target box: (box, channels, soft mask) or None."""
    control = np.asarray(op["elastic_mm"], dtype=np.float32)
    pad = float(np.abs(control).max()) if control.size else 0.0
    box = target_box(src_mask.shape, src_affine, src_centre, tgt_affine, op["centre_mm"], op["flip"],
                     op["rotation_deg"], op["scale"], pad, tgt_shape)
    if box is None:
        return None
    m = source_from_target(src_affine, src_centre, tgt_affine, op["centre_mm"], op["flip"],
                           op["rotation_deg"], op["scale"])
    shape = tuple(s.stop - s.start for s in box)
    field = elastic_field(control, shape) if control.size else None
    coords = source_coordinates(box, m, field, tgt_affine)
    soft = ndimage.map_coordinates(np.asarray(src_mask, dtype=np.float32), coords, order=1, mode="constant",
                                   cval=0.0, prefilter=False)
    channels = np.empty((src_image.shape[0],) + shape, dtype=np.float32)
    for c in range(src_image.shape[0]):
        ndimage.map_coordinates(np.asarray(src_image[c]), coords, output=channels[c], order=1, mode="nearest",
                                prefilter=False)
    return box, channels, soft


def blend_lesion(dest: np.ndarray, dest_label: np.ndarray, lesion: np.ndarray, soft: np.ndarray, tissue: np.ndarray,
                 spacing, src_stats: list[dict], op: dict, settings: PasteSettings) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-match, brighten, add noise and alpha-blend resampled lesion channels into `dest` (copies)."""
    alpha = np.clip(ndimage.gaussian_filter(soft, sigma=settings.feather_mm / np.asarray(spacing)), 0.0, 1.0)
    out = np.empty_like(dest)
    noise_rng = np.random.default_rng(int(op["noise_seed"]))
    noise = noise_rng.standard_normal(size=soft.shape, dtype=np.float32)
    for c in range(dest.shape[0]):
        dest_ref, dest_noise = _local_stats(dest[c], tissue)
        src_ref = src_stats[c]["shell"]["median"]
        src_ref = float(src_stats[c]["lesion"]["median"]) if src_ref is None else float(src_ref)
        values = lesion[c]
        if settings.is_ct[c] or not np.isfinite(dest_ref):
            ref = src_ref  # CT keeps Hounsfield units
        else:
            scale_ok = src_ref > 1e-6 and dest_ref > 1e-6
            values = values * np.float32(dest_ref / src_ref) if scale_ok else values + np.float32(dest_ref - src_ref)
            ref = dest_ref
        values = np.float32(ref) + np.float32(op["brightness"][c]) * (values - np.float32(ref))
        values = values + np.float32(op["noise_gain"] * dest_noise) * noise
        out[c] = dest[c] + alpha * (values - dest[c])
    label = dest_label.copy()
    core = soft >= 0.5
    label[core] = int(op["label_value"])
    return out, label


def paste_patch(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, lesion_image: np.ndarray,
                lesion_mask: np.ndarray, lesion_meta: dict, op: dict, lesion_labels, region_fn,
                settings: PasteSettings) -> Patch | None:
    """Everything a paste changes, as a Patch (the case arrays are not modified); None if it misses the volume.

    `region_fn(label_crop, start)` gives the allowed-region mask of a box, used to pick local tissue.
    """
    src_affine = np.asarray(lesion_meta["affine"], dtype=np.float64)
    resampled = resample_lesion(lesion_image, lesion_mask, src_affine, lesion_meta["centroid_mm"], affine,
                                label.shape, op)
    if resampled is None:
        return None
    box, lesion, soft = resampled
    core = soft >= 0.5
    if not core.any():
        return None
    dest = channels[(slice(None),) + box]
    dest_label = label[box]
    start = [s.start for s in box]
    tissue = (soft < 0.02) & ~np.isin(dest_label, lesion_labels) & region_fn(dest_label, start)
    new_channels, new_label = blend_lesion(dest, dest_label, lesion, soft, tissue, spacing_of(affine),
                                           lesion_meta["stats"], op, settings)
    return Patch(box, new_channels, new_label, core)
