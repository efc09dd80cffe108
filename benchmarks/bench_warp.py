"""Lesion warps per second (numpy/scipy vs torch CPU vs CUDA) and one full-volume warp.

    python benchmarks/bench_warp.py [--quick] [--seed 0]

A lesion warp is one `resample_lesion` call as `paste_patch` makes it (2 channels + mask, crop n³ with a
ball lesion, flip, rotation ±45°, scale 1.15, 4×4×4 elastic grid up to 3 mm, src_box = lesion bbox,
support 2 mm) into a 197×233×189 1 mm target. Reported: median seconds over repeats after one warm-up call.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from lesionsynth.render import torch_backend as tb
from lesionsynth.render.paste import resample_lesion

TARGET_SHAPE = (197, 233, 189)
SUPPORT_MM = 2.0  # 4 × the default 0.5 mm feather, as paste_patch passes it


def lesion_case(n: int, rng: np.random.Generator):
    """Arguments of resample_lesion for an n³ crop (0.9 mm) holding a ball lesion, pasted mid-volume."""
    g = np.indices((n, n, n)).astype(np.float32)
    r = np.sqrt(sum((g[i] - (n - 1) / 2) ** 2 for i in range(3)))
    mask = (r < 0.35 * n).astype(np.float32)
    image = np.stack([500 + 300 * mask + 20 * rng.standard_normal(mask.shape),
                      100 + 0.5 * g[0] + 10 * rng.standard_normal(mask.shape)]).astype(np.float32)
    src_affine = np.diag([0.9, 0.9, 0.9, 1.0])
    src_affine[:3, 3] = [-30.0, 12.0, 5.0]
    src_centre = src_affine[:3, :3] @ np.full(3, (n - 1) / 2) + src_affine[:3, 3]
    tgt_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    tgt_affine[:3, 3] = [-98.0, -116.0, -94.0]
    op = {"centre_mm": [0.0, 0.0, 0.0], "flip": [True, False, True], "rotation_deg": [30.0, -20.0, 40.0],
          "scale": 1.15, "elastic_mm": np.clip(rng.normal(0.0, 1.5, (4, 4, 4, 3)), -3, 3).tolist()}
    nz = np.nonzero(mask)
    src_box = [[int(i.min()), int(i.max()) + 1] for i in nz]
    return image, mask, src_affine, src_centre, tgt_affine, TARGET_SHAPE, op, src_box, SUPPORT_MM


def volume_case(rng: np.random.Generator):
    """A two-channel 197×233×189 case with a label, and warp parameters."""
    shape = TARGET_SHAPE
    channels = rng.standard_normal((2,) + shape, dtype=np.float32) * 10 + 100
    label = (rng.random(shape) < 0.01).astype(np.uint8)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    control = np.clip(rng.normal(0.0, 1.5, (4, 4, 4, 3)), -3, 3)
    return channels, label, affine, control, [8.0, -5.0, 10.0], 1.05


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def backends():
    """(name, device) pairs to run: numpy always, torch CPU and CUDA when available."""
    out = [("numpy", None)]
    if tb.torch_available():
        out.append(("torch-cpu", "cpu"))
        if tb.resolve_device("auto") == "cuda":
            out.append(("torch-cuda", "cuda"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    reps = {32: 3, 64: 2, 128: 1, "volume": 1} if args.quick else {32: 20, 64: 10, 128: 5, "volume": 3}
    info = f"python {platform.python_version()}, {platform.machine()}"
    if tb.torch_available():
        import torch

        info += f", torch {torch.__version__} ({torch.get_num_threads()} CPU threads)"
        if torch.cuda.is_available():
            info += f", {torch.cuda.get_device_name(0)}"
    print(info)
    print(f"{'case':<34} {'backend':<11} {'median ms':>10} {'per second':>11}")
    for n in (32, 64, 128):
        case = lesion_case(n, rng)
        box = resample_lesion(*case)[0]
        label = f"lesion {n}^3 -> box {'x'.join(str(s.stop - s.start) for s in box)}"
        for name, device in backends():
            if device is None:
                sec = median_seconds(lambda: resample_lesion(*case), reps[n])
            else:
                sec = median_seconds(lambda: tb.resample_lesion_torch(*case, device=device), reps[n])
            print(f"{label:<34} {name:<11} {1e3 * sec:>10.1f} {1.0 / sec:>11.1f}")
    vol = volume_case(rng)
    label = "volume 197x233x189, 2 ch + label"
    for name, device in backends():
        if device is None:
            sec = median_seconds(lambda: tb.warp_volume_numpy(*vol), reps["volume"])
        else:
            sec = median_seconds(lambda: tb.warp_volume_torch(*vol, device=device), reps["volume"])
        print(f"{label:<34} {name:<11} {1e3 * sec:>10.1f} {1.0 / sec:>11.2f}")


if __name__ == "__main__":
    main()
