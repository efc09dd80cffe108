"""Check a whole dataset before anything is written: every file of every case, all problems at once.

`validate_dataset` is what `lesionsynth check DATASET` runs; `inspect_case` holds the per-case checks and
`load_case` reads a case through them, so build-bank and generate stop with the same one-line message for
a fault.
Everything reported here is an error: there is no warning class.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError
from .dataset import Case, CaseRef, DatasetSpec, open_dataset
from .images import IMAGE_ENDINGS, load_image
from .nifti import read_array

#: grids of a case's files must agree to this many mm (origin, voxel spacing) ...
AFFINE_ATOL_MM = 1e-3
#: ... and their axis directions (unit vectors) to this much (1e-3 is about 0.06 degrees)
DIRECTION_ATOL = 1e-3
#: float-stored label values may be this far from an integer (0.9999999997 from a scaled int16 is 1)
LABEL_INTEGER_TOL = 1e-3
#: labels are kept as uint8
MAX_LABEL = 255
_EXAMPLES = 5


@dataclass
class Problem:
    """One fault in one file (or in the dataset as a whole): `str()` gives the line "path: message"."""

    path: str
    message: str
    #: the case the file belongs to; None for dataset-wide problems (dataset.json, options, layout)
    case_id: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.path = one_line(str(self.path))
        self.message = one_line(str(self.message))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    @classmethod
    def from_text(cls, text: str, case_id: str | None = None) -> Problem:
        """Split a "path: message" line (open_dataset's problems, InputError messages)."""
        path, sep, message = str(text).partition(": ")
        if not sep:
            return cls("dataset", str(text), case_id)
        return cls(path, message, case_id)


def one_line(text: str) -> str:
    """`text` with line breaks replaced, so an error is always exactly one line."""
    return re.sub(r"\s*[\r\n]+\s*", " | ", text.strip())


@dataclass
class CaseCheck:
    """What checking one case found: the loaded case (None if it has problems or data was not kept), its
    problems, and its voxel count per label value (None if the label could not be read)."""

    case: Case | None
    problems: list[Problem]
    label_counts: dict[int, int] | None
    voxel_mm3: float | None = None  # the label grid's voxel volume (None if its affine is unusable)


# ----------------------------------------------------------------------------------------------------
# single files


def _problem_from_error(path, exc: InputError, case_id: str | None) -> Problem:
    text, prefix = str(exc), f"{path}: "
    if text.startswith(prefix):
        return Problem(str(path), text[len(prefix):], case_id)
    return Problem.from_text(text, case_id)


def _fmt_values(values) -> str:
    values = list(values)
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:_EXAMPLES])
    return shown + (f", ... ({len(values)} values)" if len(values) > _EXAMPLES else "")


def affine_problem(affine) -> str | None:
    """Why an affine cannot map voxels to mm (non-finite, zero or degenerate axes), or None."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        return "affine (sform/qform) holds NaN or infinite values"
    m = a[:3, :3]
    norms = np.sqrt((m ** 2).sum(axis=0))
    if norms.min() < 1e-6:
        return f"affine is not invertible: voxel axis {int(norms.argmin())} has zero length (determinant 0)"
    det = float(np.linalg.det(m))
    if abs(det) / float(np.prod(norms)) < 1e-6:
        return f"affine is not invertible: voxel axes are degenerate (determinant {det:.3g})"
    return None


def _voxel_type_problem(img: nib.Nifti1Image) -> str | None:
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        return f"unsupported voxel type {dtype} (use an integer or float type)"
    return None


def _spatial_shape(shape: tuple, four_d_channels: int | None) -> tuple | None:
    """The 3-D grid of an image or label shape, or None when the shape is not acceptable."""
    if four_d_channels is None:
        if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
            return tuple(shape[:3])
        return None
    if len(shape) == 4 and shape[3] == four_d_channels:
        return tuple(shape[:3])
    return None


def grid_problem(shape, affine, ref_shape, ref_affine, ref_name: str) -> str | None:
    """Why a file's voxel grid differs from the reference grid (`ref_name`, e.g. "its label x.nii.gz")."""
    if tuple(shape) != tuple(ref_shape):
        return f"shape {tuple(int(s) for s in shape)} differs from {ref_name} {tuple(int(s) for s in ref_shape)}"
    a, b = np.asarray(affine, dtype=np.float64), np.asarray(ref_affine, dtype=np.float64)
    faults = []
    shift = float(np.abs(a[:3, 3] - b[:3, 3]).max())
    if shift > AFFINE_ATOL_MM:
        faults.append(f"origin off by {shift:.3g} mm")
    na, nb = np.sqrt((a[:3, :3] ** 2).sum(axis=0)), np.sqrt((b[:3, :3] ** 2).sum(axis=0))
    if np.abs(na - nb).max() > AFFINE_ATOL_MM:
        faults.append(f"voxel spacing {_fmt_values(np.round(na, 4).tolist())} mm vs "
                      f"{_fmt_values(np.round(nb, 4).tolist())} mm")
    da, db = a[:3, :3] / np.maximum(na, 1e-12), b[:3, :3] / np.maximum(nb, 1e-12)
    if np.abs(da - db).max() > DIRECTION_ATOL:
        cos = np.clip((da * db).sum(axis=0), -1.0, 1.0)
        faults.append(f"axis directions differ by up to {float(np.degrees(np.arccos(cos)).max()):.3g} degrees")
    if not faults and not np.allclose(a, b, rtol=0, atol=AFFINE_ATOL_MM):
        faults.append(f"affines differ by up to {float(np.abs(a - b).max()):.3g}")
    return f"affine differs from {ref_name} ({'; '.join(faults)})" if faults else None


def _value_counts(label: np.ndarray, high: int) -> np.ndarray:
    """Voxels per value of a uint8 array whose largest value is `high`: a byte comparison per value when
    there are few values (the usual label), else bincount in chunks (it converts to int64 as it goes)."""
    flat = label.ravel(order="K")  # a view in any memory order
    counts = np.zeros(MAX_LABEL + 1, dtype=np.int64)
    if high < 16:
        counts[0] = flat.size
        for v in range(1, high + 1):
            counts[v] = np.count_nonzero(flat == v)
            counts[0] -= counts[v]
        return counts
    step = 1 << 22
    for i in range(0, flat.size, step):
        counts += np.bincount(flat[i:i + step], minlength=MAX_LABEL + 1)
    return counts


def _open_and_check_header(path: Path, case_id: str | None, opened: dict | None = None):
    """(image or None, problems) of an image file: whether it reads, its voxel type and its affine.
    `opened`: files read already (`_open_all`); this one's entry is taken out of it."""
    try:
        img = opened.pop(path) if opened and path in opened else load_image(path)
        if isinstance(img, InputError):
            raise img
    except InputError as exc:
        return None, [_problem_from_error(path, exc, case_id)]
    problems = [Problem(str(path), message, case_id)
                for message in (_voxel_type_problem(img), affine_problem(img.affine)) if message]
    return img, problems


def check_label_file(path, declared_labels=None, case_id: str | None = None, opened: dict | None = None):
    """Read and check a label file. Returns (image or None, uint8 3-D array or None, problems, counts)."""
    path = Path(path)
    img, problems = _open_and_check_header(path, case_id, opened)
    if img is None:
        return None, None, problems, None

    def fault(message: str) -> None:
        problems.append(Problem(str(path), message, case_id))

    shape3 = _spatial_shape(img.shape, None)
    if shape3 is None:
        fault(f"label must be 3-D, has shape {tuple(img.shape)}"
              + (" (4-D)" if len(img.shape) == 4 else ""))
    if _voxel_type_problem(img) or shape3 is None:
        return img, None, problems, None
    proxy = img.dataobj  # an array without scaling for a .mha/.nrrd image
    scaled = getattr(proxy, "slope", 1.0) not in (1.0, None) or getattr(proxy, "inter", 0.0) not in (0.0, None)
    dtype = np.float64 if img.get_data_dtype().kind == "f" or scaled else img.get_data_dtype()
    try:
        data = read_array(img, path, dtype=dtype).reshape(shape3)
    except InputError as exc:
        return img, None, problems + [_problem_from_error(path, exc, case_id)], None
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            fault(f"label holds NaN or infinite values ({int(data.size - np.count_nonzero(finite))} voxels)")
            return img, None, problems, None
        rounded = np.rint(data)
        off = np.abs(data - rounded) > LABEL_INTEGER_TOL
        if off.any():
            fault(f"label values are not integers (e.g. {_fmt_values(np.unique(data[off])[:_EXAMPLES].tolist())};"
                  f" {int(np.count_nonzero(off))} voxels)")
            return img, None, problems, None
        data = rounded
    elif data.dtype.kind == "b":
        data = data.astype(np.uint8)
    low, high = data.min(initial=0), data.max(initial=0)
    if low < 0:
        fault(f"label holds negative values ({_fmt_values(np.unique(data[data < 0]).astype(int).tolist())})")
    if high > MAX_LABEL:
        fault(f"label values above {MAX_LABEL} are not supported "
              f"(found {_fmt_values(np.unique(data[data > MAX_LABEL]).astype(int).tolist())})")
    if low < 0 or high > MAX_LABEL:
        return img, None, problems, None
    label = data.astype(np.uint8, copy=False)
    if not label.flags.writeable:  # a view of the file's bytes: generate edits the label in place
        label = label.copy(order="K")  # in the file's voxel order: a straight copy
    counts_arr = _value_counts(label, int(high))
    counts = {int(v): int(n) for v, n in enumerate(counts_arr) if n}
    if declared_labels:
        undeclared = sorted(set(counts) - set(int(v) for v in declared_labels))
        if undeclared:
            fault(f"label values {_fmt_values(undeclared)} are not declared in dataset.json labels "
                  f"(declared: {_fmt_values(sorted(set(int(v) for v in declared_labels)))})")
    if len(counts) == 1 and 0 not in counts:
        fault(f"label is {next(iter(counts))} everywhere (no background voxels)")
    return img, label, problems, counts


def check_image_file(path, four_d_channels: int | None = None, channel_names=None, case_id: str | None = None,
                     opened: dict | None = None):
    """Read and check an image file: 3-D (or 4-D with `four_d_channels` channels for MSD).
    Returns (image or None, 3-D grid shape or None, list of 3-D float32 channel arrays or None, problems)."""
    path = Path(path)
    img, problems = _open_and_check_header(path, case_id, opened)
    if img is None:
        return None, None, None, problems

    def fault(message: str) -> None:
        problems.append(Problem(str(path), message, case_id))

    shape3 = _spatial_shape(img.shape, four_d_channels)
    if shape3 is None:
        shape = tuple(int(s) for s in img.shape)
        if four_d_channels is not None:
            fault(f"expected a 4-D image with {four_d_channels} channels (dataset.json modality), "
                  f"got shape {shape}")
        elif len(shape) == 4:
            fault(f"image is 4-D with shape {shape}; expected 3-D (one file per channel)")
        else:
            fault(f"image must be 3-D, has shape {shape}")
    if _voxel_type_problem(img) or shape3 is None:
        return img, None, None, problems
    try:
        data = read_array(img, path)
    except InputError as exc:
        return img, shape3, None, problems + [_problem_from_error(path, exc, case_id)]
    if four_d_channels is None:
        channels = [data.reshape(shape3)]
    else:
        channels = [data[..., c] for c in range(four_d_channels)]
    for c, chan in enumerate(channels):
        what = "image"
        if four_d_channels is not None:
            name = channel_names[c] if channel_names and c < len(channel_names) else None
            what = f"channel {c}" + (f" ({name})" if name else "")
        if chan.size == 0:
            fault(f"{what} has no voxels (shape {tuple(int(n) for n in img.shape)})")
            continue
        low, high = float(chan.min()), float(chan.max())  # NaN propagates, so both finite = all finite
        if not (np.isfinite(low) and np.isfinite(high)):
            bad = int(chan.size - np.count_nonzero(np.isfinite(chan)))
            fault(f"{what} holds NaN or infinite values ({bad} voxels)")
            continue
        if low == high:
            fault(f"{what} is empty (all voxels are 0)" if low == 0 else f"{what} is constant (all voxels are {low:g})")
    return img, shape3, channels, problems


# ----------------------------------------------------------------------------------------------------
# cases


def channel_stack(n_channels: int, shape) -> np.ndarray:
    """An empty float32 (C, X, Y, Z) array whose channels each lie in NIfTI's voxel order (x fastest).

    Files hold voxels in that (Fortran) order and nibabel reads them so; copying them into C-ordered
    channels, and back when writing, would transpose every volume twice per case.
    """
    return np.empty((n_channels,) + tuple(shape)[::-1], dtype=np.float32).transpose(0, 3, 2, 1)


def _open_all(paths, threads: int) -> dict:
    """`load_image` of every file, `threads` at a time (decompression lets go of the interpreter lock): each
    path's image, or the InputError its read raised."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: Path):
        try:
            return load_image(path)
        except InputError as exc:
            return exc

    paths = [Path(p) for p in paths]
    with ThreadPoolExecutor(threads, thread_name_prefix="lesionsynth-file") as pool:
        return dict(zip(paths, pool.map(one, paths)))


def inspect_case(ref: CaseRef, n_channels: int, declared_labels=None, keep_data: bool = True,
                 channel_names=None, file_threads: int = 1) -> CaseCheck:
    """Check one case completely (all files, all faults); load it too when `keep_data` and it is sound.
    `file_threads` > 1 reads that many of its files at once (for a read nothing else runs beside: it holds
    them all in memory together)."""
    cid = ref.case_id
    files = [ref.label_path, *ref.image_paths]
    opened = _open_all(files, min(file_threads, len(files))) if file_threads > 1 else None
    label_img, label, problems, counts = check_label_file(ref.label_path, declared_labels, cid, opened)
    reference = None  # (shape, affine, name) that every image grid must match
    if (label_img is not None and _spatial_shape(label_img.shape, None) is not None
            and affine_problem(label_img.affine) is None):
        reference = (label_img.shape[:3], label_img.affine, f"its label {Path(ref.label_path).name}")
    channels, headers = [], []
    stack = None
    if ref.four_d:
        path = ref.image_paths[0]
        img, shape3, chans, probs = check_image_file(path, n_channels, channel_names, cid, opened)
        problems += probs
        if img is not None and shape3 is not None:
            if reference is not None and affine_problem(img.affine) is None:
                message = grid_problem(shape3, img.affine, *reference)
                if message:
                    problems.append(Problem(str(path), message, cid))
            if chans is not None:
                channels = chans
                hdr = img.header.copy()
                hdr.set_data_shape(shape3)
                headers = [hdr] * n_channels
    else:
        if len(ref.image_paths) != n_channels:
            problems.append(Problem(str(ref.label_path), f"case {cid} has {len(ref.image_paths)} channel files, "
                                                          f"expected {n_channels}", cid))
        for path in ref.image_paths:
            img, shape3, chans, probs = check_image_file(path, None, None, cid, opened)
            problems += probs
            if img is None or shape3 is None:
                continue
            if affine_problem(img.affine) is not None:
                pass  # reported already; comparing it with other grids would only add noise
            elif reference is None:
                reference = (shape3, img.affine, f"channel file {Path(path).name}")
            else:
                message = grid_problem(shape3, img.affine, *reference)
                if message:
                    problems.append(Problem(str(path), message, cid))
            if chans is not None:
                headers.append(img.header)
                if keep_data and not problems:
                    # straight into one (C, X, Y, Z) array: no list of channels plus a stacked copy
                    if stack is None:
                        stack = channel_stack(n_channels, chans[0].shape)
                    stack[len(headers) - 1] = chans[0]
            img = chans = None  # let this file's bytes go before the next one is read
    case = None
    if keep_data and not problems:
        if stack is None:
            stack = channel_stack(len(channels), channels[0].shape)
            for c, chan in enumerate(channels):
                stack[c] = chan
        case = Case(cid, stack, label, np.asarray(label_img.affine, dtype=np.float64), headers, label_img.header)
    voxel_mm3 = None
    if label_img is not None and affine_problem(label_img.affine) is None:
        voxel_mm3 = float(abs(np.linalg.det(np.asarray(label_img.affine, dtype=np.float64)[:3, :3])))
    return CaseCheck(case, problems, counts, voxel_mm3)


def load_case(ref: CaseRef, n_channels: int, file_threads: int = 1) -> Case:
    """Read one case (all channels + label); InputError with a one-line message if anything is wrong.

    The checks are those of `lesionsynth check`: unreadable or truncated files, shapes, affines, 4-D images,
    NaN/inf voxels, empty channels, non-integer/negative/undeclared label values. `file_threads`: see
    `inspect_case`.
    """
    check = inspect_case(ref, n_channels, ref.declared_labels or None, keep_data=True, file_threads=file_threads)
    if check.problems:
        more = len(check.problems) - 1
        raise InputError(str(check.problems[0]) + (f" (and {more} more problem{'s' if more > 1 else ''} in case "
                                                   f"{ref.case_id})" if more else ""))
    return check.case


def _check_task(kind: str, item, n_channels: int, declared, channel_names):
    """Worker: check one case (kind "case") or one file outside complete cases ("label", "image")."""
    if kind == "case":
        check = inspect_case(item, n_channels, declared, keep_data=False, channel_names=channel_names)
        return check.problems, None if check.label_counts is None else (check.label_counts, check.voxel_mm3)
    path, case_id, four_d = item
    if kind == "label":
        return check_label_file(path, declared, case_id)[2], None
    return check_image_file(path, n_channels if four_d else None, channel_names, case_id)[3], None


# ----------------------------------------------------------------------------------------------------
# datasets


def _meta_path(spec: DatasetSpec) -> Path:
    root = Path(spec.root)
    return root if spec.kind == "list" else root / "dataset.json"


def _case_of_path(path: str, spec: DatasetSpec) -> str | None:
    """Best guess of the case a problem's file belongs to (None: dataset-wide)."""
    p = Path(path)
    if p in (Path(spec.root), _meta_path(spec)):
        return None
    endings = "|".join(re.escape(e) for e in IMAGE_ENDINGS)
    if p.parent.name == "imagesTr" and spec.kind == "nnunet":
        m = re.match(rf"^(.+)_\d{{4}}({endings})$", p.name)
        return m[1] if m else None
    m = re.match(rf"^(.+?)({endings})$", p.name)
    return m[1] if m else None


def _loose_files(spec: DatasetSpec) -> list[tuple[str, tuple]]:
    """Files of incomplete cases (missing label or channel), so their own faults get reported too."""
    in_cases = {Path(p).resolve() for ref in spec.cases for p in (*ref.image_paths, ref.label_path)}
    root, out = Path(spec.root), []
    if spec.kind == "nnunet":
        try:
            ending = json.loads((root / "dataset.json").read_text()).get("file_ending", ".nii.gz")
        except (OSError, ValueError):
            return []
        pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
        for f in sorted((root / "imagesTr").glob(f"*{ending}")):
            m = pattern.match(f.name)
            if m and f.resolve() not in in_cases and int(m[2]) < len(spec.channel_names):
                out.append(("image", (str(f), m[1], False)))
        for f in sorted((root / "labelsTr").glob(f"*{ending}")):
            if not f.name.startswith(".") and f.resolve() not in in_cases:
                out.append(("label", (str(f), f.name[: -len(ending)], False)))
    elif spec.kind == "msd":
        try:
            training = json.loads((root / "dataset.json").read_text()).get("training", [])
        except (OSError, ValueError):
            return []
        for entry in training if isinstance(training, list) else []:
            if not isinstance(entry, dict):
                continue
            for role, key in (("image", "image"), ("label", "label")):
                value = entry.get(key)
                if not isinstance(value, str):
                    continue
                f = (root / value).resolve()
                if f.is_file() and f not in in_cases:
                    out.append((role, (str(f), _case_of_path(str(f), spec), len(spec.channel_names) > 1)))
    return out


def validate_dataset(path, lesion_labels=(1,), region_labels=(), jobs: int = 1, progress: bool = False,
                     figures: list[str] | None = None) -> tuple[DatasetSpec | None, list[Problem]]:
    """Check a dataset completely; return its spec (None if it cannot be opened) and every problem found.
    `figures`, if given, gets one line per lesion label: its voxels and mm³ over the cases read."""
    try:
        spec = open_dataset(path)
    except InputError as exc:
        return None, [Problem.from_text(str(exc))]
    problems = [Problem.from_text(text) for text in spec.problems]
    for p in problems:
        p.case_id = _case_of_path(p.path, spec)
    meta = str(_meta_path(spec))
    declared = sorted(set(spec.labels.values()))
    label_names = ", ".join(f"{k}={v}" for k, v in sorted(spec.labels.items(), key=lambda kv: kv[1]))

    for kind, values in (("lesion", lesion_labels), ("region", region_labels)):
        for v in values:
            if int(v) == 0:
                problems.append(Problem(f"--{kind}-label", f"{kind} label 0 is the background"))
            elif declared and int(v) not in declared:
                problems.append(Problem(meta, f"{kind} label {v} is not declared in labels ({label_names})"))
    if declared and 0 not in declared:
        problems.append(Problem(meta, f"labels do not declare the background value 0 ({label_names})"))

    ids = Counter(ref.case_id for ref in spec.cases)
    for cid, n in sorted(ids.items()):
        if n > 1:
            files = [str(ref.label_path) for ref in spec.cases if ref.case_id == cid]
            problems.append(Problem(meta, f"duplicate case id {cid!r} ({n} cases: {', '.join(files)})"))

    if not spec.cases and not problems:
        problems.append(Problem(str(spec.root), "no cases found"))

    n_channels = len(spec.channel_names)
    decl = tuple(declared) or None
    from tqdm import tqdm

    from ..parallel import execution

    tasks = [("case", ref) for ref in spec.cases] + _loose_files(spec)
    with execution(jobs=jobs) as runner:
        checks = runner.map(_check_task, [(kind, item, n_channels, decl, spec.channel_names) for kind, item in tasks])
        results = list(tqdm(checks, total=len(tasks), desc="check", unit="file", disable=not progress))
    label_counts, voxel_volumes = [], []
    for probs, counted in results:
        problems.extend(probs)
        if counted is not None:
            label_counts.append(counted[0])
            voxel_volumes.append(counted[1])
    if figures is not None:
        figures.extend(lesion_label_figures(label_counts, voxel_volumes, lesion_labels))

    if label_counts and not any(c.get(int(v), 0) for c in label_counts for v in lesion_labels):
        problems.append(Problem(str(spec.root), f"no voxel has lesion label(s) {_fmt_values(list(lesion_labels))} "
                                                f"in any label file ({len(label_counts)} read)"))
    return spec, problems


def lesion_label_figures(label_counts: list[dict], voxel_volumes: list, lesion_labels) -> list[str]:
    """Per lesion label, one line: its voxels and mm³ summed over the cases, and how many cases hold it."""
    lines = []
    for v in lesion_labels:
        per_case = [(c.get(int(v), 0), vv) for c, vv in zip(label_counts, voxel_volumes)]
        voxels = sum(n for n, _ in per_case)
        mm3 = sum(n * vv for n, vv in per_case if vv is not None)
        holding = sum(1 for n, _ in per_case if n)
        lines.append(f"lesion label {int(v)}: {voxels:,} voxels, {mm3:,.0f} mm³ in {holding} of {len(per_case)} cases")
    return lines


def problems_error(problems: list[Problem], dataset) -> InputError:
    """One InputError for a list of problems: the first, and how many more (for build-bank / generate)."""
    more = len(problems) - 1
    suffix = f" (and {more} more problem{'s' if more != 1 else ''}; run 'lesionsynth check {dataset}')" if more else ""
    return InputError(str(problems[0]) + suffix)


def format_report(spec: DatasetSpec | None, problems: list[Problem]) -> str:
    """The report of `lesionsynth check`: a summary line, then the problems grouped by file."""
    if spec is None:
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}: the dataset cannot be opened"
        return "\n".join([head, *(f"  {p}" for p in problems)])
    case_ids = {ref.case_id for ref in spec.cases} | {p.case_id for p in problems if p.case_id}
    if not problems:
        labels = ", ".join(f"{v}={k}" for k, v in sorted(spec.labels.items(), key=lambda kv: kv[1]))
        return (f"dataset OK: {len(case_ids)} cases, {len(spec.channel_names)} channel"
                f"{'s' if len(spec.channel_names) != 1 else ''} ({', '.join(spec.channel_names)}), "
                f"labels {labels or '(not declared)'}")
    bad_cases = {p.case_id for p in problems if p.case_id}
    wide = sum(1 for p in problems if not p.case_id)
    n = len(problems)
    head = f"{n} problem{'s' if n != 1 else ''} in {len(bad_cases)} of {len(case_ids)} cases"
    if wide:
        head += f" ({wide} of them dataset-wide)"
    root = Path(spec.root) if spec.kind != "list" else Path(spec.root).parent

    def shown(path: str) -> str:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            return path

    groups: dict[str, list[Problem]] = {}
    for p in sorted(problems, key=lambda p: (p.case_id is not None, p.case_id or "", p.path)):
        groups.setdefault(p.path, []).append(p)
    lines = [head, f"dataset: {spec.root}"]
    for path, items in groups.items():
        lines.append(f"{shown(path)}:")
        lines.extend(f"  - {p.message}" for p in items)
    return "\n".join(lines)
