"""The size mix of drawn pastes: a case's first pastes come as the bank holds its lesions, at natural
scale (the many small lesions of a real case); later ones are tilted towards large lesions only as far as
the deficit needs (the few confluent lesions of a real high-load case)."""

from __future__ import annotations

import numpy as np

from lesionsynth.plan import AugmentConfig, draw_paste
from lesionsynth.prior import PlacementDensity

SMALL, LARGE = 30.0, 3000.0


def _lesions(n_small=10, n_large=2):
    vols = [SMALL] * n_small + [LARGE] * n_large
    return [{"id": f"l{i}", "source_case": "c", "label_value": 1, "volume_mm3": v, "affine": np.eye(4).tolist()}
            for i, v in enumerate(vols)]


def _draws(deficit_mm3, pasted, n=600, natural_pastes=8):
    cfg = AugmentConfig()
    density = PlacementDensity(affine=np.eye(4), cdf=np.array([1.0]), shape=(1, 1, 1), fallback=None)
    lesions = _lesions()
    volume = {les["id"]: les["volume_mm3"] for les in lesions}
    rng = np.random.default_rng(0)
    ops = [draw_paste(rng, lesions, deficit_mm3, 1.1 * deficit_mm3, density, 2, cfg, None, natural_pastes, pasted)
           for _ in range(n)]
    return np.array([volume[op["lesion_id"]] for op in ops]), np.array([op["scale"] for op in ops]), cfg


def test_first_pastes_are_drawn_as_the_bank_holds_them_at_natural_scale():
    vols, scales, cfg = _draws(deficit_mm3=50_000.0, pasted=0)
    assert abs(np.mean(vols == LARGE) - 2 / 12) < 0.05  # no tilt towards the large lesions
    assert np.all((scales >= cfg.natural_scale[0]) & (scales <= cfg.natural_scale[1]))


def test_later_pastes_are_tilted_towards_large_lesions_when_the_deficit_needs_them():
    vols, scales, _ = _draws(deficit_mm3=50_000.0, pasted=8)
    assert np.mean(vols == LARGE) > 0.9
    # a small deficit needs no tilt, even after the natural pastes
    vols, _, _ = _draws(deficit_mm3=100.0, pasted=8)
    assert np.mean(vols == LARGE) < 0.05


def test_a_natural_paste_larger_than_the_deficit_starts_at_most_at_the_size_that_fills_it():
    vols, scales, cfg = _draws(deficit_mm3=0.7 * SMALL, pasted=0)
    small = vols == SMALL
    assert small.mean() > 0.95  # a large lesion that does not fit is unlikely
    fill = np.cbrt(0.7)
    assert np.all(scales[small] <= fill + 1e-4)
    assert np.mean(np.isclose(scales[small], fill, atol=1e-4)) > 0.5  # natural draws above it are capped
    assert np.all(scales[small] >= cfg.natural_scale[0])


def test_local_host_match_tells_a_darker_tissue_under_a_bias_field():
    """The covered voxels are judged against the host tissue of their own surroundings (the mode, not the
    median of two tissues), so a tissue 20 % darker on one channel fails even where a bias field makes it as
    bright as the host tissue elsewhere in the head."""
    from lesionsynth.prior import local_host_match, mode_of, signature_units

    rng = np.random.default_rng(3)
    bias = 1.15  # this part of the head reads 15 % brighter
    host = np.stack([200 + rng.normal(0, 4, 700), 150 + rng.normal(0, 3, 700)]) * bias
    other = np.stack([230 + rng.normal(0, 4, 300), 120 + rng.normal(0, 3, 300)]) * bias  # grey matter-like
    around = np.concatenate([host, other], axis=1)
    mode = np.exp(mode_of(signature_units(around, (False, False)), 0.05))
    assert np.allclose(mode, [200 * bias, 150 * bias], rtol=0.01)
    assert local_host_match(host[:, :100], around, (False, False)) > 0.97
    assert local_host_match(other[:, :100], around, (False, False)) < 0.05
    mixed = np.concatenate([host[:, :60], other[:, :40]], axis=1)
    assert abs(local_host_match(mixed, around, (False, False)) - 0.6) < 0.05
    assert local_host_match(np.zeros((2, 0)), around, (False, False)) == 1.0
    assert local_host_match(host[:, :10], np.zeros((2, 0)), (False, False)) is None
    # CT channels compare Hounsfield differences (700 HU to the unit), not ratios
    ct = np.array([[40.0] * 50 + [45.0] * 50 + [150.0] * 20])
    assert local_host_match(ct[:, :100], ct, (True,)) == 1.0 and local_host_match(ct[:, 100:], ct, (True,)) == 0.0


def test_local_host_match_widens_to_the_noise_of_a_noisy_scan():
    """On a scan whose noise is 8 % of the tissue level, 0.1 in |log ratio| is little more than a noise sd: the
    test widens to 3 noise sd there, and still tells a tissue 40 % darker."""
    from lesionsynth.prior import local_host_match

    rng = np.random.default_rng(5)
    host = 100 + rng.normal(0, 8, (1, 2000))
    darker = 60 + rng.normal(0, 8, (1, 200))
    assert local_host_match(host[:, :500], host, (False,)) < 0.85
    assert local_host_match(host[:, :500], host, (False,), noise_sd=[8.0]) > 0.99
    assert local_host_match(darker, host, (False,), noise_sd=[8.0]) < 0.2
