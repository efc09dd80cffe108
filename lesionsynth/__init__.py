"""lesionsynth: lesion-level synthesis of training data for lesion segmentation (LesionMix)."""

__version__ = "0.1.0"

from .errors import InputError, LesionsynthError  # noqa: E402

__all__ = ["__version__", "InputError", "LesionsynthError", "build_bank", "generate"]


def build_bank(*args, **kwargs):
    """Build a lesion bank from a dataset; see :func:`lesionsynth.bank.build_bank`."""
    from .bank import build_bank as _build_bank

    return _build_bank(*args, **kwargs)


def generate(*args, **kwargs):
    """Generate a synthetic dataset from a bank; see :func:`lesionsynth.pipeline.generate`."""
    from .pipeline import generate as _generate

    return _generate(*args, **kwargs)
