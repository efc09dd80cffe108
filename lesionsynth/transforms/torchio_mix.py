"""LesionMix as TorchIO transforms: `RandomLesionMix` draws a new plan per subject from torch's generator,
`LesionMix` applies the plan of a given seed and case index, or renders a recorded plan again (what a
subject's history holds)."""

from __future__ import annotations

import numpy as np

from ..errors import InputError, MissingExtraError
from .core import LesionMixer, case_arrays, check_grid

try:
    import torch
    import torchio as tio
except ImportError:
    raise MissingExtraError("the TorchIO transform needs torchio: pip install 'lesionsynth[torchio]'") from None

from .tensors import channels_like, label_like, to_numpy

#: numpy's floating-point error handling outside any np.errstate.
NUMPY_DEFAULT_ERRORS = {"divide": "warn", "over": "warn", "under": "ignore", "invalid": "warn"}
#: The settings both transforms take (and a subject's history records).
SETTINGS = ("bank", "load", "load_range", "mode", "tolerance", "recipe", "augment", "donor_cases", "case_key",
            "image_keys", "label_key")


class _Settings:
    """The constructor arguments shared by the random and the fixed transform."""

    def _keep_settings(self, bank, load, load_range, mode, tolerance, recipe, augment, donor_cases, case_key,
                       image_keys, label_key) -> None:
        self.bank, self.load, self.mode, self.tolerance = str(bank), load, mode, tolerance
        self.load_range = None if load_range is None else tuple(float(v) for v in load_range)
        self.recipe, self.augment = recipe, augment
        self.donor_cases = None if donor_cases is None else tuple(donor_cases)
        self.case_key, self.label_key = case_key, label_key
        self.image_keys = None if image_keys is None else tuple(image_keys)
        self.mixer = LesionMixer(bank, load, load_range, mode, tolerance, recipe, augment, donor_cases)

    def _settings(self) -> dict:
        return {name: getattr(self, name) for name in SETTINGS}


class RandomLesionMix(_Settings, tio.transforms.augmentation.RandomTransform):
    """Inpaint and paste bank lesions into a subject until its drawn target load, as `generate` makes a case.

    Acts on every `ScalarImage` of the subject (their channels in the subject's order make the bank's
    channels; `image_keys` picks and orders them) and its one `LabelMap` (or `label_key`), on their own grid
    and affine. Each call draws a seed from torch's generator (`torch.manual_seed` and DataLoader worker
    seeding make runs repeatable) and applies `LesionMix` with it, which the subject's history records
    together with the plan it drew.

    Args:
        bank: a bank folder made by `lesionsynth build-bank`.
        load, load_range, mode, tolerance, recipe, augment, donor_cases: as `generate`'s options
            (`transforms.core.LesionMixer`); by default no subject gets lesions of its own case.
        case_key: the subject key holding the sample's bank case id (else its file paths tell, else its grid
            and content); a bank case as build-bank read it gets the bank's stored region and registration.
        **kwargs: TorchIO's transform arguments (`p`, `copy`, ...).
    """

    def __init__(self, bank, load: str = "uniform", load_range=None, mode: str = "both", tolerance: float = 0.1,
                 recipe: str | None = None, augment=None, donor_cases=None, case_key: str | None = "case_id",
                 image_keys=None, label_key: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self._keep_settings(bank, load, load_range, mode, tolerance, recipe, augment, donor_cases, case_key,
                            image_keys, label_key)
        self.args_names = list(SETTINGS)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        seed = int(torch.randint(0, 2**31, (1,)).item())
        return LesionMix(**self._settings(), seed=seed, case_index=0, copy=False)(subject)


class LesionMix(_Settings, tio.transforms.Transform):
    """The lesion work of one plan on a subject: the plan drawn by `lesionsynth.plan.case_rng(seed,
    case_index)` (with the same base case, donors and settings this is the case `generate --seed SEED` writes
    as case CASE_INDEX), or a recorded `plan` rendered again. Other arguments as `RandomLesionMix`'s.

    The subject's history records the drawn plan as this transform's `plan` argument, so
    `subject.get_composed_history()` reproduces the sample from the original subject."""

    def __init__(self, bank, load: str = "uniform", load_range=None, mode: str = "both", tolerance: float = 0.1,
                 recipe: str | None = None, augment=None, donor_cases=None, case_key: str | None = "case_id",
                 image_keys=None, label_key: str | None = None, seed: int = 0, case_index: int = 0,
                 plan: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self._keep_settings(bank, load, load_range, mode, tolerance, recipe, augment, donor_cases, case_key,
                            image_keys, label_key)
        self.seed, self.case_index = int(seed), int(case_index)
        self._given_plan = plan
        self._drawn_plan = None
        self.args_names = [*SETTINGS, "seed", "case_index", "plan"]

    @property
    def plan(self) -> dict | None:
        """The recorded plan this transform renders, else the one it drew last (what the history keeps)."""
        return self._given_plan if self._given_plan is not None else self._drawn_plan

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        images, label_name = subject_images(subject, self.image_keys, self.label_key)
        label_image = subject[label_name]
        affine = check_grid([im.affine for im in images.values()] + [label_image.affine],
                            [*images, label_name])
        channels, label = case_arrays([to_numpy(im.data) for im in images.values()], to_numpy(label_image.data),
                                      len(self.mixer.bank.channel_names))
        case_id = subject.get(self.case_key) if self.case_key else None
        paths = [p for im in [*images.values(), label_image] for p in image_paths(im)]
        # TorchIO raises on floating-point warnings in a transform; the lesion work runs as in generate
        with np.errstate(**NUMPY_DEFAULT_ERRORS):
            channels, label, record = self.mixer.mix(channels, label, affine,
                                                     None if case_id is None else str(case_id), paths, self.seed,
                                                     self.case_index, self._given_plan)
        at = 0
        for image in images.values():
            n = image.data.shape[0]
            image.set_data(channels_like(channels[at: at + n], image.data))
            at += n
        label_image.set_data(label_like(label[None], label_image.data))
        self._drawn_plan = record
        return subject

    def __repr__(self) -> str:
        plan = self.plan
        shown = "None" if plan is None else f"<{len(plan['ops'])} operations>"
        return f"{self.name}(bank={self.bank!r}, load={self.load!r}, seed={self.seed}, " \
               f"case_index={self.case_index}, plan={shown})"


def subject_images(subject: tio.Subject, image_keys, label_key) -> tuple[dict, str]:
    """({name: ScalarImage} in channel order, the label map's name) of a subject."""
    if image_keys is not None:
        images = {k: subject[k] for k in image_keys}
    else:
        images = subject.get_images_dict(intensity_only=True)
    if not images:
        raise InputError("the subject holds no ScalarImage: LesionMix needs the bank's image channels")
    if label_key is not None:
        return images, label_key
    labels = [k for k, im in subject.get_images_dict(intensity_only=False).items() if isinstance(im, tio.LabelMap)]
    if len(labels) != 1:
        raise InputError(f"the subject holds {len(labels)} label maps ({', '.join(labels) or 'none'}): name the "
                         f"lesion label map with label_key")
    return images, labels[0]


def image_paths(image: tio.Image) -> list:
    """The file(s) an image was read from (none for an image made from a tensor)."""
    path = image.path
    if path is None:
        return []
    return list(path) if isinstance(path, (list, tuple)) else [path]


__all__ = ["LesionMix", "RandomLesionMix"]
