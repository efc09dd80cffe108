"""Per-case decisions: target load, which lesions to remove or add, and every augmentation parameter.

Each random choice is drawn from the case's own generator and recorded as plain JSON data (rounded
before use, so the record replays exactly); rendering the record gives the same case again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .bank import lesion_load_volume, lesion_mask
from .geometry import dilate, spacing_of, structure_for, true_bounds, voxel_volume, within_mm
from .labels import count_in, label_in
from .prior import PlacementDensity, context_distance, local_host_match, matching_fraction, tissue_signature
from .render import RenderContext, render_op
from .render.paste import SAMPLE_POINTS
from .stats import channel_stats

#: replace: remove every lesion of the base case, then populate to the target from the donors alone
MODES = ("both", "populate", "inpaint", "replace")


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the per-lesion augmentation and the bounds of the per-case loop."""

    flip: bool = True
    rotation_deg: float = 45.0               # each Euler angle uniform in ±this
    scale_range: tuple[float, float] = (0.5, 1.8)    # size-aware scaling stays inside this
    natural_scale: tuple[float, float] = (0.8, 1.25)  # scale when one lesion cannot fill the deficit
    elastic_fraction: float = 0.08           # control-point displacement sd, × equivalent radius
    elastic_max_mm: float = 4.0
    elastic_grid: int = 4                    # control points per axis
    brightness: tuple[float, float] = (0.9, 1.1)     # × the lesion's contrast to its surroundings
    noise_gain: tuple[float, float] = (0.9, 1.1)     # the pasted lesion's noise sd, × the local tissue's
    min_region_fraction: float = 0.9
    max_overlap_fraction: float = 0.2
    context_tolerance: float = 0.2           # largest tissue-signature distance from the donor's shell (0: off)
    context_core_fraction: float = 0.9       # share of the covered voxels that must match the donor's shell too
    local_host: bool = False                 # ... and be of the main tissue right around the paste (local host
    #                                          test; for lesions of one tissue, e.g. MS in white matter)
    host_share_floor: float = 0.0            # the local test asks at least this share (× core fraction), however
    #                                          mixed the donor's own shell is (lesions of one tissue, e.g. MS: 0.85)
    max_extra_blur: float = 0.35             # sd (target voxels) a donor may land blurrier than the target (0: off)
    rim_mm: float = 2.0                      # partial-volume rim removed with an inpainted lesion
    texture_gain: tuple[float, float] = (0.8, 1.0)
    max_ops: int = 300
    natural_pastes: int = 0                  # a case's first pastes drawn as the bank holds them, at natural
    #                                          scale; later ones favour large lesions as the deficit needs
    #                                          (0: the bank's median lesion count per case)
    max_failed_tries: int = 60               # rendered pastes refused before a case gives up
    max_prechecks_refused: int = 400         # draws refused by the cheap pre-check (no rendering) before it gives up
    volume_rotation_deg: float = 10.0        # --volume-warp: whole-case rotation about each axis, ±this
    volume_scale: tuple[float, float] = (0.9, 1.1)
    volume_elastic_mm: float = 2.0           # --volume-warp: control-point displacement sd (5x5x5 grid)


def case_rng(seed: int, case_index: int) -> np.random.Generator:
    """The generator of one output case: independent of job count, shards and order."""
    return np.random.default_rng([int(seed), int(case_index)])


def _r(x, nd=4):
    return [round(float(v), nd) for v in x] if np.ndim(x) else round(float(x), nd)


def draw_volume_warp(rng: np.random.Generator, cfg: AugmentConfig) -> dict:
    """Parameters of an optional whole-case rotation/scale/elastic warp (recorded in the manifest)."""
    sd = cfg.volume_elastic_mm
    return {
        "rotation_deg": _r(rng.uniform(-cfg.volume_rotation_deg, cfg.volume_rotation_deg, size=3), 3),
        "scale": round(float(rng.uniform(*cfg.volume_scale)), 5),
        "elastic_mm": np.round(np.clip(rng.normal(0.0, sd, size=(5, 5, 5, 3)), -3 * sd, 3 * sd), 3).tolist(),
    }


@dataclass
class Component:
    seed_voxel: list[int]
    bbox: list[list[int]]
    voxels: int
    load_voxels: int = 0  # its voxels of the labels the load is counted on (all lesion labels by default)


def lesion_components(label: np.ndarray, lesion_labels, connectivity: int, load_labels=None) -> list[Component]:
    """The connected lesion components of a label volume (labelled within the lesions' bounding box, and
    sized box by box: no volume-sized int64 temporaries). `load_labels`: the labels each component's
    `load_voxels` counts (None: every lesion label)."""
    mask = lesion_mask(label, lesion_labels)
    spans = true_bounds(mask)
    if spans is None:
        return []
    offset = [s.start for s in spans]
    comps, n = ndimage.label(mask[spans], structure=structure_for(connectivity))
    out = []
    for k, box in enumerate(ndimage.find_objects(comps), start=1):
        inside = comps[box] == k
        local = np.argwhere(inside)[0]
        voxels = int(np.count_nonzero(inside))
        counted = voxels if not load_labels else \
            int(np.count_nonzero(inside & label_in(label[spans][box], load_labels)))
        out.append(Component([int(v + s.start + o) for v, s, o in zip(local, box, offset)],
                             [[int(s.start + o), int(s.stop + o)] for s, o in zip(box, offset)],
                             voxels, counted))
    return out


#: Slack of the quick context test (the tissue under the landed lesion) over the final one (its shell).
QUICK_CONTEXT_SLACK = 0.1
#: Slack of the quick test of the covered tissue (rigidly landed sample points) under the final one.
QUICK_COVERED_SLACK = 0.03
#: Places a drawn paste tries (pre-checks only) when the tissue under it is refused, before another lesion is
#: drawn: which lesions are pasted then depends less on where their first place happened to fall (a large
#: lesion finds fewer places of one tissue than a small one).
PLACE_RETRIES = 4
TISSUE_REFUSALS = ("context", "covered tissue", "covered tissue (local)")
#: Slack of the quick local host test under the final one (its surroundings are the whole box around the lesion).
QUICK_HOST_SLACK = 0.05


@dataclass
class ContextMatch:
    """The context match of one destination case: a paste is kept only where the destination's tissue around
    it resembles the donor lesion's shell in its source case (`prior.context_distance`)."""

    intensity_ref: list[float]        # the destination case's per-channel intensity reference
    ct_channels: tuple[bool, ...]
    tolerance: float                  # the largest accepted distance (0: no context match)
    donors: dict                      # lesion id → the donor's shell signature (None: unknown)
    core_fraction: float = 0.0        # share of the covered voxels that must match too (0: not tested) ...
    own_match: dict | None = None     # ... times the share of each donor's own shell that matches its signature
    own_spread: dict | None = None    # each donor's median shell deviation from its own signature
    own_host: dict | None = None      # each donor's share of shell voxels of its shell's host tissue (local test)
    shell_mm: float = 3.0             # width of the destination's surroundings the local test reads
    host_floor: float = 0.0           # the host share asked at least (× core_fraction), whatever the donor's own

    def tolerance_for(self, lesion_id: str) -> float:
        """The distance accepted for this donor: the tolerance, or more for a donor whose own surroundings
        are mixed (its shell voxels lie that far from their median), whose median is a weak signature."""
        spread = 0.0 if self.own_spread is None else float(self.own_spread.get(lesion_id) or 0.0)
        return max(self.tolerance, spread)

    def score(self, medians, lesion_id: str) -> float:
        """Distance of the destination tissue around a paste (per-channel medians) from the donor's shell."""
        dest = tissue_signature(medians, self.intensity_ref, self.ct_channels)
        return context_distance(dest, self.donors.get(lesion_id), self.ct_channels)

    def covered_needed(self, lesion_id: str) -> float:
        """The share of covered voxels that must match: as much as the donor's own surroundings match their
        signature (a lesion grown across tissues may cover several), times `core_fraction`."""
        own = 1.0 if self.own_match is None else self.own_match.get(lesion_id, 1.0)
        return self.core_fraction * own

    def covered_match(self, values: np.ndarray, lesion_id: str) -> float:
        """Share of the destination voxels a paste covers ((C, N) values before it) that match the donor's shell."""
        return matching_fraction(values, self.intensity_ref, self.donors.get(lesion_id), self.ct_channels,
                                 self.tolerance)

    def host_match(self, channels: np.ndarray, lesion_any, box, core: np.ndarray, spacing) -> float | None:
        """Share of the voxels a paste covers (`core` of `box`, the case's values before it) that are of the host
        tissue of the destination around them (`prior.local_host_match`; the surroundings: within `shell_mm` of
        the core, and at least two voxels, but not touching it, no lesion (`lesion_any(box)`: bool over a box));
        None when there are too few such voxels."""
        reach = self._reach(spacing)
        wide = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, r, n in zip(box, reach, channels.shape[1:]))
        inner = tuple(slice(s.start - w.start, s.stop - w.start) for s, w in zip(box, wide))
        covered = np.zeros(tuple(w.stop - w.start for w in wide), dtype=bool)
        covered[inner] = core
        around = within_mm(covered, self.shell_mm, spacing) & ~dilate(covered) & ~lesion_any(wide)
        values = channels[(slice(None),) + wide]
        return self._host_share(values[:, covered], values, around)

    def quick_host_match(self, channels: np.ndarray, label: np.ndarray, lesion_labels, idx: np.ndarray,
                         values: np.ndarray, spacing) -> float | None:
        """`host_match` for the pre-check: the share of the landed sample points' `values` ((C, N) at voxels
        `idx`) of the host tissue of the box around them (`shell_mm` beyond, no lesion)."""
        reach = self._reach(spacing)
        lo = np.maximum(idx.min(axis=0) - reach, 0)
        hi = np.minimum(idx.max(axis=0) + reach + 1, label.shape)
        wide = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        return self._host_share(values, channels[(slice(None),) + wide], ~lesion_mask(label[wide], lesion_labels))

    def _reach(self, spacing) -> np.ndarray:
        """Voxels per axis beyond a paste's box that its surroundings (`shell_mm`) can reach."""
        return np.ceil(self.shell_mm / np.asarray(spacing)).astype(int) + 1

    def _host_share(self, covered: np.ndarray, box_values: np.ndarray, around: np.ndarray) -> float | None:
        """`prior.local_host_match` of the `covered` values ((C, N)) against the `around` voxels of `box_values`
        ((C, X, Y, Z)), with the noise read there; None for fewer than 10 such voxels."""
        if np.count_nonzero(around) < 10:
            return None
        noise = [sd for _, sd in channel_stats(box_values, around)]
        return local_host_match(covered, box_values[:, around], self.ct_channels, noise_sd=noise)

    def host_needed(self, lesion_id: str) -> float:
        """The host share a paste's covered voxels must reach: the donor's own (`own_host`; at least `host_floor`:
        a shell also holds the lesion's partial-volume tail, other lesions and a ventricle's edge, none of which
        a lesion of one tissue grew in) times `core_fraction`."""
        own = 1.0 if self.own_host is None else self.own_host.get(lesion_id, 1.0)
        return self.core_fraction * max(own, self.host_floor)

    def active(self, lesion_id: str) -> bool:
        return self.tolerance > 0 and self.donors.get(lesion_id) is not None


@functools.lru_cache(maxsize=16)
def _inverse_of(affine_bytes: bytes) -> np.ndarray:
    """The inverse of a 4x4 float64 affine given as bytes: a case's many draws share it (read only)."""
    inverse = np.linalg.inv(np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4))
    inverse.setflags(write=False)
    return inverse


def quick_fit(bank, op: dict, affine: np.ndarray, label: np.ndarray, region, lesion_labels,
              cfg: AugmentConfig, max_points: int = SAMPLE_POINTS, channels: np.ndarray | None = None,
              context: ContextMatch | None = None) -> str | None:
    """Cheap pre-check of a drawn paste before rendering it: map a sample of the lesion's voxels with the
    rigid part of the transform and test the region and overlap limits (with some slack for the elastic
    part and interpolation), and the context match on the tissue the lesion would cover. Rejecting here
    saves resampling lesions that cannot be accepted. Returns why it is rejected, or None."""
    from .render import prepared_mask
    from .render.transform import forward_linear

    meta = bank.by_id[op["lesion_id"]]
    pts = prepared_mask(bank, op["lesion_id"]).centred_sample_mm(meta["affine"], meta["centroid_mm"], max_points)
    lin = forward_linear(op["flip"], op["rotation_deg"], op["scale"])
    world_t = pts @ lin.T + np.asarray(op["centre_mm"])
    inv = _inverse_of(np.asarray(affine, dtype=np.float64).tobytes())
    idx = np.rint(world_t @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.array(label.shape)), axis=1)
    if inside.mean() < cfg.min_region_fraction - 0.05:
        return "region"
    idx = idx[inside]
    in_region = region.contains(label, idx).sum() / len(pts)
    if in_region < cfg.min_region_fraction - 0.05:
        return "region"
    overlap = label_in(label[tuple(idx.T)], lesion_labels).mean() if len(idx) else 0.0
    if overlap > cfg.max_overlap_fraction + 0.05:
        return "overlap"
    if context is not None and channels is not None and context.active(op["lesion_id"]) and len(idx):
        under = tuple(idx.T)
        values = np.stack([ch[under] for ch in channels])
        if context.score(np.median(values, axis=1), op["lesion_id"]) > \
                context.tolerance_for(op["lesion_id"]) + QUICK_CONTEXT_SLACK:
            return "context"
        needed = context.covered_needed(op["lesion_id"]) - QUICK_COVERED_SLACK
        if context.core_fraction > 0 and context.covered_match(values, op["lesion_id"]) < needed:
            return "covered tissue"
        if context.core_fraction > 0 and context.own_host is not None:
            share = context.quick_host_match(channels, label, lesion_labels, idx, values, spacing_of(affine))
            if share is not None and share < context.host_needed(op["lesion_id"]) - QUICK_HOST_SLACK:
                return "covered tissue (local)"
    return None


@dataclass
class CasePlan:
    """The record of one generated case (what goes into manifest.jsonl)."""

    target_load_mm3: float
    initial_load_mm3: float
    ops: list[dict] = field(default_factory=list)
    load_mm3: float = 0.0
    stop_reason: str = ""
    failed_tries: int = 0
    refused: dict = field(default_factory=dict)  # why drawn pastes were refused: reason → count
    sharp_donors: bool = True  # False: no donor was sharp enough for the target grid, all were used
    prechecks_refused: int = 0

    def refuse(self, reason: str, precheck: bool = False, budget: bool = True) -> None:
        """Count a refused draw: a pre-check refusal (nothing rendered) against its own, larger budget (not a
        place retried for the same draw, `budget` False: a draw's retries are bounded by PLACE_RETRIES)."""
        if precheck:
            self.prechecks_refused += int(budget)
            reason = f"{reason} (pre-check)"
        else:
            self.failed_tries += 1
        self.refused[reason] = self.refused.get(reason, 0) + 1


@functools.lru_cache(maxsize=4096)
def _unrotated_blur(src_linear: bytes, tgt_linear: bytes) -> float:
    """`extra_blur` of a paste at scale 1, unrotated, between grids with these 3x3 linear parts (float64
    bytes): it does not depend on where the grids lie, so the lesions of one source case share it."""
    from .render.transform import extra_blur

    affines = []
    for linear in (src_linear, tgt_linear):
        a = np.eye(4)
        a[:3, :3] = np.frombuffer(linear, dtype=np.float64).reshape(3, 3)
        affines.append(a)
    return extra_blur(affines[0], affines[1], (False,) * 3, (0.0,) * 3, 1.0)


def sharp_donors(donors: list[dict], affine: np.ndarray, cfg: AugmentConfig) -> tuple[list[dict], bool]:
    """The donors whose voxel profile, unrotated at scale 1, lands at most `max_extra_blur` blurrier than the
    target grid records (`render.transform.extra_blur`), and whether any is; all donors if none is."""
    if cfg.max_extra_blur <= 0:
        return donors, True
    target = np.asarray(affine, dtype=np.float64)[:3, :3].tobytes()
    sharp = [les for les in donors if _unrotated_blur(np.asarray(les["affine"], dtype=np.float64)[:3, :3].tobytes(),
                                                      target) <= cfg.max_extra_blur]
    return (sharp, True) if sharp else (donors, False)


#: natural_pastes of a draw made without a bank (and without cfg.natural_pastes).
FALLBACK_NATURAL_PASTES = 16
#: Tilts tried, smallest first: a lesion is drawn with weight volume ** tilt (0: as the bank holds them).
SIZE_TILTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def size_tilted_weights(volumes: np.ndarray, deficit_mm3: float, largest_scale3: float, natural_pastes: int,
                        tilts: tuple[float, ...] = SIZE_TILTS) -> np.ndarray:
    """Draw weights of the donor lesions for one paste.

    As the bank holds them (pasted lesions keep the dataset's size distribution; a draw weighted by volume
    made them 2-3x larger than the real ones) while about `natural_pastes` lesions of the median drawn size
    fill the deficit; a larger deficit tilts the draw towards large lesions (weight volume ** tilt, the
    smallest of `tilts` that is enough), so that a load of many times the typical lesion is reached
    within the operation budget. A lesion larger than what is left to fill is less likely, in proportion."""
    deficit = max(float(deficit_mm3), 0.0)
    volumes = np.maximum(np.asarray(volumes, dtype=np.float64), 1e-9)
    order = np.argsort(volumes, kind="stable")
    for tilt in tilts:
        tilted = volumes ** tilt
        # the median drawn size, not the mean: a few giant lesions in a bank of small ones raise the mean
        # without making the typical draw any larger
        cumulative = np.cumsum(tilted[order])
        median = volumes[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])]
        if deficit <= natural_pastes * median:
            break
    fits = np.minimum(1.0, deficit / (volumes * largest_scale3))
    return tilted * fits + 1e-9


def draw_paste(rng: np.random.Generator, lesions: list[dict], deficit_mm3: float, room_mm3: float,
               density: PlacementDensity, n_channels: int, cfg: AugmentConfig, affine: np.ndarray | None = None,
               natural_pastes: int | None = None, pasted: int = 0, volumes: np.ndarray | None = None) -> dict:
    """Draw one paste: lesion (size-aware), place, flip, rotation, scale, elastic field, intensity.

    The case's first `natural_pastes` pastes (`pasted`: how many it has) are drawn as the bank holds them,
    at natural scale, like the many small lesions of a real case; later ones are tilted towards large
    lesions as far as the deficit needs (`size_tilted_weights`), like the few confluent ones of a real
    high-load case. With the target `affine`, the scale is capped where the lesion would land blurrier than
    `max_extra_blur`. `volumes`: the lesions' volumes (mm³) as an array, if made already."""
    smallest, largest = cfg.scale_range[0] ** 3, cfg.scale_range[1] ** 3
    if volumes is None:
        volumes = np.array([les["volume_mm3"] for les in lesions], dtype=np.float64)
    pool = np.flatnonzero(volumes * smallest <= room_mm3)  # the lesions that fit, else the smallest
    if not pool.size:
        pool = np.array([int(np.argmin(volumes))])
    n_natural = natural_pastes or cfg.natural_pastes or FALLBACK_NATURAL_PASTES
    natural = pasted < n_natural
    weights = size_tilted_weights(volumes[pool], deficit_mm3, largest, n_natural,
                                  tilts=(0.0,) if natural else SIZE_TILTS)
    chosen = int(pool[int(rng.choice(len(pool), p=weights / weights.sum()))])
    lesion = lesions[chosen]
    s_fit = np.cbrt(max(deficit_mm3, 0.0) / volumes[chosen])  # the volume the load counts
    if natural or s_fit > cfg.scale_range[1]:
        # natural sizes; a lesion larger than what is left to fill starts at the size that fills it
        scale = min(rng.uniform(*cfg.natural_scale), max(s_fit, cfg.scale_range[0]))
    else:
        scale = float(np.clip(s_fit, *cfg.scale_range))
    centre = density.draw(rng)
    flip = [bool(rng.random() < 0.5) if cfg.flip else False for _ in range(3)]
    angles = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, size=3)
    if affine is not None and cfg.max_extra_blur > 0:
        from .render.transform import largest_sharp_scale

        cap = largest_sharp_scale(lesion["affine"], affine, flip, np.round(angles, 3), cfg.max_extra_blur)
        scale = max(min(scale, cap), cfg.scale_range[0])
    radius = np.cbrt(3 * lesion["volume_mm3"] / (4 * np.pi)) * scale
    sd = min(cfg.elastic_fraction * radius, cfg.elastic_max_mm / 2)
    k = cfg.elastic_grid
    elastic = np.clip(rng.normal(0.0, sd, size=(k, k, k, 3)), -cfg.elastic_max_mm, cfg.elastic_max_mm)
    return {
        "op": "paste",
        "lesion_id": lesion["id"],
        "source_case": lesion["source_case"],
        "label_value": int(lesion["label_value"]),
        "centre_mm": _r(centre, 3),
        "flip": flip,
        "rotation_deg": _r(angles, 3),
        "scale": round(float(scale), 5),
        "elastic_mm": np.round(elastic, 3).tolist(),
        "brightness": _r(rng.uniform(*cfg.brightness, size=n_channels)),
        "noise_gain": _r(rng.uniform(*cfg.noise_gain)),
        "noise_seed": int(rng.integers(2**31)),
    }


def plan_and_render_case(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, bank, donors: list[dict],
                         density: PlacementDensity, ctx: RenderContext, rng: np.random.Generator,
                         target_mm3: float, tolerance: float, mode: str, cfg: AugmentConfig,
                         region, context: ContextMatch | None = None, load_labels=None) -> CasePlan:
    """Run the per-case loop in place on `channels`/`label`: inpaint while above target (mode replace: every
    lesion of the case), populate while below.

    Every accepted operation is recorded with all its parameters; the achieved load is counted on the
    label array itself, on `load_labels` (None: every lesion label). Removals take whole lesions, all labels.
    """
    vv = voxel_volume(affine)
    natural_pastes = cfg.natural_pastes or bank.typical_lesion_count
    lesion_labels = ctx.lesion_labels
    counted = tuple(load_labels) if load_labels else lesion_labels
    load_vox = count_in(label, counted)
    plan = CasePlan(round(target_mm3, 3), load_vox * vv)
    hi, lo = target_mm3 * (1 + tolerance), target_mm3 * (1 - tolerance)

    clear = mode == "replace"
    if (mode in ("both", "inpaint") and load_vox * vv > hi) or (clear and load_vox > 0):
        comps = lesion_components(label, lesion_labels, ctx.connectivity, load_labels)
        while (clear or load_vox * vv > hi) and comps and len(plan.ops) < cfg.max_ops:
            best = comps[0] if clear else min(comps, key=lambda c: abs((load_vox - c.load_voxels) * vv - target_mm3))
            if mode == "inpaint" and \
                    abs((load_vox - best.load_voxels) * vv - target_mm3) >= abs(load_vox * vv - target_mm3):
                break
            comps.remove(best)
            op = {"op": "inpaint", "seed_voxel": best.seed_voxel, "bbox": best.bbox, "rim_mm": cfg.rim_mm,
                  "texture_gain": _r(rng.uniform(*cfg.texture_gain)), "texture_seed": int(rng.integers(2**31))}
            if clear:  # a case cleared of every lesion: a removal that leaves a trace is still made (and recorded)
                op["must_remove"] = True
            patch = render_op(channels, label, affine, op, bank, ctx)
            if patch is None:  # it would leave a visible trace: the lesion stays
                plan.refuse("residual excess (inpaint)")
                continue
            before = count_in(label[patch.box], counted)
            patch.apply(channels, label, ctx.undo)
            removed = before - count_in(label[patch.box], counted)
            load_vox -= removed
            op["removed_mm3"] = round(removed * vv, 3)
            op.update(patch.info)
            plan.ops.append(op)

    if mode in ("both", "populate", "replace") and donors:
        donors, plan.sharp_donors = sharp_donors(donors, affine, cfg)
        pasted = 0
        volumes = np.array([lesion_load_volume(les, load_labels) for les in donors], dtype=np.float64)
        while (load_vox * vv < lo and len(plan.ops) < cfg.max_ops and plan.failed_tries < cfg.max_failed_tries
               and plan.prechecks_refused < cfg.max_prechecks_refused):
            load = load_vox * vv
            op = draw_paste(rng, donors, target_mm3 - load, hi - load, density, channels.shape[0], cfg, affine,
                            natural_pastes, pasted, volumes)
            accepted = False
            why = quick_fit(bank, op, affine, label, region, lesion_labels, cfg, channels=channels, context=context)
            for _retry in range(PLACE_RETRIES):  # a lesion refused for its tissue tries other places first
                if why not in TISSUE_REFUSALS:
                    break
                plan.refuse(why, precheck=True, budget=False)
                op["centre_mm"] = _r(density.draw(rng), 3)
                why = quick_fit(bank, op, affine, label, region, lesion_labels, cfg, channels=channels,
                                context=context)
            if why is not None:
                plan.refuse(why, precheck=True)
                continue
            why, score, covered_match, host_match = "region", None, None, None
            for _refine in range(3):
                patch = None  # a refused try's arrays go before the next try renders
                patch = render_op(channels, label, affine, op, bank, ctx)
                if patch is None:
                    why = "outside the volume or region"
                    break
                old_lesion = lesion_mask(patch.old_label, lesion_labels)  # in core's (C) order
                core = patch.core
                n_core = int(core.sum())
                in_region = patch.region_fraction
                overlap = float(old_lesion[core].mean())
                # lesion voxels the paste adds, on the labels the load counts (inner labels may cover others)
                added = count_in(patch.label, counted) - count_in(patch.old_label, counted)
                if in_region < cfg.min_region_fraction or overlap > cfg.max_overlap_fraction or n_core == 0:
                    why = "overlap" if overlap > cfg.max_overlap_fraction else "region"
                    break
                if context is not None and context.active(op["lesion_id"]):  # the blend reuses these stats
                    score = context.score([m for m, _ in patch.tissue_stats(channels)], op["lesion_id"])
                    if score > context.tolerance_for(op["lesion_id"]):
                        why = "context"
                        break
                    if context.core_fraction > 0:
                        covered = channels[(slice(None),) + patch.box][:, core]
                        covered_match = context.covered_match(covered, op["lesion_id"])
                        if covered_match < context.covered_needed(op["lesion_id"]):
                            why = "covered tissue"
                            break
                        if context.own_host is not None:
                            host_match = context.host_match(
                                channels, lambda wide: lesion_mask(label[wide], lesion_labels), patch.box, core,
                                spacing_of(affine))
                            if host_match is not None and host_match < context.host_needed(op["lesion_id"]):
                                why = "covered tissue (local)"
                                break
                if load + added * vv > hi:
                    # shrink to fit the remaining room, then try again at the same place
                    new_scale = op["scale"] * float(np.cbrt(max(target_mm3 - load, 0.0) / (added * vv)))
                    if new_scale < cfg.scale_range[0] * 0.999:
                        break
                    op["scale"] = round(new_scale, 5)
                    continue
                accepted = True
                break
            if not accepted:
                plan.refuse(why)
                continue
            patch.apply(channels, label, ctx.undo)
            load_vox += added
            op.update(added_mm3=round(added * vv, 3), region_fraction=round(in_region, 4),
                      overlap_fraction=round(overlap, 4))
            if score is not None:
                op["context_score"] = round(float(score), 4)
            if covered_match is not None:
                op["covered_match"] = round(float(covered_match), 4)
            if host_match is not None:
                op["host_match"] = round(float(host_match), 4)
            plan.ops.append(op)
            pasted += 1

    plan.load_mm3 = load_vox * vv
    if lo <= plan.load_mm3 <= hi:
        plan.stop_reason = "reached"
    elif plan.load_mm3 > hi:
        plan.stop_reason = ("populate-only mode cannot lower the load" if mode == "populate"
                            else "no lesion left whose removal gets closer to the target")
    elif mode == "inpaint":
        plan.stop_reason = "inpaint-only mode cannot raise the load"
    elif not donors:
        plan.stop_reason = "no donor lesion available for this case's fold"
    elif len(plan.ops) >= cfg.max_ops:
        plan.stop_reason = f"stopped after {cfg.max_ops} operations"
    elif plan.prechecks_refused >= cfg.max_prechecks_refused:
        plan.stop_reason = f"stopped after {plan.prechecks_refused} draws refused by the placement pre-check"
    else:
        plan.stop_reason = f"stopped after {plan.failed_tries} failed placement tries"
    return plan
