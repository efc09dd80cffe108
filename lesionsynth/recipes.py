"""Recipes: TOML parameter sets per dataset family (`recipes/*.toml`), merged under command-line options."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from .errors import InputError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
SECTIONS = ("bank", "augment")


def available() -> dict[str, Path]:
    """Recipe name → file, for the recipes shipped in `recipes/`."""
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.toml"))}


def load_recipe(name_or_path: str) -> dict:
    """Read a recipe by name (see `lesionsynth recipes`) or from a TOML file."""
    path = Path(name_or_path)
    shipped = not path.is_file()
    if shipped:
        known = available()
        if name_or_path not in known:
            raise InputError(f"--recipe {name_or_path!r}: no such recipe or file (known: {', '.join(known)})")
        path = known[name_or_path]
    try:
        recipe = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: malformed recipe ({exc})") from None
    unknown = set(recipe) - set(SECTIONS) - {"description"}
    if unknown:
        raise InputError(f"{path}: unknown recipe section(s) {sorted(unknown)}; use {list(SECTIONS)}")
    recipe.setdefault("description", "")
    recipe["name"] = path.stem
    # how to find it again (bank.json keeps it for generate): a shipped recipe by name, a file by its path
    recipe["ref"] = path.stem if shipped else str(path.resolve())
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
