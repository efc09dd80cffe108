"""The bank's common space: every case registered (affine, SimpleITK) to one reference, the transforms kept
as world matrices, and maps (likelihood, tissue prior) carried between the reference and any case.

Native-space datasets (each patient in its own scanner space) share no world frame, so the lesion likelihood
map is accumulated in a reference space: a user template, or the dataset case closest to the others. Each
case's transform `ref_from_case` (4x4, world mm RAS: a point of the case → the same anatomy in the reference)
is stored in the bank; `generate` only composes matrices, it never registers.

Registration works on small images: each case's first channel averaged over blocks of about
REGISTRATION_MM, scaled by its own robust range, with its body foreground as the metric's mask. Mattes
mutual information copes with different contrasts and gains. ITK runs on one thread with a fixed sampling
seed, so a registration gives the same matrix on every run and with any `--jobs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .geometry import apply_affine, coarse_stride, spacing_of

#: Block size (mm) of the images registration works on.
REGISTRATION_MM = 4.0
#: A registration whose foreground overlap (Dice) with the reference is below this is called poor.
POOR_OVERLAP = 0.80
#: Foreground overlap in world space above which `--space auto` takes the cases as already aligned.
ALIGNED_OVERLAP = 0.85
SPACES = ("auto", "world", "register")

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # NIfTI world is RAS, ITK's physical space LPS (the map is its own inverse)


@dataclass
class RegImage:
    """A case reduced for registration: block-averaged channel scaled to [0, 1], its foreground, its grid."""

    data: np.ndarray        # float32 (X, Y, Z)
    foreground: np.ndarray  # bool, same grid
    affine: np.ndarray      # voxel → world (mm, RAS)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)


def block_mean(channel: np.ndarray, affine: np.ndarray, target_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Average over blocks of about `target_mm` (whole blocks only) and the blocks' grid affine."""
    stride = np.array(coarse_stride(spacing_of(affine), target_mm))
    n = np.array(channel.shape) // stride
    if np.any(n < 2):
        stride = np.maximum(1, np.minimum(stride, np.array(channel.shape) // 2))
        n = np.array(channel.shape) // stride
    cut = channel[tuple(slice(0, int(k * s)) for k, s in zip(n, stride))].astype(np.float32)
    blocks = cut.reshape(n[0], stride[0], n[1], stride[1], n[2], stride[2]).mean(axis=(1, 3, 5), dtype=np.float32)
    centre = np.eye(4)
    centre[:3, 3] = (stride - 1) / 2.0
    return blocks, np.asarray(affine, dtype=np.float64) @ centre @ np.diag([*stride.astype(np.float64), 1.0])


def registration_image(channel: np.ndarray, affine: np.ndarray, channel_name: str,
                       target_mm: float = REGISTRATION_MM) -> RegImage:
    """The small, normalised image a case is registered with (see the module docstring)."""
    from .prior import body_foreground

    data, grid = block_mean(channel, affine, target_mm)
    lo, hi = np.percentile(data, [1, 99.5])
    scaled = np.clip((data - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)
    return RegImage(scaled, body_foreground(data, channel_name), grid)


def _to_sitk(array: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of a (X, Y, Z) array on the grid of a NIfTI affine (orthonormalised directions)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    lps = _LPS @ np.asarray(affine, dtype=np.float64)
    spacing = spacing_of(affine)
    u, _, vt = np.linalg.svd(lps[:3, :3] / spacing)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in (u @ vt).ravel()])
    return image


def _matrix_of(transform) -> np.ndarray:
    """The 4x4 world (RAS) matrix of an ITK transform that is affine in LPS (any rigid/affine kind)."""
    probes = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0]])
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in probes])
    lps = np.eye(4)
    lps[:3, :3] = (mapped[1:] - mapped[0]).T / 100.0
    lps[:3, 3] = mapped[0]
    return _LPS @ lps @ _LPS


def foreground_overlap(fixed: RegImage, moving: RegImage, moving_from_fixed: np.ndarray) -> float:
    """Dice of the fixed foreground and the moving foreground mapped onto the fixed grid (nearest voxel), over
    the part of the fixed grid that the moving field of view covers (a shorter scan is not a poor one)."""
    idx = np.argwhere(np.ones(fixed.shape, dtype=bool))
    world = apply_affine(moving_from_fixed @ fixed.affine, idx)
    vox = np.rint(apply_affine(np.linalg.inv(moving.affine), world)).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.array(moving.shape)), axis=1)
    mapped = np.zeros(len(idx), dtype=bool)
    mapped[inside] = moving.foreground[tuple(vox[inside].T)]
    a, b = fixed.foreground.reshape(-1) & inside, mapped  # within the fields of view both cover
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.count_nonzero(a & b)) / total if total else 0.0


def register(fixed: RegImage, moving: RegImage, iterations: int = 120, start: list | None = None
             ) -> tuple[np.ndarray, float]:
    """Affine registration of `moving` to `fixed`: (moving_from_fixed 4x4 world matrix, final MI metric).

    Rigid first (centred on the foregrounds' centres of mass), then a full affine, each over two resolution
    levels, Mattes mutual information on the fixed foreground (dilated). `start`, a list, receives the
    starting matrix.
    """
    import SimpleITK as sitk

    # one thread: ITK's metrics sum per-thread partial results, so a thread count changes the last bits
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    f_img, m_img = _to_sitk(fixed.data, fixed.affine), _to_sitk(moving.data, moving.affine)
    f_mask = _to_sitk(_grow(fixed.foreground).astype(np.uint8), fixed.affine)
    current = sitk.CenteredTransformInitializer(
        _to_sitk(fixed.foreground.astype(np.float32), fixed.affine),
        _to_sitk(moving.foreground.astype(np.float32), moving.affine),
        sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    if start is not None:
        start.append(_matrix_of(current))
    metric = float("nan")
    for rigid in (True, False):
        method = sitk.ImageRegistrationMethod()
        method.SetNumberOfThreads(1)
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.3, 12345)
        method.SetMetricFixedMask(f_mask)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3,
                                                        numberOfIterations=iterations, relaxationFactor=0.6,
                                                        gradientMagnitudeTolerance=1e-6)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([2, 1])
        method.SetSmoothingSigmasPerLevel([1.0, 0.0])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        stage = _stage_transform(rigid, current)
        method.SetInitialTransform(stage, inPlace=True)
        method.Execute(f_img, m_img)
        metric = float(method.GetMetricValue())
        current = stage
    return _matrix_of(current), metric


def _stage_transform(rigid: bool, current):
    """An Euler3D (`rigid`) or Affine transform started from the transform `current`: same centre, and the
    same mapping (a rigid one keeps only the rotation of the linear part)."""
    import SimpleITK as sitk

    matrix = _LPS @ _matrix_of(current) @ _LPS  # LPS 4x4
    centre = np.asarray(current.GetFixedParameters()[:3], dtype=np.float64)
    linear = matrix[:3, :3]
    if rigid:
        u, _, vt = np.linalg.svd(linear)
        linear = u @ vt
    tx = sitk.Euler3DTransform() if rigid else sitk.AffineTransform(3)
    tx.SetCenter([float(v) for v in centre])
    tx.SetMatrix([float(v) for v in linear.ravel()])
    tx.SetTranslation([float(v) for v in matrix[:3, :3] @ centre + matrix[:3, 3] - centre])
    return tx


def _grow(mask: np.ndarray) -> np.ndarray:
    from .geometry import dilate_box

    return dilate_box(mask, 2)


@dataclass
class Registration:
    """One case's place in the common space (what bank.json keeps per case)."""

    ref_from_case: np.ndarray  # 4x4 world matrix: case world → reference world
    overlap: float             # foreground Dice with the reference after registration
    metric: float              # final Mattes MI (lower is better)
    seconds: float

    def poor_below(self, min_overlap: float) -> bool:
        """Whether the foreground overlap is below `min_overlap` (the bank's `min_overlap`)."""
        return self.overlap < min_overlap

    def as_json(self, min_overlap: float) -> dict:
        return {"ref_from_case": np.round(self.ref_from_case, 6).tolist(), "foreground_overlap": round(self.overlap, 4),
                "metric": round(self.metric, 5), "seconds": round(self.seconds, 2),
                "status": "poor" if self.poor_below(min_overlap) else "ok"}


def register_case(reference: RegImage, case: RegImage) -> Registration:
    """Worker: register one case to the reference (see `register`) and measure the result."""
    t0 = time.perf_counter()
    start: list = []
    case_from_ref, metric = register(reference, case, start=start)
    overlap = foreground_overlap(reference, case, case_from_ref)
    start_overlap = foreground_overlap(reference, case, start[0])
    if start_overlap > overlap:  # the optimiser ran off (e.g. towards a smaller overlap of the fields of view)
        case_from_ref, overlap = start[0], start_overlap
    return Registration(np.linalg.inv(case_from_ref), overlap, metric, time.perf_counter() - t0)


def world_overlap(a: RegImage, b: RegImage) -> float:
    """Foreground Dice of two cases taken as they lie in world space (no registration)."""
    return foreground_overlap(a, b, np.eye(4))


def provisional_reference(images: list[RegImage]) -> int:
    """The case of median foreground volume (ties: the first): where group-wise registration starts."""
    volumes = np.array([img.foreground.sum() * abs(np.linalg.det(img.affine[:3, :3])) for img in images])
    order = np.argsort(volumes, kind="stable")
    return int(order[(len(order) - 1) // 2])


def closest_case(images: list[RegImage], ref_from_case: list[np.ndarray], reference: RegImage) -> int:
    """The case closest to the others: smallest mean squared difference of the normalised images after each
    is mapped onto the reference grid through its transform (inside the reference foreground)."""
    from scipy import ndimage

    idx = np.argwhere(reference.foreground)
    world = apply_affine(reference.affine, idx)
    samples = []
    for img, ref_from in zip(images, ref_from_case):
        vox = apply_affine(np.linalg.inv(img.affine) @ np.linalg.inv(ref_from), world)
        samples.append(ndimage.map_coordinates(img.data, vox.T, order=1, mode="constant", cval=0.0))
    stack = np.stack(samples)  # (n, voxels)
    sq = (stack ** 2).sum(axis=1)
    dist = sq[:, None] + sq[None, :] - 2.0 * stack @ stack.T
    return int(np.argmin(dist.mean(axis=1)))


def reference_grid_of(reference: RegImage, spacing_mm: float, margin_mm: float = 10.0):
    """A `prior.Grid`, RAS-aligned at `spacing_mm`, over the reference's foreground (plus a margin)."""
    from .prior import Grid

    idx = np.argwhere(reference.foreground)
    if not len(idx):
        idx = np.argwhere(np.ones(reference.shape, dtype=bool))
    half = (spacing_of(reference.affine) / 2.0)
    corners = np.concatenate([apply_affine(reference.affine, idx + d) for d in (-0.5, 0.5)])
    lo = corners.min(axis=0) - margin_mm - half.max()
    hi = corners.max(axis=0) + margin_mm + half.max()
    shape = tuple(int(np.ceil(v)) + 1 for v in (hi - lo) / spacing_mm)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = lo
    return Grid(shape, affine)


__all__ = ["ALIGNED_OVERLAP", "POOR_OVERLAP", "REGISTRATION_MM", "RegImage", "Registration", "SPACES",
           "block_mean", "closest_case", "foreground_overlap", "provisional_reference",
           "reference_grid_of", "register", "register_case", "registration_image", "world_overlap"]
