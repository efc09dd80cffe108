"""Property-based tests (hypothesis) of the per-case loop's invariants on small random volumes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lesionsynth.bank import Bank, BankConfig, build_bank, lesion_mask
from lesionsynth.geometry import voxel_volume
from lesionsynth.io import load_case
from lesionsynth.plan import AugmentConfig, case_rng, plan_and_render_case
from lesionsynth.prior import allowed_region, is_ct, placement_density
from lesionsynth.render import PasteSettings, RenderContext, render_plan

from .conftest import blob_dataset


@pytest.fixture(scope="module")
def organ_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    ds = blob_dataset(root / "ds", n_cases=3, multiclass=True, oblique=True, channels=("T1", "T2"),
                      spacing=(0.9, 1.1, 1.6))
    return Bank(build_bank(ds, root / "bank", BankConfig(lesion_labels=(2,), region_labels=(1,)), progress=False))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**20), base=st.integers(0, 2), target_factor=st.floats(0.0, 4.0),
       mode=st.sampled_from(["both", "populate", "inpaint"]))
def test_case_loop_invariants(organ_bank, seed, base, target_factor, mode):
    bank = organ_bank
    ref = bank.case_refs()[base]
    case = load_case(ref, 2)
    base_label = case.label.copy()
    lesion_labels = bank.lesion_labels
    region = allowed_region(case.channels, case.label, case.affine, bank.channel_names, bank.region_labels)
    likelihood = bank.coarse_likelihood(region.stride, case.affine, case.label.shape, region.coarse.shape)
    density = placement_density(region, case.label, case.affine, lesion_labels, likelihood)
    ctx = RenderContext(lesion_labels, 26, PasteSettings(tuple(is_ct(n) for n in bank.channel_names)),
                        region.mask_in)
    max_load = bank.real_loads().max()
    channels, label = case.channels.copy(), case.label.copy()
    plan = plan_and_render_case(channels, label, case.affine, bank, bank.lesions, density, ctx, case_rng(seed, 0),
                                target_factor * max_load, 0.1, mode, AugmentConfig(), region)

    # image and label stay aligned, labels stay within the declared values
    assert channels.shape[1:] == label.shape == base_label.shape
    assert set(np.unique(label)) <= {0, 1, 2}
    # the recorded load is the label's load
    assert plan.load_mm3 == pytest.approx(lesion_mask(label, lesion_labels).sum() * voxel_volume(case.affine))
    # pasted lesion voxels lie in the allowed region (organ, or where a lesion was) for >= 90 %
    new = (label == 2) & (base_label != 2)
    if new.sum() > 0:
        assert np.isin(base_label[new], [1, 2]).mean() >= 0.85
    # an inpainted component leaves no lesion label behind, and its voxels take the organ label
    for op in plan.ops:
        if op["op"] == "inpaint" and not any(o["op"] == "paste" for o in plan.ops):
            assert label[tuple(op["seed_voxel"])] != 2
    if mode == "populate":
        assert all(op["op"] == "paste" for op in plan.ops)
    if mode == "inpaint":
        assert all(op["op"] == "inpaint" for op in plan.ops)
    # rendering the recorded plan again reproduces the case exactly
    again_channels, again_label = render_plan(case.channels, case.label, case.affine, plan.ops, bank, ctx)
    assert np.array_equal(again_label, label)
    assert np.array_equal(again_channels, channels)
