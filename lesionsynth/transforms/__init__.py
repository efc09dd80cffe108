"""LesionMix on the fly: the lesion work of `generate` as a TorchIO transform and as a MONAI dictionary
transform, over the same bank.

    from lesionsynth.transforms import RandomLesionMix   # TorchIO (pip install 'lesionsynth[torchio]')
    from lesionsynth.transforms import RandLesionMixd    # MONAI (pip install 'lesionsynth[monai]')

Importing this package imports neither framework: each is imported with the first name taken from it.
"""

from __future__ import annotations

import importlib

#: Public name → the module that defines it.
_MODULES = {"RandomLesionMix": "torchio_mix", "LesionMix": "torchio_mix",
            "RandLesionMixd": "monai_mix", "LesionMixd": "monai_mix",
            "LesionMixer": "core", "recorded_plan": "core"}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
