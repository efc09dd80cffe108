"""The metric functions of benchmarks/inpaint_truth.py (the inpainting benchmark against a healthy truth)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("inpaint_truth")


@pytest.fixture(scope="module")
def case():
    """A healthy noisy volume and the same with a bright ball 'lesion' added."""
    rng = np.random.default_rng(3)
    healthy = (100.0 + 5.0 * rng.standard_normal((24, 24, 24))).astype(np.float32)
    grid = np.indices(healthy.shape) - 12
    lesion = (grid ** 2).sum(axis=0) <= 16
    base = healthy.copy()
    base[lesion] += 60.0
    return healthy, base, lesion


def test_residual_excess_untouched_is_one_and_perfect_fill_is_zero(bench, case):
    healthy, base, lesion = case
    assert bench.residual_excess(base, base, healthy, lesion) == pytest.approx(1.0)
    assert bench.residual_excess(healthy, base, healthy, lesion) == pytest.approx(0.0, abs=1e-9)
    half = healthy + 0.5 * (base - healthy)
    assert bench.residual_excess(half, base, healthy, lesion) == pytest.approx(0.5)
    # no excess in the base: undefined
    assert math.isnan(bench.residual_excess(healthy, healthy, healthy, lesion))


def test_psnr_identical_is_inf_and_falls_with_error(bench, case):
    healthy, base, lesion = case
    assert bench.psnr(healthy, healthy, 100.0) == math.inf
    assert bench.psnr(base, healthy, 100.0, lesion) == pytest.approx(10 * np.log10(100.0 ** 2 / 60.0 ** 2))
    assert bench.psnr(base, healthy, 100.0) > bench.psnr(base, healthy, 100.0, lesion)


def test_ssim_and_mae(bench, case):
    healthy, base, lesion = case
    assert np.allclose(bench.ssim_map(healthy, healthy, 100.0), 1.0)
    assert bench.ssim_map(base, healthy, 100.0)[lesion].mean() < 0.9
    assert bench.mae(healthy, healthy, 100.0, lesion) == 0.0
    assert bench.mae(base, healthy, 100.0, lesion) == pytest.approx(0.6, rel=1e-6)


def test_shell_median_fill(bench, case):
    _, base, lesion = case
    region = bench.dilate1(lesion)
    image = base.copy()
    dist = np.sqrt(((np.indices(base.shape) - 12) ** 2).sum(axis=0))
    image[(dist > 4) & (dist <= 8)] = 77.0  # a lesion of radius 4: the 2-4 mm shell lies at 4 < r <= 8
    filled, value = bench.shell_median_fill(image, lesion, region, (1.0, 1.0, 1.0))
    assert value == 77.0
    assert np.all(filled[region] == 77.0)
    assert np.array_equal(filled[~region], image[~region])
    # voxels excluded from the shell (another lesion) do not count
    other = np.zeros_like(lesion)
    other[:, :, :13] = True
    filled, value = bench.shell_median_fill(image, lesion, region, (1.0, 1.0, 1.0), not_lesion=~other)
    assert value == 77.0


def test_texture_ratio(bench, case):
    healthy, _, lesion = case
    region = bench.dilate1(lesion)
    assert bench.texture_ratio(healthy, healthy, region) == pytest.approx(1.0)
    flat = np.full_like(healthy, 100.0)
    assert bench.texture_ratio(flat, healthy, region) == 0.0
