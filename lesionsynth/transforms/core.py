"""What the TorchIO and MONAI transforms share: the bank, the per-sample generate options, which bank case a
sample is, and the lesion work of one sample on numpy arrays (`pipeline.synthesize_arrays`, as generate does
it). Nothing here imports torch, TorchIO or MONAI."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bank import Bank, intensity_reference
from ..errors import InputError
from ..io.validate import AFFINE_ATOL_MM, LABEL_INTEGER_TOL, MAX_LABEL, channel_stack
from ..labels import count_in, label_in
from ..loads import load_band
from ..pipeline import GenerateConfig, donor_lesions, open_bank, synthesize_arrays
from ..plan import AugmentConfig, case_rng
from ..prior import allowed_region


def sample_config(bank: Bank, load: str, load_range, mode: str, tolerance: float, recipe: str | None,
                  augment: AugmentConfig | dict | None) -> GenerateConfig:
    """The generate options of one sample, checked now (one line for a bad one): `augment` as an
    AugmentConfig is taken as it is; a dict overrides the keys it names over `recipe` (default: the recipe
    the bank was built with, as `generate` does)."""
    from ..recipes import load_recipe, make_config

    if not isinstance(augment, AugmentConfig):
        recipe = recipe or bank.index.get("run", {}).get("recipe")
        augment = make_config(AugmentConfig, load_recipe(recipe) if recipe else None, "augment", dict(augment or {}))
    load_range = (float(load_range[0]), float(load_range[1])) if load_range is not None else None
    cfg = GenerateConfig(n=0, load=load, mode=mode, tolerance=float(tolerance), load_range=load_range,
                         augment=augment)
    cfg.validate()
    load_band(load, bank.real_loads(), load_range)  # an impossible --load-range fails here, not in a worker
    return cfg


class LesionMixer:
    """The lesion work of `generate` applied to one sample at a time.

    Holds the bank folder and the settings only (what a DataLoader pickles for its workers); the bank is
    opened on first use in each process and its lesion arrays are memory-mapped. Arguments as `generate`'s:
    `load` (a family: low, medium, high, uniform, gaussian, real), `load_range` (LO, HI mm³ instead of the
    bank's observed range), `mode`, `tolerance`, `recipe` / `augment` (see `sample_config`). `donor_cases`:
    the bank cases whose lesions may be pasted; default every case except the sample's own (no case gets its
    own lesions back).
    """

    def __init__(self, bank, load: str = "uniform", load_range=None, mode: str = "both", tolerance: float = 0.1,
                 recipe: str | None = None, augment: AugmentConfig | dict | None = None, donor_cases=None):
        self.bank_dir = str(Path(bank).resolve())
        self.cfg = sample_config(self.bank, load, load_range, mode, tolerance, recipe, augment)
        self.donor_cases = None if donor_cases is None else tuple(str(c) for c in donor_cases)
        known = {c["case_id"] for c in self.bank.cases}
        unknown = sorted(set(self.donor_cases or ()) - known)
        if unknown:
            raise InputError(f"donor case {unknown[0]!r}: not a case of the bank {self.bank_dir}")

    @property
    def bank(self) -> Bank:
        return open_bank(self.bank_dir)

    def mix(self, channels: np.ndarray, label: np.ndarray, affine: np.ndarray, case_id: str | None = None,
            paths=(), seed: int = 0, case_index: int = 0, plan: dict | None = None
            ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Inpaint and populate one sample until its drawn target load, with the generator
        `case_rng(seed, case_index)`, or render a recorded `plan` again. `channels` float32 (C, X, Y, Z) and
        `label` uint8 (X, Y, Z) (see `case_arrays`) are changed in place. `case_id` (or, without it, one of
        the sample's file `paths`) names the sample's case. Returns (channels, label, record): the seed,
        case index, the sample's case and the bank case whose stored data were used (`base_case`, None for
        another image), then the manifest fields of the plan."""
        bank = self.bank
        if plan is not None:
            if plan["base_case"] is not None and plan["base_case"] not in {c["case_id"] for c in bank.cases}:
                raise InputError(f"the recorded plan was made with another bank (no case {plan['base_case']!r} "
                                 f"in {self.bank_dir})")
            return synthesize_arrays(channels, label, affine, bank, self.cfg, None, plan["base_case"],
                                     replay=plan)
        case_id = case_id if case_id is not None else case_of_paths(bank, paths)
        base = stored_case(bank, channels, label, affine, case_id)
        cases = self.donor_cases
        if cases is None:
            cases = [c["case_id"] for c in bank.cases if c["case_id"] != (case_id or base)]
        channels, label, record = synthesize_arrays(channels, label, affine, bank, self.cfg,
                                                    case_rng(seed, case_index), base, donor_lesions(bank, cases))
        return channels, label, {"seed": int(seed), "case_index": int(case_index), "case_id": case_id or base,
                                 "base_case": base, **record}


def case_of_paths(bank: Bank, paths) -> str | None:
    """The bank case one of whose files (images or label) is among `paths`, or None."""
    wanted = {str(Path(p).resolve()) for p in paths if p}
    for case in bank.cases:
        if wanted.intersection([*case["images"], case["label"]]):
            return case["case_id"]
    return None


def stored_case(bank: Bank, channels: np.ndarray, label: np.ndarray, affine: np.ndarray,
                case_id: str | None) -> str | None:
    """The bank case these arrays are, as build-bank read it (same grid, then `is_unchanged`): `case_id` if it
    is one, or without a name the case they match; None for any other image."""
    known = [c["case_id"] for c in bank.cases]
    candidates = ([case_id] if case_id in known else []) if case_id is not None else known
    candidates = [cid for cid in candidates if on_grid_of(bank, cid, label.shape, affine)]
    if not candidates:
        return None
    lesion_voxels = count_in(label, bank.lesion_labels)
    return next((cid for cid in candidates if is_unchanged(bank, cid, channels, label, affine, lesion_voxels)), None)


def on_grid_of(bank: Bank, case_id: str, shape, affine: np.ndarray) -> bool:
    """Whether (shape, affine) is bank case `case_id`'s grid."""
    info = bank.case_info(case_id)
    return tuple(shape) == tuple(info["shape"]) and np.allclose(affine, info["affine"], atol=AFFINE_ATOL_MM)


def is_unchanged(bank: Bank, case_id: str, channels: np.ndarray, label: np.ndarray, affine: np.ndarray,
                 lesion_voxels: int) -> bool:
    """Whether arrays on bank case `case_id`'s grid, with `lesion_voxels` lesion voxels, are that case as it was
    read: its lesion voxel count, the voxels of every crop the bank cut from it, and its intensity reference.
    A flip or intensity change made before this transform makes the sample another image, for which the
    case's stored region and registration are wrong."""
    info = bank.case_info(case_id)
    if lesion_voxels != info["load_voxels"]:
        return False
    if not all(crop_matches(bank, les, channels, label, affine) for les in bank.lesions
               if les["source_case"] == case_id):
        return False
    region = bank.body_region(case_id) or allowed_region(channels, label, affine, bank.channel_names,
                                                         bank.region_labels)
    return intensity_reference(channels, region) == info.get("intensity_ref")


def crop_matches(bank: Bank, lesion: dict, channels: np.ndarray, label: np.ndarray, affine: np.ndarray) -> bool:
    """Whether the arrays hold a bank lesion's crop where it was cut from them: the same channel values, and
    lesion labels under its mask."""
    to_voxel = np.linalg.inv(affine)
    origin = np.asarray(lesion["affine"], dtype=np.float64)[:3, 3]
    start = np.rint(to_voxel[:3, :3] @ origin + to_voxel[:3, 3]).astype(int)
    box = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, lesion["shape"]))
    if start.min() < 0 or any(b.stop > n for b, n in zip(box, label.shape)):
        return False
    image, mask = bank.lesion_arrays(lesion["id"])
    if not np.array_equal(channels[(slice(None),) + box], image):
        return False
    return bool(label_in(label[box][mask.astype(bool)], bank.lesion_labels).all())


def case_arrays(images: list[np.ndarray], label: np.ndarray, n_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A sample's images ((Ci, X, Y, Z) each, any dtype) and label ((1, X, Y, Z) or (X, Y, Z), integer values)
    as the arrays `generate` works on: float32 channels and a uint8 label, each volume in NIfTI's voxel order
    as `load_case` lays them out, so that every sum over them runs in the same order and the result is the
    same to the last bit."""
    total = sum(int(im.shape[0]) for im in images)
    if total != n_channels:
        raise InputError(f"the sample holds {total} image channel(s); the bank was built from {n_channels}")
    shape = tuple(label.shape[-3:])
    channels = channel_stack(n_channels, shape)
    at = 0
    for image in images:
        if tuple(image.shape[1:]) != shape:
            raise InputError(f"an image of shape {tuple(image.shape[1:])} and a label of shape {shape}: "
                             f"they must share one grid")
        channels[at: at + image.shape[0]] = image
        at += image.shape[0]
    return channels, label_volume(label)


def label_volume(label: np.ndarray) -> np.ndarray:
    """A label map ((1, X, Y, Z) or (X, Y, Z); integer values in any dtype) as uint8 (X, Y, Z), x fastest."""
    if label.ndim == 4:
        if label.shape[0] != 1:
            raise InputError(f"the label map has {label.shape[0]} channels; LesionMix needs one")
        label = label[0]
    if label.ndim != 3:
        raise InputError(f"the label map has shape {label.shape}; LesionMix needs a 3-D volume")
    if label.dtype.kind == "f":
        rounded = np.rint(label)
        if np.abs(label - rounded).max(initial=0.0) > LABEL_INTEGER_TOL:
            raise InputError("the label map holds non-integer values (interpolated linearly?)")
        label = rounded
    if label.size and (label.min() < 0 or label.max() > MAX_LABEL):
        raise InputError(f"the label map holds values outside 0..{MAX_LABEL}")
    out = np.empty(label.shape[::-1], dtype=np.uint8).T
    out[...] = label
    return out


def check_grid(affines: list[np.ndarray], names: list[str]) -> np.ndarray:
    """The sample's affine: the first of `affines`, which all must match (to AFFINE_ATOL_MM)."""
    first = np.asarray(affines[0], dtype=np.float64)
    for affine, name in zip(affines[1:], names[1:]):
        if not np.allclose(np.asarray(affine, dtype=np.float64), first, atol=AFFINE_ATOL_MM):
            raise InputError(f"{name}: its affine differs from that of {names[0]}; the images and the label must "
                             f"share one grid")
    return first


def recorded_plan(sample) -> dict | None:
    """The record of the last LesionMix plan applied to a sample, or None: a TorchIO subject (from its
    history) or the list of transforms `tio.utils.history_collate` gives per sample; a MONAI MetaTensor or a
    dictionary of them (from their applied operations)."""
    if isinstance(sample, (list, tuple)):  # transforms
        return next((t.plan for t in reversed(sample) if type(t).__name__ == "LesionMix"), None)
    history = getattr(sample, "applied_transforms", None)
    if history is not None:
        return next((args.get("plan") for name, args in reversed(history) if name == "LesionMix"), None)
    values = sample.values() if isinstance(sample, dict) else [sample]
    for value in values:
        for op in reversed(getattr(value, "applied_operations", None) or []):
            info = op.get("extra_info") if isinstance(op, dict) else None
            if isinstance(info, dict) and "lesionmix" in info:
                return info["lesionmix"]
    return None
