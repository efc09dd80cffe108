"""Run `generate`: synthesise cases in parallel, write the dataset (in its output layout), manifest, splits and
run record."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from ._version import __version__
from .bank import Bank, intensity_reference, lesion_load_volume
from .errors import InputError, Interrupted, LesionsynthError, check_choice, check_field
from .geometry import voxel_volume
from .io import load_case
from .io.images import IMAGE_ENDINGS, common_ending, output_ending
from .io.layout import LAYOUTS, OutputLayout, output_layout
from .io.locate import BankFolder, check_same_files
from .io.output import copy_original, write_case, write_json
from .labels import count_in
from .loads import FAMILIES, draw_target_load
from .output_run import MANIFEST, RUN_FILE, bank_fingerprint, run_bank
from .parallel import overlapped, release_freed_memory
from .plan import MODES, AugmentConfig, ContextMatch, case_rng, draw_volume_warp, plan_and_render_case
from .prior import LOCAL_TOLERANCE, Region, allowed_region, is_ct, placement_density
from .render import PasteSettings, RenderContext, apply_plan
from .render.backend import lesion_resampler

#: Where the template's tissue prior (a probability) is at least this, lesions may go.
TEMPLATE_REGION_LEVEL = 0.5
FORMATS = tuple(LAYOUTS)


class LoadLabelChoice:
    """The `load_label` setting of a configuration (generate, testset): which lesion label loads are counted on."""

    load_label: int | None

    @property
    def load_labels(self) -> tuple[int, ...] | None:
        """The labels loads are counted on, or None for every lesion label of the bank."""
        return None if self.load_label is None else (int(self.load_label),)

    def config_record(self) -> dict:
        """The configuration as run.json records it: without `load_label` when it is not set (as run.json was
        before --load-label existed, so that earlier runs still resume)."""
        conf = asdict(self)
        if self.load_label is None:
            del conf["load_label"]
        return conf

    def check_load_label(self, bank: "Bank") -> None:
        """An InputError unless `load_label` is one of the bank's lesion labels."""
        if self.load_label is not None and int(self.load_label) not in bank.lesion_labels:
            raise InputError(f"--load-label {self.load_label}: not a lesion label of the bank {bank.folder} "
                             f"(its lesion labels: {', '.join(str(v) for v in bank.lesion_labels)})")


@dataclass(frozen=True)
class GenerateConfig(LoadLabelChoice):
    """Everything that decides the output bytes of a run (recorded in run.json)."""

    n: int
    load: str
    mode: str = "both"
    seed: int = 0
    tolerance: float = 0.1
    load_range: tuple[float, float] | None = None
    folds: int = 5
    include_originals: bool = True
    compression_level: int = 1
    file_ending: str | None = None  # .nii.gz, .nii, .mha or .nrrd; None: that of the bank's source cases
    case_prefix: str = "syn"
    volume_warp: bool = False  # whole-case rotation/scale/elastic warp before the lesion work
    format: str = "nnunet"     # output layout (io/layout.py): "nnunet" (v2 raw) or "bids" (BIDS derivative)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    load_label: int | None = None  # count loads on this lesion label only (None: every lesion label)

    def __post_init__(self) -> None:
        self.validate()  # a bad config fails where it is made, naming its field

    def validate(self) -> None:
        """A ConfigError naming the first bad field (the command line names its flag instead)."""
        check_field(self, "n", self.n >= 0, "must be ≥ 0")
        check_choice(self, "load", FAMILIES)
        check_choice(self, "mode", MODES)
        check_field(self, "tolerance", 0 <= self.tolerance < 1, "must lie in [0, 1)")
        check_field(self, "folds", self.folds >= 1, "must be ≥ 1")
        check_choice(self, "format", FORMATS)
        check_choice(self, "file_ending", (None, *IMAGE_ENDINGS))
        output_ending(self.file_ending, ".nii.gz", nifti_only=self.format == "bids")  # e.g. bids and .mha
        check_field(self, "compression_level", 0 <= self.compression_level <= 9, "must lie in 0..9")


@dataclass
class GenerateResult:
    out: Path
    records: list[dict]
    timings: list[dict]


def fold_assignment(case_ids: list[str], folds: int, seed: int) -> list[list[str]]:
    """Split original cases into `folds` validation sets (at most one fold per case), seeded."""
    ids = sorted(case_ids)
    order = np.random.default_rng([int(seed), 2**31 - 1]).permutation(len(ids))
    k = max(1, min(folds, len(ids)))
    return [sorted(ids[j] for j in order[f::k]) for f in range(k)]


def training_cases(val_folds: list[list[str]], fold: int, all_ids: list[str]) -> list[str]:
    if len(val_folds) == 1:
        return sorted(all_ids)
    return sorted(set(all_ids) - set(val_folds[fold]))


def open_bank(folder: str) -> Bank:
    """One Bank per worker process (its memory maps stay open), renewed when bank.json changes; its cases read
    from the folder's `data_root` where it is a `BankFolder` that carries one."""
    data_root = getattr(folder, "data_root", None)
    index = Path(folder) / "bank.json"
    if not index.is_file():
        return Bank(folder)  # says in one line what is wrong
    return _cached_bank(str(folder), data_root, index.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _cached_bank(folder: str, data_root: str | None, _stamp: int) -> Bank:
    return Bank(folder, data_root)


def synthetic_case_id(cfg: GenerateConfig, index: int) -> str:
    """The case id of synthetic case `index`."""
    return f"{cfg.case_prefix}{index:05d}"


#: The stream of a run's generator that orders its cases as base cases (apart from the folds' and the cases').
BASE_ORDER_STREAM = 2**31 - 2
#: Rounds (cases x folds outputs each) of the base-case cycle: within it every case is a base about equally
#: often, give or take two (a fold cannot use its own validation cases, so a shorter cycle, repeated, would
#: repeat its imbalance).
CYCLE_ROUNDS = 8


def _least_used_walk(case_ids: tuple[str, ...], val_folds: tuple[tuple[str, ...], ...], seed: int, count: int,
                     fits=None) -> list[tuple[int, int, bool]]:
    """(home fold, position in the seeded case order, whether the pick fits) of output cases 0 .. count - 1 and
    that order (see `base_cycle`). `fits(i, order)`, if given, marks the cases (in that order) that output
    case i should take; where its fold has none, any of its training cases is taken."""
    order_index = np.random.default_rng([int(seed), BASE_ORDER_STREAM]).permutation(len(case_ids))
    n, folds = len(case_ids), len(val_folds)
    order = [case_ids[k] for k in order_index]
    allowed = np.zeros((folds, n), dtype=bool)
    for f in range(folds):
        allowed[f] = np.isin(order, training_cases([list(v) for v in val_folds], f, list(case_ids)))
    used = np.zeros(n, dtype=np.int64)
    after = np.arange(n)
    pointer, out = 0, []
    for i in range(count):
        f = i % folds
        pool = allowed[f] if fits is None else allowed[f] & fits(i, order_index)
        fitting = bool(pool.any())
        score = np.where(pool if fitting else allowed[f], used * n + (after - pointer) % n, np.iinfo(np.int64).max)
        k = int(np.argmin(score))
        used[k] += 1
        pointer = (k + 1) % n
        out.append((f, order[k], fitting))
    return out


@lru_cache(maxsize=8)
def base_cycle(case_ids: tuple[str, ...], val_folds: tuple[tuple[str, ...], ...], seed: int) -> tuple[tuple[int, str], ...]:
    """(home fold, base case) of output cases 0 .. cases x folds x CYCLE_ROUNDS - 1; later cases repeat it.

    Case i is built for fold i mod folds (so the folds get synthetic cases in turn), on the fold's training
    case used least so far, the first of those in a seeded order of the cases from where the last pick left
    off. The first n outputs thus use min(n, cases) distinct base cases as far as the folds allow (a fold
    cannot use its own validation cases), and over a run every case is a base about equally often. Walking
    each fold's sorted training cases instead used their first few for every small run (8 outputs of 8
    cases: 4 anatomies, one of them 4 times)."""
    count = len(case_ids) * len(val_folds) * CYCLE_ROUNDS
    return tuple((f, base) for f, base, _ in _least_used_walk(case_ids, val_folds, seed, count))


@dataclass(frozen=True)
class Reach:
    """What decides whether a base case can reach an output's target in a one-direction mode (`reach_of`)."""

    mode: str                      # "populate" (loads only rise) or "inpaint" (loads only fall)
    load: str
    load_range: tuple | None
    tolerance: float
    n: int
    loads: tuple[float, ...]       # the cases' loads (mm³), in the order of the case ids


def reach_of(cfg: GenerateConfig, bank: Bank) -> Reach | None:
    """The `Reach` of a run whose mode moves loads one way only; None for the other modes (any base will do)."""
    if cfg.mode not in ("populate", "inpaint"):
        return None
    return Reach(cfg.mode, cfg.load, tuple(cfg.load_range) if cfg.load_range else None, float(cfg.tolerance),
                 int(cfg.n), tuple(float(v) for v in bank.real_loads(cfg.load_labels)))


@lru_cache(maxsize=8)
def base_assignment(case_ids: tuple[str, ...], val_folds: tuple[tuple[str, ...], ...], seed: int, reach: Reach
                    ) -> tuple[tuple[int, str, bool], ...]:
    """(home fold, base case, whether it can reach the target) of output cases 0 .. n - 1 of a one-direction
    run: as `base_cycle`, among the fold's training cases that can reach the case's target (drawn as
    `synthesize_arrays` draws it: the first draw of the case's generator), all of them if none can. Populate
    mode cannot lower a load nor inpaint mode raise one: the bases of the walk alone often stopped at once
    (`--mode inpaint --load low` on light and heavy MS cases: 0 of 10 reached their target)."""
    from .plan import case_rng

    loads = np.asarray(reach.loads, dtype=np.float64)

    def fits(i: int, order_index: np.ndarray) -> np.ndarray:
        target = draw_target_load(reach.load, case_rng(seed, i), loads, reach.load_range)
        if reach.mode == "populate":
            return loads[order_index] <= target * (1 + reach.tolerance)
        return loads[order_index] >= target * (1 - reach.tolerance)

    return tuple(_least_used_walk(case_ids, val_folds, seed, reach.n, fits))


def base_case_of(index: int, val_folds: list[list[str]], case_ids: list[str], seed: int = 0,
                 reach: Reach | None = None) -> tuple[int, list[str], str]:
    """(home fold, the cases that fold trains on, base case) of output case `index` (`base_cycle`, or
    `base_assignment` in a one-direction mode); the fold's training cases are its donors."""
    folds = tuple(tuple(v) for v in val_folds)
    if reach is None:
        cycle = base_cycle(tuple(case_ids), folds, int(seed))
        home_fold, base = cycle[index % len(cycle)]
    else:
        home_fold, base, _ = base_assignment(tuple(case_ids), folds, int(seed), reach)[index]
    return home_fold, training_cases(val_folds, home_fold, case_ids), base


def donor_lesions(bank: Bank, cases, load_labels=None) -> list[dict]:
    """The bank's lesions (of a lesion label) cut out of `cases`, in bank order; with `load_labels`, only those
    that hold some of them (a paste of another lesion would add nothing to the load)."""
    cases, lesion_labels = set(cases), bank.lesion_labels
    return [les for les in bank.lesions if les["source_case"] in cases and les["label_value"] in lesion_labels
            and (not load_labels or lesion_load_volume(les, load_labels) > 0)]


def synthesize_case(index: int, bank_dir: str, layout: OutputLayout, cfg: GenerateConfig,
                    val_folds: list[list[str]], device: str = "cpu") -> tuple[dict, dict]:
    """Make output case `index`: read its base case, do its lesion work (`synthesize_arrays`), write it in
    `layout`. Returns (manifest record, timings)."""
    job = read_stage(index, bank_dir, cfg, val_folds)
    return write_stage(lesion_stage(job, bank_dir, cfg, device), layout, cfg)


def synthesize_cases(indices: list[int], bank_dir: str, layout: OutputLayout, cfg: GenerateConfig,
                     val_folds: list[list[str]], device: str = "cpu", log_stem: str | None = None
                     ) -> list[tuple[dict, dict]]:
    """`synthesize_case` of cases that share a base case, one after another: the base case is read once, and
    after each case is written its operations' boxes are restored (checked by checksum; read again if that
    fails), so the arrays serve the next case as they were read. Returns [(record, timings)] in order; with
    `log_stem`, each case's record is also appended to this process's progress file once its files are in
    place (`record_case`)."""
    results, handed = [], None
    for k, index in enumerate(indices):
        more = k + 1 < len(indices)
        job = case_job(index, bank_dir, cfg, val_folds, handed, gives=more)
        results.append(write_stage(lesion_stage(job, bank_dir, cfg, device), layout, cfg))
        if log_stem:
            record_case(log_stem, results[-1][0])
        handed = _restored_base(job) if more else None
        job = None
        release_freed_memory()  # what this case's lesion work and write freed, before the next one's
    return results


#: Most cases in one worker's run of a base case (`base_groups`).
RUN_CASES = 4

_RECORD_LOCK = threading.Lock()


def record_case(log_stem: str, rec: dict) -> None:
    """Append the record of a case whose files are in place to this process's own progress file,
    LOG_STEM.HOST.PID.jsonl (`read_records` reads them all). The process that wrote the case records it at once,
    so a run stopped at any moment has a record of every case it finished; no two processes share a file
    (appends from two machines to one file on a shared file system may interleave)."""
    path = f"{log_stem}.{socket.gethostname()}.{os.getpid()}.jsonl"
    line = (json.dumps(rec) + "\n").encode()
    with _RECORD_LOCK:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
        finally:
            os.close(fd)


def base_groups(todo: list[int], base_of, jobs: int) -> list[list[int]]:
    """`todo` cut into runs of cases of one base case each (`synthesize_cases`), at most RUN_CASES long and
    short enough that every worker gets about four runs, so that they finish together."""
    workers = jobs if jobs > 0 else 64  # a Dask cluster: its size is not known here
    longest = max(1, min(RUN_CASES, -(-len(todo) // (4 * workers))))
    groups: dict[str, list[int]] = {}
    for index in todo:
        groups.setdefault(base_of(index), []).append(index)
    return [g[start:start + longest] for g in groups.values() for start in range(0, len(g), longest)]


@dataclass
class CaseJob:
    """One output case between the stages of `synthesize_case`."""

    index: int
    home_fold: int
    train: list[str]
    base_id: str
    case: object                 # the base case as read (io.Case)
    read_s: float
    channels: np.ndarray | None = None
    label: np.ndarray | None = None
    lesion_record: dict | None = None
    lesion_s: float = 0.0
    undo: list | None = None     # what the lesion work overwrote in the base case's arrays (they are handed on)
    checksum: int | None = None  # of the base case's arrays as read: restored, they must give it again
    reused: bool = False         # the base case's arrays came from an earlier case of it, not from its files


def case_job(index: int, bank_dir: str, cfg: GenerateConfig, val_folds: list[list[str]], handed=None,
             gives: bool = False, file_threads: int = 1) -> CaseJob:
    """The job of output case `index`: on the arrays an earlier case of its base case handed on (`handed`:
    (base case, checksum) from `_restored_base`), else on its base case read from its files (`read_stage`).
    `gives`: its arrays will be handed on, so its checksum is known and its operations keep an undo log.
    `file_threads`: see `read_stage`."""
    if handed is None:
        job = read_stage(index, bank_dir, cfg, val_folds, file_threads)
        if gives:
            job.checksum = arrays_checksum(job.case.channels, job.case.label)
    else:
        bank = open_bank(bank_dir)
        home_fold, train, base_id = base_case_of(index, val_folds, [c["case_id"] for c in bank.cases], cfg.seed,
                                                  reach_of(cfg, bank))
        job = CaseJob(index, home_fold, train, base_id, handed[0], 0.0, checksum=handed[1], reused=True)
    job.undo = [] if gives else None
    return job


def read_stage(index: int, bank_dir: str, cfg: GenerateConfig, val_folds: list[list[str]], file_threads: int = 1
               ) -> CaseJob:
    """Read the base case of output case `index` (bank lookup + `load_case`, `file_threads` files at once)."""
    t0 = time.perf_counter()
    bank = open_bank(bank_dir)
    home_fold, train, base_id = base_case_of(index, val_folds, [c["case_id"] for c in bank.cases], cfg.seed,
                                             reach_of(cfg, bank))
    ref = next(r for r in bank.case_refs() if r.case_id == base_id)
    case = load_case(ref, len(bank.channel_names), file_threads)
    release_freed_memory()  # the file buffers of the read
    return CaseJob(index, home_fold, train, base_id, case, time.perf_counter() - t0)


def lesion_stage(job: CaseJob, bank_dir: str, cfg: GenerateConfig, device: str = "cpu") -> CaseJob:
    """The lesion work of a read case (`synthesize_arrays` with the case's own random generator)."""
    t0 = time.perf_counter()
    bank = open_bank(bank_dir)
    job.channels, job.label, job.lesion_record = synthesize_arrays(
        job.case.channels, job.case.label, job.case.affine, bank, cfg, case_rng(cfg.seed, job.index), job.base_id,
        donor_lesions(bank, job.train, cfg.load_labels), device, undo=job.undo)
    job.lesion_s = time.perf_counter() - t0
    return job


def write_stage(job: CaseJob, layout: OutputLayout, cfg: GenerateConfig, file_threads: int = 1
                ) -> tuple[dict, dict]:
    """Write a case whose lesion work is done (`file_threads` files at once); returns (manifest record,
    timings)."""
    t0 = time.perf_counter()
    case_id = synthetic_case_id(cfg, job.index)
    paths = layout.prepare_case(case_id)
    write_case(layout.out, case_id, job.channels, job.label, job.case, cfg.file_ending, cfg.compression_level,
               paths, file_threads)
    t_write = time.perf_counter() - t0
    record = {"case_id": case_id, "case_index": job.index, "base_case": job.base_id, "seed": cfg.seed,
              "home_fold": job.home_fold, **job.lesion_record}
    layout.write_case_extras(case_id, record)
    timings = {"case_id": case_id, "read_s": job.read_s, "lesion_s": job.lesion_s, "write_s": t_write,
               "base_reused": job.reused}
    return record, timings


#: Cases read ahead of the one whose lesion work runs, and written cases whose files may still be in progress
#: (`overlapped_cases`), one case's memory each. Two of either gained nothing measurable over one (12 MNI-sized
#: cases at --load high, 2 cores: 0.64-0.68 s per case against 0.66-0.72 s).
READ_AHEAD = 1
#: Files of one case read or written at once where nothing else runs beside (the first read and the last
#: write at --jobs 1): about 0.1 s less at the start and 0.06 s at the end of a run of MNI-sized cases.
FILE_THREADS = 3
WRITE_BEHIND = 1


def arrays_checksum(*arrays: np.ndarray) -> int:
    """CRC-32 of the arrays' bytes, each in its own memory order (equal arrays of equal layout: equal sums)."""
    crc = 0
    for a in arrays:
        in_memory_order = a.transpose(np.argsort(a.strides, kind="stable")[::-1])
        if not in_memory_order.flags.c_contiguous:
            in_memory_order = np.ascontiguousarray(a)
        crc = _crc32(in_memory_order.reshape(-1).view(np.uint8), crc)
    return crc


try:  # isal's crc32 is ~5x faster than zlib's
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - exercised where isal is missing
    from zlib import crc32 as _crc32


#: Base cases whose cases take turns at --jobs 1 (`reuse_order`): a case's arrays wait, while the next
#: REUSE_BASES - 1 cases are made, for its write; then they serve the next case of its base. With 3, the
#: arrays of 3 cases are held at most, as many as READ_AHEAD = WRITE_BEHIND = 1 hold without reuse.
REUSE_BASES = 3


def reuse_order(todo: list[int], base_of) -> tuple[list[int], dict[int, int]]:
    """(the order to make `todo` in, {index: the earlier index whose base-case arrays it takes over}).

    The cases of REUSE_BASES base cases take turns (A B C A B C ..., then D E F ...): a case's arrays,
    restored to the base case once it is written, serve the next case of the same base instead of a second
    read, while the cases between them keep the lesion work busy. A case directly after one of its own base
    reads it again (waiting for that write would idle the lesion work)."""
    groups: dict[str, list[int]] = {}
    for index in todo:
        groups.setdefault(base_of(index), []).append(index)
    lists = list(groups.values())
    sizes = [REUSE_BASES] * (len(lists) // REUSE_BASES)
    if len(lists) % REUSE_BASES:
        sizes.append(len(lists) % REUSE_BASES)
    if len(sizes) > 1 and sizes[-1] == 1 and REUSE_BASES >= 3:  # a base alone is read for each case: 3+1 -> 2+2
        sizes[-2] -= 1
        sizes[-1] += 1
    order: list[int] = []
    start = 0
    for size in sizes:
        turn = lists[start:start + size]
        start += size
        for k in range(max(len(g) for g in turn)):
            order += [g[k] for g in turn if k < len(g)]
    takes_from, last_of = {}, {}
    for position, index in enumerate(order):
        base = base_of(index)
        previous = last_of.get(base)
        if previous is not None and previous != position - 1:
            takes_from[index] = order[previous]
        last_of[base] = position
    return order, takes_from


class _BaseShelf:
    """Base-case arrays handed from a written case to a later case of the same base (the taker waits)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._slots: dict[int, list] = {}

    def _slot(self, index: int) -> list:
        with self._lock:
            return self._slots.setdefault(index, [threading.Event(), None])

    def put(self, index: int, case_and_checksum) -> None:
        slot = self._slot(index)
        slot[1] = case_and_checksum
        slot[0].set()

    def take(self, index: int):
        """What `put` left for `index` (None: nothing usable, read it again), once it is put."""
        slot = self._slot(index)
        slot[0].wait()
        with self._lock:
            del self._slots[index]
        return slot[1]


def _restored_base(job: CaseJob):
    """(base case, checksum) once a written job's changes are undone, or None if its arrays cannot be handed on
    (a warp made new arrays, or the restored arrays are not as read)."""
    case = job.case
    if job.undo is None or job.channels is not case.channels or job.label is not case.label:
        return None
    from .render import restore_patches

    restore_patches(case.channels, case.label, job.undo)
    if arrays_checksum(case.channels, case.label) != job.checksum:
        return None
    return case, job.checksum


def overlapped_cases(todo: list[int], bank_dir: str, layout: OutputLayout, cfg: GenerateConfig,
                     val_folds: list[list[str]], device: str = "cpu", log_stem: str | None = None):
    """`synthesize_case` of every index in `todo`, in this process, with the I/O of the cases next to each
    one overlapped with its lesion work (`parallel.overlapped`): the next case is read and the previous one
    written in two threads while this one's lesion work runs (gzip and fsync release the GIL). The cases of
    REUSE_BASES base cases take turns (`reuse_order`): a written case's arrays are put back as the base case
    was read (its operations' boxes restored, checked by checksum) and serve the next case of that base
    instead of reading it again.

    Yields (record, timings) once a case's files are in place; with `log_stem` the writer thread has then
    recorded it (`record_case`). Each case is the same pure function of its index as `synthesize_case`, so the
    bytes do not change; at most 1 + READ_AHEAD + WRITE_BEHIND cases are in memory. On an exception the cases
    handed to the writer are finished (and recorded) but not yielded."""
    bank = open_bank(bank_dir)
    case_ids = [c["case_id"] for c in bank.cases]
    reach = reach_of(cfg, bank)
    order, takes_from = reuse_order(todo, lambda index: base_case_of(index, val_folds, case_ids, cfg.seed, reach)[2])
    givers = set(takes_from.values())
    shelf = _BaseShelf()

    def read(index: int, file_threads: int = 1) -> CaseJob:
        t0 = time.perf_counter()
        handed = shelf.take(takes_from[index]) if index in takes_from else None
        job = case_job(index, bank_dir, cfg, val_folds, handed, gives=index in givers, file_threads=file_threads)
        if job.reused:
            job.read_s = time.perf_counter() - t0  # the wait for the earlier case's write
        return job

    def write(job: CaseJob, file_threads: int = 1):
        handed = None
        try:
            result = write_stage(job, layout, cfg, file_threads)
            if log_stem:
                record_case(log_stem, result[0])
            if job.index in givers:
                handed = _restored_base(job)
            return result
        finally:  # also on an error: the case waiting for these arrays then reads its base case itself
            if job.index in givers:
                shelf.put(job.index, handed)

    # the first read and the last write have no lesion work beside them: their files go in parallel
    return overlapped(order, read, lambda job: lesion_stage(job, bank_dir, cfg, device), write, READ_AHEAD,
                      WRITE_BEHIND, first_read=partial(read, file_threads=FILE_THREADS),
                      last_write=partial(write, file_threads=FILE_THREADS))


def synthesize_arrays(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, bank: Bank,
                      cfg: GenerateConfig, rng: np.random.Generator, base_case_id: str | None = None,
                      donors: list[dict] | None = None, device: str = "cpu", replay: dict | None = None,
                      undo: list | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The lesion work of one case, in memory: draw its target load (and whole-case warp, `cfg.volume_warp`)
    from `rng`, then inpaint and populate until the target is reached. Works in place on `channels`
    (float32 (C, X, Y, Z)) and `label` (uint8 (X, Y, Z)) unless a warp makes new ones. Returns (channels,
    label, record): the case's manifest fields from `load_family` on.

    `base_case_id` says the arrays are that bank case as it was read: its stored body region, intensity
    reference and registration are used. None: any other image, whose body region and intensity reference
    are computed from the arrays; the likelihood map is read in world space, or not at all in a registered
    bank (its transform is known for its own cases only: placement is uniform over the body region).
    `donors`: the bank lesions to paste (default: every lesion of a lesion label). `replay`: a record of this
    function to render again instead of drawing a plan (`rng` is not used). `undo`, if given, gets what each
    operation overwrote in `channels` and `label` (`render.restore_patches` makes them the base case again);
    nothing when a whole-case warp made new arrays."""
    lesion_labels = bank.lesion_labels
    counted = cfg.load_labels or lesion_labels  # the labels the load is counted on
    if replay is None:
        target = draw_target_load(cfg.load, rng, bank.real_loads(cfg.load_labels), cfg.load_range)
        volume_warp = draw_volume_warp(rng, cfg.augment) if cfg.volume_warp else None
    else:
        target, volume_warp = replay["target_load_mm3"], replay["volume_warp"]
    if volume_warp is not None:
        channels, label = warp_case(channels, label, affine, volume_warp, device)
        undo = None  # the base case's own arrays are not written

    stored = base_case_id is not None
    region = bank.body_region(base_case_id) if stored and volume_warp is None else None
    if region is None:
        region = allowed_region(channels, label, affine, bank.channel_names, bank.region_labels)
    intensity_ref = bank.case_info(base_case_id).get("intensity_ref") if stored else \
        intensity_reference(channels, region)
    maps_readable = stored or not bank.registered  # the bank knows where its maps lie on these arrays
    prior = (bank.coarse_template_region(region.stride, affine, region.coarse.shape, base_case_id)
             if maps_readable else None)
    if prior is not None and not region.region_labels:  # the template's tissue prior bounds the body region
        region = Region(region.stride, region.coarse & (prior >= TEMPLATE_REGION_LEVEL), ())
    likelihood = None
    if maps_readable:
        likelihood = bank.coarse_likelihood(region.stride, affine, label.shape, region.coarse.shape, base_case_id,
                                            within=region.coarse)
        if prior is not None:
            likelihood = likelihood * prior
    density = placement_density(region, label, affine, lesion_labels, likelihood)
    if donors is None:
        donors = donor_lesions(bank, [c["case_id"] for c in bank.cases], cfg.load_labels)
    ct_channels = tuple(is_ct(n) for n in bank.channel_names)
    context = None
    # region labels already say which tissue lesions belong to (liver, lung, white matter): the context
    # match is for the body-foreground region, where nothing else does
    if cfg.augment.context_tolerance > 0 and intensity_ref is not None and not region.region_labels:
        context = ContextMatch(intensity_ref, ct_channels, cfg.augment.context_tolerance,
                               bank.donor_signatures(ct_channels), cfg.augment.context_core_fraction,
                               bank.donor_shell_match(cfg.augment.context_tolerance), bank.donor_shell_spread(),
                               bank.donor_local_match(ct_channels, LOCAL_TOLERANCE) if cfg.augment.local_host
                               else None,
                               float(bank.config.get("shell_mm", 3.0)), cfg.augment.host_share_floor)
    ctx = RenderContext(lesion_labels, int(bank.config["connectivity"]), PasteSettings(ct_channels),
                        region.mask_in, region.contains, cfg.augment.min_region_fraction, lesion_resampler(device),
                        undo)
    if replay is not None:
        apply_plan(channels, label, affine, replay["ops"], bank, ctx)
        return channels, label, replayed_record(replay, label, affine, counted)
    plan = plan_and_render_case(channels, label, affine, bank, donors, density, ctx, rng, target,
                                cfg.tolerance, cfg.mode, cfg.augment, region, context, cfg.load_labels)
    record = lesion_record(plan, target, cfg, label, affine, counted, density.fallback, volume_warp)
    if len(lesion_labels) > 1:  # what each lesion label holds, for inspect and the report
        record["achieved_by_label"] = load_by_label(label, affine, lesion_labels)
    return channels, label, record


def load_by_label(label: np.ndarray, affine: np.ndarray, values) -> dict:
    """Label value (str) → {"voxels", "mm3"} of a label volume."""
    vv = voxel_volume(affine)
    out = {}
    for v in values:
        n = count_in(label, (v,))
        out[str(int(v))] = {"voxels": n, "mm3": round(n * vv, 3)}
    return out


def lesion_record(plan, target: float, cfg: GenerateConfig, label: np.ndarray, affine: np.ndarray, lesion_labels,
                  placement_fallback: str | None, volume_warp: dict | None) -> dict:
    """What a case's plan did, as manifest fields (the achieved load counted on the rendered label)."""
    achieved_vox = count_in(label, lesion_labels)
    achieved = achieved_vox * voxel_volume(affine)
    return {
        "load_family": cfg.load,
        "mode": cfg.mode,
        "target_load_mm3": plan.target_load_mm3,
        "initial_load_mm3": round(plan.initial_load_mm3, 3),
        "achieved_load_mm3": round(achieved, 3),
        "achieved_load_voxels": achieved_vox,
        "tolerance": cfg.tolerance,
        "reached": abs(achieved - target) <= cfg.tolerance * target + 1e-9,
        "stop_reason": plan.stop_reason,
        "lesions_added": sum(op["op"] == "paste" for op in plan.ops),
        "lesions_removed": sum(op["op"] == "inpaint" for op in plan.ops),
        "failed_placements": plan.failed_tries,
        "refused_placements": dict(sorted(plan.refused.items())),
        "sharp_donors": plan.sharp_donors,
        "placement_fallback": placement_fallback,
        "donor_cases": sorted({op["source_case"] for op in plan.ops if op["op"] == "paste"}),
        "volume_warp": volume_warp,
        "ops": plan.ops,
    }


def replayed_record(record: dict, label: np.ndarray, affine: np.ndarray, lesion_labels) -> dict:
    """`record` once its plan is rendered again; a LesionsynthError if the load it reached differs (the plan
    was made on other arrays, or with another bank)."""
    achieved_vox = count_in(label, lesion_labels)
    if achieved_vox != record["achieved_load_voxels"]:
        raise LesionsynthError(f"the recorded plan does not reproduce on these arrays: {achieved_vox} lesion "
                               f"voxels instead of {record['achieved_load_voxels']} (made on another image or "
                               f"with another bank?)")
    return dict(record)


def run_layout(out: Path, cfg: GenerateConfig, bank: Bank, run: dict) -> OutputLayout:
    """The output layout of a run (`cfg.format`), chosen once and handed to every worker; `run` is its
    run record (run.json)."""
    return output_layout(cfg.format, out, bank.channel_names, bank.index["labels"], cfg.file_ending, run)


def warp_case(channels: np.ndarray, label: np.ndarray, affine: np.ndarray, warp: dict, device: str):
    """Apply a recorded whole-case warp (one interpolation: channels linear, label nearest)."""
    from .render import torch_backend

    args = (channels, label, affine, warp["elastic_mm"], warp["rotation_deg"], warp["scale"])
    if device == "cpu":
        return torch_backend.warp_volume_numpy(*args)
    return torch_backend.warp_volume_torch(*args, device=device)


def _copy_original_task(ref, bank_dir: str, layout: OutputLayout, cfg: GenerateConfig) -> str:
    bank = open_bank(bank_dir)
    case = load_case(ref, len(bank.channel_names))
    paths = layout.prepare_case(ref.case_id, original=True)
    copy_original(layout.out, case, ref.image_paths, cfg.file_ending, cfg.compression_level, paths)
    layout.write_case_extras(ref.case_id, None)
    return ref.case_id


def source_ending(bank: Bank) -> str:
    """The file ending of the bank's source cases (.nii.gz, .nii, .mha or .nrrd): output keeps it by default."""
    return common_ending([c["label"] for c in bank.cases])


def with_file_ending(cfg, bank: Bank):
    """`cfg` (a GenerateConfig or TestsetConfig) with its file ending decided: the one asked for, else the
    bank's source ending (NIfTI for BIDS)."""
    if cfg.file_ending is not None:
        return cfg
    return replace(cfg, file_ending=output_ending(None, source_ending(bank),
                                                  nifti_only=getattr(cfg, "format", "nnunet") == "bids"))


def bank_entries(bank: Bank, bank_dir: Path) -> dict:
    """run.json's entries on the bank a run reads: its folder, what it holds (`bank_fingerprint`) and its size."""
    return {"bank": str(Path(bank_dir).resolve()), "bank_sha256": bank_fingerprint(bank_dir),
            "bank_lesions": len(bank.lesions), "bank_cases": len(bank.cases)}


def run_record(bank: Bank, bank_dir: Path, cfg: GenerateConfig) -> dict:
    conf = cfg.config_record()
    conf["load_range"] = list(cfg.load_range) if cfg.load_range else None
    return {"lesionsynth_version": __version__, **bank_entries(bank, bank_dir), "config": json.loads(json.dumps(conf))}


#: Keys of run.json that name where the bank was, not what it is: a resumed run may read the same bank from
#: another place (a cluster job that copies the bank to node-local scratch).
BANK_PLACE_KEYS = ("bank",)


def same_run(previous: dict, record: dict) -> bool:
    """Whether run.json `previous` records the run `record` describes: the same configuration and bank, wherever
    the bank is read from now (a run.json without the bank's fingerprint: the same bank folder)."""
    ignored = BANK_PLACE_KEYS if "bank_sha256" in previous else ("bank_sha256",)
    return ({k: v for k, v in previous.items() if k not in ignored} ==
            {k: v for k, v in record.items() if k not in ignored})


PROGRESS_DIR = ".progress"


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' → (I, N) with 0 ≤ I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: use I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise InputError(f"--shard {text!r}: need 0 ≤ I < N")
    return i, n


def read_records(out: Path) -> dict[int, dict]:
    """Records of finished cases: the final manifest and every shard's progress file."""
    done: dict[int, dict] = {}
    files = [out / MANIFEST] + sorted((out / PROGRESS_DIR).glob("*.jsonl"))
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that case is redone
            done[int(rec["case_index"])] = rec
    return done


def remove_stale_temporaries(folders: list[Path]) -> None:
    """Temporary files left in `folders` by a killed run (atomic writes use '.NAME.tmpPID'); those of a
    process that is still running (another shard writing alongside) stay."""
    from .io.nifti import temporary_owner
    from .parallel import process_alive

    for folder in folders:
        for tmp in folder.glob(".*.tmp*"):
            owner = temporary_owner(tmp.name)
            if owner is None or owner == os.getpid() or not process_alive(owner):
                tmp.unlink(missing_ok=True)


def generate(bank_dir: str | Path, out: str | Path, cfg: GenerateConfig, jobs: int = 1, progress: bool = True,
             resume: bool = False, shard: tuple[int, int] = (0, 1), device: str = "cpu", backend: str = "local",
             scheduler: str | None = None, data_root: str | Path | None = None) -> GenerateResult:
    """Generate `cfg.n` synthetic cases from the bank into the folder `out`, in the layout `cfg.format`.

    Writes run.json first, then the case files (each atomically; nnU-Net: imagesTr/ and labelsTr/), a
    progress record per case once its files are in place, and at the end manifest.jsonl, the layout's final
    files (nnU-Net: dataset.json) and splits_final.json. With
    `shard=(i, n)` only cases whose index ≡ i (mod n) are made; shards may run one after another or at
    the same time into the same folder, and whichever finds every case done writes the final files.
    `data_root`: the dataset folder to read the bank's cases from, where it is not where the bank says.

    SIGTERM and SIGINT stop it (`Interrupted`, whose message says how many cases are written and how to go on).
    """
    from .parallel import stop_on_signals

    with stop_on_signals():
        try:
            return _generate(bank_dir, out, cfg, jobs, progress, resume, shard, device, backend, scheduler,
                             data_root)
        except Interrupted as exc:
            raise Interrupted(exc.signum, interrupted_message(exc, Path(out), cfg.n)) from None


def interrupted_message(exc: Interrupted, out: Path, n: int) -> str:
    """What a stopped run says: how many of its `n` cases are written, and how to go on."""
    name = signal_name(exc.signum)
    if not (out / RUN_FILE).is_file():
        return f"stopped by {name} before anything was written; run the same command again"
    return (f"stopped by {name}: {len(read_records(out))} of {n} cases written to {out}; run the same command "
            f"with --resume to finish")


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _generate(bank_dir: str | Path, out: str | Path, cfg: GenerateConfig, jobs: int, progress: bool, resume: bool,
              shard: tuple[int, int], device: str, backend: str, scheduler: str | None,
              data_root: str | Path | None) -> GenerateResult:
    from .parallel import check_backend, shard_count_lock, writer_lock
    from .render.torch_backend import resolve_device

    cfg.validate()
    check_backend(backend, scheduler)
    device = resolve_device(device)
    shard_i, shard_n = shard
    bank_dir = BankFolder(Path(bank_dir), data_root)
    bank = Bank(bank_dir, data_root)
    cfg.check_load_label(bank)
    cfg = with_file_ending(cfg, bank)
    out = Path(out)
    record = run_record(bank, bank_dir, cfg)
    check_base_cases(bank, same_files=data_root is not None)
    layout = run_layout(out, cfg, bank, record)
    layout.check_case_ids([c["case_id"] for c in bank.cases] + [synthetic_case_id(cfg, i) for i in range(cfg.n)])
    prepare_output(out, record, resume or shard_n > 1)
    layout.prepare()
    what = f"{out} (--shard {shard_i}/{shard_n})" if shard_n > 1 else str(out)
    with shard_count_lock(out / PROGRESS_DIR / "shards.lock", shard_n, str(out)), \
            writer_lock(out / PROGRESS_DIR / f"shard-{shard_i:04d}-of-{shard_n:04d}.lock", what):
        return _generate_shard(bank, bank_dir, layout, cfg, jobs, progress, resume, shard, device, backend,
                               scheduler)


def _generate_shard(bank: Bank, bank_dir: BankFolder, layout: OutputLayout, cfg: GenerateConfig, jobs: int,
                    progress: bool, resume: bool, shard: tuple[int, int], device: str, backend: str,
                    scheduler: str | None) -> GenerateResult:
    from .parallel import execution, raise_if_stopped, run_bar

    out = layout.out
    shard_i, shard_n = shard
    if resume:
        remove_stale_temporaries(layout.folders())
    val_folds = fold_assignment([c["case_id"] for c in bank.cases], cfg.folds, cfg.seed)
    done = read_records(out)
    todo = [i for i in range(cfg.n) if i % shard_n == shard_i and i not in done]
    refs = [r for k, r in enumerate(bank.case_refs()) if k % shard_n == shard_i]
    timings: list[dict] = []
    log_stem = str(out / PROGRESS_DIR / f"shard-{shard_i:04d}-of-{shard_n:04d}")  # each writer's record_case file
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    with execution(backend, scheduler, jobs, device) as runner:
        if cfg.include_originals:
            missing = [r for r in refs if not _case_done(layout, r.case_id, original=True)]
            copies = runner.map(_copy_original_task, [(r, bank_dir, layout, cfg) for r in missing])
            for _ in run_bar(copies, total=len(missing), desc="originals", unit="case", disable=not progress):
                pass
        if runner.in_process:
            cases = overlapped_cases(todo, bank_dir, layout, cfg, val_folds, device, log_stem)
        else:
            case_ids = [c["case_id"] for c in bank.cases]
            reach = reach_of(cfg, bank)
            groups = base_groups(todo, lambda index: base_case_of(index, val_folds, case_ids, cfg.seed, reach)[2],
                                 jobs)
            cases = _flattened(runner.map(synthesize_cases, [(g, bank_dir, layout, cfg, val_folds, device, log_stem)
                                                             for g in groups]))
        try:
            for rec, timing in run_bar(cases, total=len(todo), desc="generate", unit="case", disable=not progress):
                raise_if_stopped()  # recorded already, by the process that wrote it
                timings.append(timing)
        finally:
            if hasattr(cases, "close"):
                cases.close()  # now, not when the traceback is freed: its threads finish their file first
    done = read_records(out)
    records = [done[i] for i in sorted(done) if i < cfg.n]
    if len(records) == cfg.n and _originals_complete(layout, bank, cfg):
        finalize(layout, bank, cfg, records, val_folds)
    return GenerateResult(out, records, timings)


def _flattened(lists):
    """The items of an iterator of lists; closing it closes that iterator (its workers' results)."""
    try:
        for items in lists:
            yield from items
    finally:
        if hasattr(lists, "close"):
            lists.close()


def _case_done(layout: OutputLayout, case_id: str, original: bool) -> bool:
    return all(p.is_file() for p in layout.case_files(case_id, original))


def _originals_complete(layout: OutputLayout, bank: Bank, cfg: GenerateConfig) -> bool:
    if not cfg.include_originals:
        return True
    return all(_case_done(layout, c["case_id"], original=True) for c in bank.cases)


def finalize_run(out: str | Path, bank_dir: str | Path | None = None) -> GenerateResult:
    """Write the final files of a sharded run once every shard is done (`lesionsynth finalize OUT`); `bank_dir`:
    the run's bank where it is not where run.json says."""
    out = Path(out)
    run_path = out / RUN_FILE
    if not run_path.is_file():
        raise InputError(f"{out}: not a lesionsynth output (run.json missing)")
    run = json.loads(run_path.read_text())
    conf = dict(run["config"])
    conf["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in conf["augment"].items()})
    conf["load_range"] = tuple(conf["load_range"]) if conf["load_range"] else None
    cfg = GenerateConfig(**conf)
    folder = run_bank(out, run, bank_dir)
    if bank_dir is not None and Path(run.get("bank") or "") != folder.resolve():  # where the bank is now
        run = {**run, "bank": str(folder.resolve())}
        write_json(run_path, run)
    bank = Bank(folder)
    layout = run_layout(out, cfg, bank, run)
    done = read_records(out)
    missing = [i for i in range(cfg.n) if i not in done]
    if missing:
        raise InputError(f"{out}: {len(missing)} of {cfg.n} cases are not done yet (first: index {missing[0]}); "
                         f"run the remaining shards first")
    if not _originals_complete(layout, bank, cfg):
        raise InputError(f"{out}: some original cases are missing; run the remaining shards first")
    records = [done[i] for i in range(cfg.n)]
    finalize(layout, bank, cfg, records, fold_assignment([c["case_id"] for c in bank.cases], cfg.folds, cfg.seed))
    return GenerateResult(out, records, [])


def check_base_cases(bank: Bank, same_files: bool = False) -> None:
    """Before anything is written: every base case the bank points at is still there, readable, and on the
    grid the bank recorded (headers only; the bank was built from fully validated cases). `same_files` (a
    dataset given by --data-root): also of the size and checksum the bank recorded."""
    from .io.images import image_info

    if same_files:
        check_same_files(bank.cases)
    for c in bank.cases:
        for path in [*c["images"], c["label"]]:
            if not Path(path).is_file():
                raise InputError(f"{path}: file not found (base case {c['case_id']} of the bank has moved or "
                                 f"been deleted; if the dataset moved: lesionsynth relocate {bank.folder} "
                                 f"DATASET, or --data-root DATASET)")
            shape, affine, _ = image_info(path)
            if tuple(shape[:3]) != tuple(c["shape"]) or not np.allclose(affine, c["affine"], atol=1e-3):
                raise InputError(f"{path}: grid differs from the one recorded in the bank (case {c['case_id']} "
                                 f"changed since build-bank); rebuild the bank")


def run_is_finished(out: Path) -> bool:
    """Whether the run in OUT wrote its final files (manifest.jsonl) and left no progress log behind."""
    return (out / MANIFEST).is_file() and not (out / PROGRESS_DIR).exists()


def prepare_output(out: Path, record: dict, resume: bool) -> None:
    """Create the output folder and write run.json; refuse a non-empty folder unless it is an unfinished run
    of the same config."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    # a shard starting at the same moment may be half-way through writing run.json: its temporary file
    # alone does not make the folder someone else's
    if out.exists() and any(not p.name.startswith(f".{RUN_FILE}.tmp") for p in out.iterdir()):
        previous = out / RUN_FILE
        if not previous.is_file():
            raise InputError(f"{out}: folder is not empty and is not a lesionsynth run; choose a new folder")
        try:
            same = same_run(json.loads(previous.read_text()), record)
        except json.JSONDecodeError:
            same = False
        if not same:
            raise InputError(f"{out}: holds a run with a different configuration; choose a new folder")
        if not resume and run_is_finished(out):
            raise InputError(f"{out}: holds a finished run of this configuration; it is complete, nothing to do "
                             f"(use a new --out for another run)")
        if not resume:
            raise InputError(f"{out}: holds an unfinished run of this configuration; add --resume to complete it")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, record)  # first, so that a shard starting alongside sees whose folder it is


def finalize(layout: OutputLayout, bank: Bank, cfg: GenerateConfig, records: list[dict],
             val_folds: list[list[str]]) -> None:
    """Write the sorted manifest, the layout's final files (dataset.json or the BIDS metadata) and
    splits_final.json once every case is in place."""
    from .io.nifti import write_bytes_atomic

    out = layout.out
    write_bytes_atomic(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in records).encode())
    originals = [c["case_id"] for c in bank.cases] if cfg.include_originals else []
    layout.write_final(records, originals)
    if originals and len(val_folds) > 1:
        splits = []
        for f, val in enumerate(val_folds):
            val_set = set(val)
            train = [c for c in originals if c not in val_set]
            train += [r["case_id"] for r in records
                      if r["base_case"] not in val_set and not val_set.intersection(r["donor_cases"])]
            splits.append({"train": train, "val": list(val)})
        write_json(out / "splits_final.json", splits)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
