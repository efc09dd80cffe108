"""Optional torch backend (CPU or CUDA) for the one resampling of a pasted lesion and for full-volume warps.

Same inputs, same outputs and the same maths as the numpy path (`paste.resample_lesion`): the 4x4 host
maths (`target_box`, `source_from_target`) and the channels' spline coefficients (`paste.paste_coefficients`,
anti-aliasing blur included) are shared; the elastic field, the source coordinates, the mask's linear and the
channels' cubic B-spline interpolation run on the device. Only the lesion crop goes to the device and only the
target box comes back. torch is imported lazily: the package imports and runs without it.

Agreement with scipy (float32 everywhere, see tests/test_torch_backend.py): lesion channels within ~6e-6 of
their range, soft mask within ~1e-5 (except exact ties on a crop face, where scipy's mode="constant" jumps
from the edge value to 0), full-volume warps within ~1e-6 of the range, labels equal but at rounding ties.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..geometry import spacing_of
from .paste import (SPLINE_PAD, Resampled, antialiased_crop, crop_to_support, estimated_landing, mask_voxels,
                    paste_coefficients)
from .transform import elastic_field, elastic_weights, paste_geometry, source_coordinates, source_from_target

DEVICES = ("cpu", "cuda", "auto")
# In-bounds slack of the mask test, in grid units (~8 float32 ulps at 1.0, ~1e-5 voxel for a 30-voxel crop):
# float32 grid maths is off by a few ulps, so a point that numpy puts exactly on the crop's last voxel (any
# axis-aligned transform) must still count as inside, as scipy's mode="constant" counts it.
EDGE_SLACK = 1e-6


def _torch():
    """The torch module (imported on first use)."""
    import torch

    return torch


def torch_available() -> bool:
    """True when torch can be imported."""
    try:
        _torch()
    except Exception:  # ImportError, or a broken install (OSError from its shared libraries)
        return False
    return True


def _cuda_ready() -> bool:
    return torch_available() and bool(_torch().cuda.is_available())


def resolve_device(name: str) -> str:
    """'cpu' (the numpy path) or 'cuda' for a --device value of cpu | cuda | auto."""
    name = str(name).strip().lower()
    if name not in DEVICES:
        raise InputError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu":
        return "cpu"
    if name == "auto":
        return "cuda" if _cuda_ready() else "cpu"
    if not torch_available():
        raise InputError("--device cuda: torch is not installed (pip install 'lesionsynth[cuda]')")
    torch = _torch()
    if not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        raise InputError(f"--device cuda: torch {torch.__version__} {why}; use --device cpu or auto")
    return "cuda"


# ----------------------------------------------------------------------------------------------- device maths

def _grid_affine(src_from_tgt: np.ndarray, start, src_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, b, s): grid_sample coordinates g = b + A @ i for box-relative target indices i, per-axis scale s.

    Rows come out reversed, (z, y, x) = (W, H, D), because grid_sample's last grid dimension indexes the
    input's axes from the last to the first. Voxel c maps to 2c/(n-1) - 1 (align_corners=True); host float64.
    """
    m = np.asarray(src_from_tgt, dtype=np.float64)
    s = 2.0 / np.maximum(np.asarray(src_shape, dtype=np.float64) - 1.0, 1.0)
    offset = m[:3, 3] + m[:3, :3] @ np.asarray(start, dtype=np.float64)  # coordinate of the box's first voxel
    return (s[:, None] * m[:3, :3])[::-1].copy(), (s * offset - 1.0)[::-1].copy(), s[::-1].copy()


def _elastic_grid_units(control_mm: np.ndarray, src_from_tgt: np.ndarray, tgt_affine, s: np.ndarray) -> np.ndarray:
    """Control displacements (K, K, K, 3) mapped from target world mm to grid_sample units, reversed rows.

    The spline interpolation is linear, so applying L = M·A_tgt⁻¹ (see `source_coordinates`) and the
    normalisation to the K³ control values equals applying them to the interpolated field.
    """
    m = np.asarray(src_from_tgt, dtype=np.float64)
    lin = m[:3, :3] @ np.linalg.inv(np.asarray(tgt_affine, dtype=np.float64)[:3, :3])
    lin = s[:, None] * lin[::-1]
    return np.asarray(control_mm, dtype=np.float64) @ lin.T


def _spline_field(control, weights, device):
    """Separable cubic-spline interpolation of a (K, K, K, 3) device tensor with per-axis (n, K) weights:
    (X, Y, Z, 3)."""
    torch = _torch()
    wx, wy, wz = (torch.as_tensor(np.asarray(w, dtype=np.float32), device=device) for w in weights)
    # plain fp32 matmuls (exact unless the caller enabled TF32 globally on CUDA); small until the last one
    field = torch.einsum("xi,ijkc->xjkc", wx, control)
    field = torch.einsum("yj,xjkc->xykc", wy, field)
    return torch.matmul(wz, field)  # (Z, K) @ (X, Y, K, 3) -> (X, Y, Z, 3)


def _sample_grid(shape, a, b, control_grid, weights, device):
    """grid_sample grid (1, X, Y, Z, 3) for a box of `shape`: affine part plus the elastic field."""
    torch = _torch()
    a_t = torch.as_tensor(a, dtype=torch.float32, device=device)
    b_t = torch.as_tensor(b, dtype=torch.float32, device=device)
    ix, iy, iz = (torch.arange(int(n), dtype=torch.float32, device=device) for n in shape)
    plane = (ix[:, None, None, None] * a_t[:, 0] + b_t) + iy[None, :, None, None] * a_t[:, 1]  # (X, Y, 1, 3)
    if control_grid is None:
        grid = plane + iz[None, None, :, None] * a_t[:, 2]  # the only full-size allocation
    else:
        control = torch.as_tensor(np.asarray(control_grid, dtype=np.float32), device=device)
        grid = _spline_field(control, weights, device)
        grid += plane
        grid += iz[None, None, :, None] * a_t[:, 2]
    return grid.unsqueeze(0)


def _inside(grid, src_shape):
    """True where the sampled point lies within [0, n-1] on every source axis (grid in reversed order)."""
    if min(src_shape) > 1:  # every axis spans [-1, 1]
        return grid.abs().amax(dim=-1) <= 1.0 + EDGE_SLACK
    hi = [-1.0 + 2.0 * (n - 1) / max(n - 1, 1) + EDGE_SLACK for n in src_shape][::-1]  # -1 for a 1-voxel axis
    torch = _torch()
    upper = torch.as_tensor(hi, dtype=grid.dtype, device=grid.device)
    return ((grid >= -1.0 - EDGE_SLACK) & (grid <= upper)).all(dim=-1)


def _to_device(arrays, device):
    """Stack host arrays of one shape into a (1, N, X, Y, Z) float32 device tensor (one allocation)."""
    torch = _torch()
    out = torch.empty((1, len(arrays)) + tuple(arrays[0].shape), dtype=torch.float32, device=device)
    for i, arr in enumerate(arrays):
        out[0, i].copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
    return out


def _support(soft, reach):
    """Voxels within `reach` (per-axis voxels) of soft > 0, like ndimage.binary_dilation with a box.

    Exactly soft > 0 as in the numpy path: for any rotated op both paths give the same zeros (measured: no
    differing voxel in 60 random pastes; any threshold > 0 makes dozens differ). Only on axis-aligned grids
    can float32 noise make soft ~1e-6 where numpy has 0; those voxels just get real lesion values, alpha ≈ 0.
    """
    support = soft > 0
    for axis, r in enumerate(int(v) for v in reach):  # a box is separable: grow along one axis at a time
        seed = support.clone()
        for step in range(1, min(r, support.shape[axis] - 1) + 1):
            support.narrow(axis, step, support.shape[axis] - step).logical_or_(
                seed.narrow(axis, 0, support.shape[axis] - step))
            support.narrow(axis, 0, support.shape[axis] - step).logical_or_(
                seed.narrow(axis, step, support.shape[axis] - step))
    return support


def _cubic_bspline(coefficients, grid, src_shape):
    """Cubic B-spline values (C, X, Y, Z) of padded coefficients (1, C, ...; `paste.spline_coefficients`) at the
    points of a grid_sample grid over the unpadded crop: the numpy path's `map_coordinates(order=3)`.

    Each 1-D cubic B-spline is two linear reads at shifted positions (weights g0, g1), so the 64-tap spline
    is 8 trilinear reads, done as one grid_sample over 8 stacked grids."""
    torch = _torch()
    n = torch.as_tensor([float(v) for v in src_shape][::-1], dtype=grid.dtype, device=grid.device)
    padded = n + 2 * SPLINE_PAD
    # voxel coordinates in the crop, clipped to it (edge values beyond, as numpy), then in the padded array
    u = torch.minimum(torch.clamp((grid + 1.0) * (n - 1.0) / 2.0, min=0.0), n - 1.0) + SPLINE_PAD
    base = torch.floor(u)
    t = u - base
    t2, t3 = t * t, t * t * t
    w0, w1 = (1.0 - t) ** 3 / 6.0, (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w2, w3 = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0, t3 / 6.0
    g0, g1 = w0 + w1, w2 + w3
    h0 = base - 1.0 + w1 / g0
    h1 = base + 1.0 + w3 / torch.clamp(g1, min=1e-12)
    grids, weights = [], []
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):  # components in grid order (z, y, x)
                pick = [(h0, g0), (h1, g1)]
                pos = torch.stack([pick[(a, b, c)[k]][0][..., k] for k in range(3)], dim=-1)
                grids.append(2.0 * pos / (padded - 1.0) - 1.0)
                weights.append(pick[a][1][..., 0] * pick[b][1][..., 1] * pick[c][1][..., 2])
    stacked = torch.cat(grids, dim=1)  # (1, 8X, Y, Z, 3)
    reads = torch.nn.functional.grid_sample(coefficients, stacked, mode="bilinear", padding_mode="border",
                                            align_corners=True)[0]  # (C, 8X, Y, Z)
    reads = reads.reshape(reads.shape[0], 8, -1, *reads.shape[2:])
    return (reads * torch.stack(weights, dim=1)[0]).sum(dim=1)


def resample_lesion_torch(src_image: np.ndarray, src_mask: np.ndarray, src_affine, src_centre, tgt_affine,
                          tgt_shape, op: dict, src_box=None, support_mm: float = 0.0, device: str = "cuda",
                          prepared=None, coefficients=None, linear: bool = False
                          ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
    """torch twin of `paste.resample_lesion` (same arguments, plus `device`): (box, channels, soft) or None.
    `prepared` (a `paste.PreparedMask` of this mask) supplies the mask's voxels when a worker has them, and
    `coefficients` (`paste.spline_coefficients` of the channels) the spline coefficients. `linear`: the
    channels come twice, (2C, X, Y, Z): cubic, then linearly interpolated (`paste.sample_channels_linear`).

    channels (C, X, Y, Z) and soft (X, Y, Z) are float32; channels are zero farther than `support_mm`
    from soft > 0, as in the numpy path.
    """
    torch = _torch()
    points = prepared.points if prepared is not None else mask_voxels(src_mask, src_box)
    geo = paste_geometry(src_mask.shape, src_box, src_affine, src_centre, tgt_affine, tgt_shape, op, support_mm,
                         points)
    if geo is None or not len(points):
        return None
    control, extent, box, m, shape = geo.control, geo.extent, geo.box, geo.src_from_tgt, geo.shape
    a, b, s = _grid_affine(m, [sl.start for sl in box], src_mask.shape)
    control_grid = _elastic_grid_units(control, m, tgt_affine, s) if control.size else None
    reach = np.ceil(support_mm / spacing_of(tgt_affine)).astype(int)
    crop = antialiased_crop(src_image, src_affine, tgt_affine, op)
    coeffs = paste_coefficients(src_image, src_affine, tgt_affine, op, coefficients, crop)
    with torch.inference_mode():
        mask = _to_device([src_mask], device)
        weights = elastic_weights(box, extent, control.shape[0]) if control.size else None
        grid = _sample_grid(shape, a, b, control_grid, weights, device)
        # The mask needs scipy mode="constant": exactly 0 for any point outside [0, n-1], with no interpolation
        # towards the edge. padding "zeros" would NOT match that (it blends the edge voxel with 0 over the last
        # voxel outside, e.g. 0.5·edge at -0.5); multiplying the border-padded mask by the in-bounds test of
        # the same grid is exact.
        soft = torch.nn.functional.grid_sample(mask, grid, mode="bilinear", padding_mode="border",
                                               align_corners=True)[0, 0]
        soft *= _inside(grid[0], src_mask.shape)
        channels = _cubic_bspline(_to_device(list(coeffs), device), grid, src_mask.shape)
        if linear:  # border padding over the unpadded crop: edge values beyond it, as numpy's clipped reads
            lines = torch.nn.functional.grid_sample(_to_device(list(crop), device), grid, mode="bilinear",
                                                    padding_mode="border", align_corners=True)[0]
            channels = torch.cat([channels, lines])
        channels.masked_fill_(~_support(soft, reach), 0.0)
        channels, soft = channels.cpu().numpy(), soft.cpu().numpy()
    return crop_to_support(box, channels, soft, support_mm, tgt_affine)


def resample_on_torch(lesion_image: np.ndarray, prepared, src_affine, src_centre, tgt_affine, tgt_shape, op: dict,
                      support_mm: float, land_check=None, coefficients=None, device: str = "cuda"
                      ) -> Resampled | None:
    """torch twin of `paste.resample_on_cpu` (same arguments, plus `device`): the channels and the mask are
    resampled on the device at once (`resample_lesion_torch`). The landing check is the numpy path's, so that
    both paths plan alike; the point mapper (for the label's anti-aliasing) is the numpy path's too."""
    landing = None
    if land_check is not None:
        landing = estimated_landing(prepared, src_affine, src_centre, tgt_affine, tgt_shape, op, support_mm)
        if landing is None or not land_check(landing[2]):
            return None
    resampled = resample_lesion_torch(lesion_image, prepared.mask, src_affine, src_centre, tgt_affine, tgt_shape,
                                      op, prepared.src_box, support_mm, device=device, prepared=prepared,
                                      coefficients=coefficients, linear=True)
    if resampled is None:
        return None
    box, both, soft = resampled
    n = both.shape[0] // 2
    cubic, lines = both[:n].reshape(n, -1), both[n:].reshape(n, -1)

    def mapper():
        known = landing or estimated_landing(prepared, src_affine, src_centre, tgt_affine, tgt_shape, op, support_mm)
        return known[1]

    def lesion_values(idx, linear=None):
        if linear is None:
            return cubic[:, idx]
        return np.where(linear, lines[:, idx], cubic[:, idx])

    return Resampled(box, soft, lesion_values, mapper)


# ------------------------------------------------------------------------------------------ full-volume warps

def volume_map(affine, shape, angles_deg, scale) -> np.ndarray:
    """4x4 target→source voxel map of a rotation/scale about the volume centre (same grid in and out)."""
    centre_vox = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    aff = np.asarray(affine, dtype=np.float64)
    centre = aff[:3, :3] @ centre_vox + aff[:3, 3]
    return source_from_target(aff, centre, aff, centre, (False, False, False), angles_deg, scale)


def _volume_extent(shape) -> tuple[np.ndarray, np.ndarray]:
    """The whole volume as an extent: control points spread from face to face."""
    return np.full(3, -0.5), np.asarray(shape, dtype=np.float64) - 0.5


def warp_volume_numpy(channels: np.ndarray, label: np.ndarray, affine, control_mm, angles_deg, scale
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Warp a whole case (rotation/scale about its centre + elastic): channels linear, label nearest.

    Both use scipy mode="nearest" at the volume border, so image and label stay consistent there.
    """
    shape = tuple(label.shape)
    control = np.asarray(control_mm, dtype=np.float32)
    m = volume_map(affine, shape, angles_deg, scale)
    box = tuple(slice(0, n) for n in shape)
    field = elastic_field(control, elastic_weights(box, _volume_extent(shape), control.shape[0])) if control.size else None
    coords = source_coordinates(box, m, field, affine)
    del field
    out = np.empty((channels.shape[0],) + shape, dtype=np.float32)
    for c in range(channels.shape[0]):
        ndimage.map_coordinates(np.asarray(channels[c], dtype=np.float32), coords, output=out[c], order=1,
                                mode="nearest", prefilter=False)
    new_label = ndimage.map_coordinates(np.asarray(label), coords, order=0, mode="nearest", prefilter=False)
    return out, new_label.astype(label.dtype, copy=False)


def warp_volume_torch(channels: np.ndarray, label: np.ndarray, affine, control_mm, angles_deg, scale,
                      device: str = "cuda") -> tuple[np.ndarray, np.ndarray]:
    """torch twin of `warp_volume_numpy` (one grid; channels bilinear, label nearest; border padding)."""
    torch = _torch()
    shape = tuple(label.shape)
    control = np.asarray(control_mm, dtype=np.float32)
    m = volume_map(affine, shape, angles_deg, scale)
    a, b, s = _grid_affine(m, (0, 0, 0), shape)
    control_grid = _elastic_grid_units(control, m, affine, s) if control.size else None
    fn = torch.nn.functional.grid_sample
    with torch.inference_mode():
        weights = (elastic_weights(tuple(slice(0, n) for n in shape), _volume_extent(shape), control.shape[0])
                   if control.size else None)
        grid = _sample_grid(shape, a, b, control_grid, weights, device)
        data = _to_device([channels[c] for c in range(channels.shape[0])], device)
        out = fn(data, grid, mode="bilinear", padding_mode="border", align_corners=True)[0].cpu().numpy()
        del data
        lab = _to_device([label], device)  # exact for integer labels below 2**24
        new_label = fn(lab, grid, mode="nearest", padding_mode="border", align_corners=True)[0, 0]
        new_label = new_label.round().cpu().numpy().astype(label.dtype)
    return out, new_label
