"""Apply a plan: paste and inpaint operations, deterministic functions of (case, bank, parameters)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .inpaint import inpaint_patch
from .paste import (PasteSettings, Patch, PreparedMask, paste_patch, resample_on_cpu, restore_patches,
                    spline_coefficients)


@dataclass
class RenderContext:
    """What rendering needs besides the case and the operation: fixed per run and base case."""

    lesion_labels: tuple[int, ...]
    connectivity: int
    paste: PasteSettings
    region_fn: object  # callable(label_crop, start) -> bool mask
    region_points: object = None  # callable(label, voxel indices (N, 3)) -> bool: in the allowed region
    min_region_fraction: float = 0.0  # the planner's limit (with region_points: early rejection)
    resample: object = resample_on_cpu  # how a paste is resampled (`backend.lesion_resampler` of the device)
    undo: list | None = None  # gets what every applied patch overwrote (`paste.restore_patches`), if given


#: How far below the planner's region limit the landing estimate of a paste may fall before the paste is
#: given up without resampling it: the estimate and the final core (soft >= 0.5) differ by a few per cent,
#: most for small lesions; on random pastes of a small lesion this slack lets every paste through whose
#: core is 90 % in the region, 2 % would not (tests/test_render.py).
EARLY_REGION_SLACK = 0.03


def landing_check(label: np.ndarray, ctx: RenderContext):
    """The test `paste_patch` applies to where a lesion's voxels are estimated to land, or None: the
    share inside the volume and the allowed region must reach the planner's limit less the slack, so a
    paste the planner would reject for its region is not resampled first."""
    if ctx.region_points is None or ctx.min_region_fraction <= 0:
        return None

    def enough_in_region(land: np.ndarray) -> bool:
        idx = np.rint(land).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.array(label.shape)), axis=1)
        in_region = np.count_nonzero(ctx.region_points(label, idx[inside]))
        return in_region >= (ctx.min_region_fraction - EARLY_REGION_SLACK) * len(land)

    return enough_in_region


def render_op(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, op: dict, bank, ctx: RenderContext
              ) -> Patch | None:
    """The Patch one recorded operation produces on the current case arrays (not applied)."""
    if op["op"] == "paste":
        image, mask = bank.lesion_arrays(op["lesion_id"])
        return paste_patch(channels, label, affine, image, mask, bank.by_id[op["lesion_id"]], op,
                           ctx.lesion_labels, ctx.region_fn, ctx.paste, prepared_mask(bank, op["lesion_id"]),
                           landing_check(label, ctx), lambda: prepared_coefficients(bank, op["lesion_id"]),
                           ctx.resample, lesion_label_values(bank, op["lesion_id"]))
    if op["op"] == "inpaint":
        return inpaint_patch(channels, label, affine, op, ctx.lesion_labels, ctx.connectivity)
    raise ValueError(f"unknown operation {op['op']!r}")


def lesion_label_values(bank, lesion_id: str) -> np.ndarray | None:
    """A multi-class bank lesion's crop of label values, None for one of a single label (or a bank without
    them, e.g. a test double)."""
    read = getattr(bank, "lesion_label_values", None)
    return None if read is None else read(lesion_id)


def prepared_mask(bank, lesion_id: str) -> PreparedMask:
    """The bank lesion's PreparedMask, reused across pastes of the same lesion in this worker."""
    def make():
        return PreparedMask(bank.lesion_arrays(lesion_id)[1], bank.by_id[lesion_id].get("mask_box"))

    return bank.derived(("prepared_mask", lesion_id), make)


def prepared_coefficients(bank, lesion_id: str) -> np.ndarray:
    """The bank lesion's cubic-spline coefficients (`paste.spline_coefficients`): stored in the bank, or made
    here and reused in this worker (a bank that predates stored coefficients)."""
    stored = bank.lesion_splines(lesion_id)
    if stored is not None:
        return stored
    return bank.derived(("spline", lesion_id), lambda: spline_coefficients(bank.lesion_arrays(lesion_id)[0]))


def apply_plan(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, ops: list[dict], bank,
               ctx: RenderContext) -> None:
    """Replay recorded operations in place on a base case's arrays."""
    for op in ops:
        patch = render_op(channels, label, affine, op, bank, ctx)
        if patch is None:
            raise RuntimeError(f"recorded operation no longer applies: {op}")
        patch.apply(channels, label, ctx.undo)


def render_plan(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, ops: list[dict], bank,
                ctx: RenderContext) -> tuple[np.ndarray, np.ndarray]:
    """Replay recorded operations on copies of a base case's arrays."""
    channels, label = channels.copy(order="K"), label.copy(order="K")
    apply_plan(channels, label, affine, ops, bank, ctx)
    return channels, label


__all__ = ["PasteSettings", "Patch", "PreparedMask", "RenderContext", "apply_plan", "prepared_mask", "render_op",
           "render_plan", "restore_patches"]
