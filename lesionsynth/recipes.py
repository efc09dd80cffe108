"""Recipes: TOML parameter sets per dataset family (`recipes/*.toml`), merged under command-line options."""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path

from .errors import InputError

#: The package whose data are the shipped recipes (the top-level `recipes/` folder of the source tree).
RECIPE_PACKAGE = "lesionsynth.recipe_files"
SECTIONS = ("bank", "augment")


def available() -> dict:
    """Recipe name → its file (an importlib.resources Traversable), for the recipes shipped with the package."""
    try:
        folder = resources.files(RECIPE_PACKAGE)
    except ModuleNotFoundError:  # a source tree used without an install: the folder beside the package
        folder = Path(__file__).resolve().parent.parent / "recipes"
    entries = [p for p in folder.iterdir() if p.name.endswith(".toml") and p.is_file()]
    return {p.name[: -len(".toml")]: p for p in sorted(entries, key=lambda p: p.name)}


def load_recipe(name_or_path: str) -> dict:
    """Read a recipe by name (see `lesionsynth recipes`) or from a TOML file."""
    path = Path(name_or_path)
    shipped = not path.is_file()
    if shipped:
        known = available()
        if name_or_path not in known:
            raise InputError(f"--recipe {name_or_path!r}: no such recipe or file (known: {', '.join(known)})")
        source, stem = known[name_or_path], name_or_path
    else:
        source, stem = path, path.stem
    try:
        recipe = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{source}: malformed recipe ({exc})") from None
    unknown = set(recipe) - set(SECTIONS) - {"description"}
    if unknown:
        raise InputError(f"{source}: unknown recipe section(s) {sorted(unknown)}; use {list(SECTIONS)}")
    recipe.setdefault("description", "")
    recipe["name"] = stem
    # how to find it again (bank.json keeps it for generate): a shipped recipe by name, a file by its path
    recipe["ref"] = stem if shipped else str(path.resolve())
    return recipe


def make_config(cls, recipe: dict | None, section: str, overrides: dict):
    """A config dataclass from defaults < recipe section < explicit (non-None) command-line values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict((recipe or {}).get(section, {}))
    unknown = set(values) - set(fields)
    if unknown:
        raise InputError(f"recipe {recipe.get('name')!r} [{section}]: unknown key(s) {sorted(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values)
    except TypeError as exc:
        raise InputError(f"recipe {recipe and recipe.get('name')!r} [{section}]: {exc}") from None
