"""lesionsynth: lesion-level synthesis of training data for lesion segmentation (LesionMix).

Python API (what the commands call; each config checks its fields when it is made, naming the bad one)::

    from lesionsynth import (BankConfig, GenerateConfig, ScoreConfig, TestsetConfig, build_bank, generate,
                             make_testset, score_predictions, summarize, write_report)
    print(summarize("Dataset001_MS"))                                   # lesionsynth inspect
    bank = build_bank("Dataset001_MS", "bank", BankConfig(lesion_labels=(1,)), jobs=2)
    result = generate(bank, "Dataset900_Synth", GenerateConfig(n=100, load="high"), jobs=2)
    page = write_report("Dataset900_Synth", n_examples=6)               # lesionsynth report
    records = make_testset(bank, "EVAL", TestsetConfig(factor="load", n_levels=4, per_level=2,
                                                       test_cases=("case_001", "case_002")))
    scores = score_predictions("predictions", "EVAL", "scores", ScoreConfig(iou_threshold=0.0), jobs=2)

`write_report`, `make_testset` and `summarize` are named apart from their modules (lesionsynth.report,
lesionsynth.testset, lesionsynth.inspect), which a function of the same name would hide.
"""

import os as _os

if _os.environ.pop("LESIONSYNTH_SPAWNED_WORKER", None):  # a run's spawned worker: see parallel.SPAWNED_WORKER_ENV
    import signal as _signal

    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)

from ._version import __version__

from .errors import ConfigError, InputError, LesionsynthError  # noqa: E402
from .bank import BankConfig, build_bank  # noqa: E402
from .inspect import summarize  # noqa: E402
from .pipeline import GenerateConfig, generate  # noqa: E402
from .plan import AugmentConfig  # noqa: E402
from .report import write_report  # noqa: E402
from .score import ScoreConfig, score_predictions  # noqa: E402
from .testset import TestsetConfig  # noqa: E402
from .testset import testset as make_testset  # noqa: E402

__all__ = ["__version__", "AugmentConfig", "BankConfig", "ConfigError", "GenerateConfig", "InputError",
           "LesionsynthError", "ScoreConfig", "TestsetConfig", "build_bank", "generate", "make_testset",
           "score_predictions", "summarize", "write_report"]
