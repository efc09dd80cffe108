"""What the package declares matches what it imports: every module imported at run time (also inside
functions) is a core dependency or, for torch, dask (and joblib), torchio and monai, behind the extra that the command or
the transform names."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = {"torch": "cuda", "dask": "dask", "joblib": "dask", "torchio": "torchio", "monai": "monai"}  # import → its extra


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower().replace("_", "-")


def imported_modules() -> set[str]:
    names = set()
    for path in (REPO / "lesionsynth").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "lesionsynth"}


def test_every_import_is_declared_and_every_dependency_imported():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(s) for s in project["dependencies"]}
    extras = {k: {_requirement_name(s) for s in v} for k, v in project["optional-dependencies"].items()}
    providers = metadata.packages_distributions()
    used = set()
    for module in sorted(imported_modules()):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        used |= dists
        if module in OPTIONAL:
            assert dists & extras[OPTIONAL[module]], f"{module}: not in the [{OPTIONAL[module]}] extra"
        else:
            assert dists & core, f"{module} is imported but no core dependency provides it ({sorted(dists)})"
    assert core <= used, f"declared but never imported: {sorted(core - used)}"


def test_recipes_are_package_data():
    from lesionsynth.recipes import available

    shipped = sorted(p.stem for p in (REPO / "recipes").glob("*.toml"))
    assert sorted(available()) == shipped
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["lesionsynth.recipe_files"] == "recipes"
    assert config["package-data"]["lesionsynth.recipe_files"] == ["*.toml"]


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "lesionsynth").rglob("__init__.py")}
    assert found <= listed, f"subpackages missing from pyproject's packages: {sorted(found - listed)}"
