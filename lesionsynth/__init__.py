"""lesionsynth: lesion-level synthesis of training data for lesion segmentation (LesionMix).

Python API (what the commands call)::

    from lesionsynth import BankConfig, GenerateConfig, build_bank, generate
    bank = build_bank("Dataset001_MS", "bank", BankConfig(lesion_labels=(1,)), jobs=2)
    result = generate(bank, "Dataset900_Synth", GenerateConfig(n=100, load="high"), jobs=2)
    scores = score_predictions("predictions", "testset", "scores", ScoreConfig(iou_threshold=0.0), jobs=2)
"""

from ._version import __version__

from .errors import InputError, LesionsynthError  # noqa: E402
from .bank import BankConfig, build_bank  # noqa: E402
from .pipeline import GenerateConfig, generate  # noqa: E402
from .plan import AugmentConfig  # noqa: E402
from .score import ScoreConfig, score_predictions  # noqa: E402

__all__ = ["__version__", "AugmentConfig", "BankConfig", "GenerateConfig", "InputError", "LesionsynthError",
           "ScoreConfig", "build_bank", "generate", "score_predictions"]
