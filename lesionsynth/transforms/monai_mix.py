"""LesionMix as MONAI dictionary transforms: `RandLesionMixd` draws a new plan per sample from its own
generator (`self.R`, set by `set_random_state` and by MONAI's DataLoader in each worker), `LesionMixd`
applies the plan of a given seed and case index, or renders a recorded plan again (what the applied
operations of a sample hold)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from ..errors import InputError, MissingExtraError
from .core import LesionMixer, case_arrays, check_grid

try:
    import torch
    from monai.data import MetaTensor
    from monai.transforms import InvertibleTransform, MapTransform, RandomizableTransform
    from monai.utils import TraceKeys, convert_to_dst_type
except ImportError:
    raise MissingExtraError("the MONAI transform needs monai: pip install 'lesionsynth[monai]'") from None

from .tensors import channels_like, label_like, to_numpy


class _LesionMixDict(MapTransform, InvertibleTransform):
    """What the random and the fixed transform share: settings, reading the sample, writing it back."""

    def __init__(self, keys, label_key: Hashable, bank, load: str, load_range, mode: str, tolerance: float,
                 recipe: str | None, augment, donor_cases, case_key: Hashable | None, allow_missing_keys: bool):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if label_key in self.keys:
            raise InputError(f"label_key {label_key!r} is among the image keys {list(self.keys)}")
        self.label_key, self.case_key = label_key, case_key
        self.mixer = LesionMixer(bank, load, load_range, mode, tolerance, recipe, augment, donor_cases)

    def mix(self, data: Mapping, seed: int, case_index: int, plan: dict | None) -> dict:
        """`data` with the lesion work of one plan done on its image keys and its label; the record of the plan
        is pushed onto the applied operations of each (its `extra_info`)."""
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        names = [str(k) for k in [*keys, self.label_key]]
        affine = check_grid([sample_affine(d, k) for k in [*keys, self.label_key]], names)
        channels, label = case_arrays([to_numpy(d[k]) for k in keys], to_numpy(d[self.label_key]),
                                      len(self.mixer.bank.channel_names))
        case_id = d.get(self.case_key) if self.case_key is not None else None
        paths = [sample_path(d[k]) for k in [*keys, self.label_key]]
        channels, label, record = self.mixer.mix(channels, label, affine, None if case_id is None else str(case_id),
                                                 paths, seed, case_index, plan)
        at = 0
        for key in keys:
            n = d[key].shape[0]
            d[key] = self._traced(convert_to_dst_type(channels_like(channels[at: at + n], d[key]), d[key])[0], record)
            at += n
        d[self.label_key] = self._traced(convert_to_dst_type(label_like(label[None], d[self.label_key]),
                                                             d[self.label_key])[0], record)
        return d

    def _traced(self, value, record: dict):
        return self.push_transform(value, extra_info={"lesionmix": record}) if isinstance(value, MetaTensor) \
            else value

    def inverse(self, data: Mapping) -> dict:
        """The lesion work moves no voxel: its inverse leaves the data as they are and drops its entry from
        the applied operations, so that the spatial transforms before it can be inverted."""
        d = dict(data)
        for key in [*self.key_iterator(d), self.label_key]:
            ops = getattr(d.get(key), "applied_operations", None)
            if ops and ops[-1].get(TraceKeys.CLASS_NAME) == self.__class__.__name__:
                self.pop_transform(d[key], check=False)
        return d


class RandLesionMixd(RandomizableTransform, _LesionMixDict):
    """Inpaint and paste bank lesions into a sample until its drawn target load, as `generate` makes a case.

    Args:
        keys: the image keys (MetaTensors (C, X, Y, Z) with their affines, e.g. from `LoadImaged` and
            `EnsureChannelFirstd`); their channels in this order make the bank's channels.
        label_key: the key of the label map (1, X, Y, Z).
        bank: a bank folder made by `lesionsynth build-bank`.
        load, load_range, mode, tolerance, recipe, augment, donor_cases: as `generate`'s options
            (`transforms.core.LesionMixer`); by default no sample gets lesions of its own case.
        case_key: the key holding the sample's bank case id (else its file names tell, else its grid and
            content); a bank case as build-bank read it gets the bank's stored region and registration.
        prob: the probability of applying it.

    The record of the drawn plan (seed, case index, base case, operations) is the `extra_info["lesionmix"]` of
    this transform's entry in each key's `applied_operations`; `LesionMixd(..., plan=record)` renders it again.
    """

    def __init__(self, keys, label_key: Hashable, bank, load: str = "uniform", load_range=None, mode: str = "both",
                 tolerance: float = 0.1, recipe: str | None = None, augment=None, donor_cases=None,
                 case_key: Hashable | None = "case_id", prob: float = 1.0, allow_missing_keys: bool = False):
        RandomizableTransform.__init__(self, prob)
        _LesionMixDict.__init__(self, keys, label_key, bank, load, load_range, mode, tolerance, recipe, augment,
                                donor_cases, case_key, allow_missing_keys)
        self._seed = 0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._seed = int(self.R.randint(0, 2**31))

    def __call__(self, data: Mapping) -> dict:
        self.randomize()
        if not self._do_transform:
            return dict(data)
        return self.mix(data, self._seed, 0, None)


class LesionMixd(_LesionMixDict):
    """The lesion work of one plan on a sample: the plan drawn by `lesionsynth.plan.case_rng(seed,
    case_index)` (with the same base case, donors and settings this is the case `generate --seed SEED` writes
    as case CASE_INDEX), or a recorded `plan` rendered again. Other arguments as `RandLesionMixd`'s."""

    def __init__(self, keys, label_key: Hashable, bank, load: str = "uniform", load_range=None, mode: str = "both",
                 tolerance: float = 0.1, recipe: str | None = None, augment=None, donor_cases=None,
                 case_key: Hashable | None = "case_id", seed: int = 0, case_index: int = 0,
                 plan: dict | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, label_key, bank, load, load_range, mode, tolerance, recipe, augment, donor_cases,
                         case_key, allow_missing_keys)
        self.seed, self.case_index, self.plan = int(seed), int(case_index), plan

    def __call__(self, data: Mapping) -> dict:
        return self.mix(data, self.seed, self.case_index, self.plan)


def sample_affine(d: Mapping, key: Hashable):
    """The affine of `d[key]`: a MetaTensor's own, else that of its `{key}_meta_dict`."""
    value = d[key]
    if isinstance(value, MetaTensor):
        return to_numpy(value.affine)
    meta = d.get(f"{key}_meta_dict") or {}
    if "affine" not in meta:
        raise InputError(f"{key}: LesionMix needs the image's affine: load it with LoadImaged (a MetaTensor)")
    return to_numpy(torch.as_tensor(meta["affine"]))


def sample_path(value) -> str | None:
    """The file a MetaTensor was read from, if it says."""
    name = value.meta.get("filename_or_obj") if isinstance(value, MetaTensor) else None
    return name if isinstance(name, str) else None


__all__ = ["LesionMixd", "RandLesionMixd"]
