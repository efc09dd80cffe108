"""The documentation stays true: docs/cli.md is what the CLI's --help prints (regenerated and compared), every
relative link in README.md and docs/*.md reaches an existing file (and heading, where it names one), and the
make targets fetch what they need: `make demo` only the demo's datasets, `make test` everything."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def prose(text: str) -> str:
    """The text without fenced code blocks (their brackets are option syntax, not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces as -."""
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", prose(page.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_cli_reference_is_current():
    cli_reference = load_script("cli_reference")
    assert (REPO / "docs" / "cli.md").read_text() == cli_reference.render(), (
        "docs/cli.md is out of date with the CLI: run python scripts/cli_reference.py")


def test_cli_reference_lists_every_command():
    from typer.testing import CliRunner

    from lesionsynth import cli

    listed = CliRunner().invoke(cli.app, ["--help"], terminal_width=200).output.split("Commands:", 1)[1]
    commands = re.findall(r"^  ([a-z-]+)  ", listed, flags=re.M)
    reference = (REPO / "docs" / "cli.md").read_text()
    assert commands and all(f"## `lesionsynth {c}`" in reference for c in commands)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} in {where.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_readme_is_short_and_links_the_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 120
    linked = set(LINK.findall(readme))
    missing = [p.name for p in DOCS if f"docs/{p.name}" not in linked and p.name != "README.md"]
    assert not missing, f"docs not linked from README.md: {missing}"


def make_target(name: str) -> tuple[str, str]:
    """(prerequisites, recipe) of a Makefile target."""
    text = (REPO / "Makefile").read_text()
    match = re.search(rf"^{re.escape(name)}:([^\n]*)\n((?:\t[^\n]*\n)*)", text, flags=re.M)
    assert match, f"no target {name} in the Makefile"
    return match.group(1).split(), match.group(2)


def test_demo_fetches_only_what_it_reads():
    fetch = load_script("fetch_data")
    prereqs, _ = make_target("demo")
    assert "data" not in prereqs and "demo-data" in prereqs
    _, fetch_recipe = make_target("demo-data")
    assert "--demo" in fetch_recipe
    _, demo_recipe = make_target("demo")
    read = set(re.findall(r"\$\(DATA\)/([\w/]+)", demo_recipe))
    assert read and read <= set(fetch.with_sources(fetch.DEMO_DATASETS))
    assert fetch.with_sources(["heldout/lung_lps"]) == ["lung_ct", "lung_multiclass", "heldout/lung_lps"]
    assert fetch.with_sources(fetch.DATASETS) == list(fetch.DATASETS)


def test_make_test_fetches_what_the_tests_read_and_lists_skips():
    fetch = load_script("fetch_data")
    prereqs, recipe = make_target("test")
    assert "test-data" in prereqs and " -rs" in recipe
    _, test_data_recipe = make_target("test-data")
    assert "--tests" in test_data_recipe
    _, data_recipe = make_target("data")
    assert "--only" not in data_recipe and "--demo" not in data_recipe and "--tests" not in data_recipe
    fetched = set(fetch.with_sources(fetch.TEST_DATASETS))
    assert not any(name.startswith("heldout/") for name in fetched)  # the tests never see the held-out sets
    sources = "\n".join(p.read_text() for p in (REPO / "tests").glob("*.py") if p.name != "test_docs.py")
    read = {name for name in fetch.DATASETS if re.search(rf"[\"'/]{re.escape(name)}[\"'/]", sources)}
    assert read and read <= fetched, f"datasets the tests read but make test does not fetch: {read - fetched}"


def test_fetch_stamps_say_what_is_there(tmp_path, monkeypatch, capsys):
    """`--tests` stamps the tests' datasets, which then satisfy any request among them (`--demo` too) but not a
    full build; a full build stamps both."""
    fetch = load_script("fetch_data")
    built = []
    monkeypatch.setattr(fetch, "build_all", lambda cache, only=None: built.append(only))
    cache = tmp_path / "data"
    cache.mkdir()
    assert fetch.main(["--cache", str(cache), "--tests"]) == 0
    assert (cache / fetch.TESTS_STAMP_NAME).is_file() and not (cache / fetch.STAMP_NAME).exists()
    assert fetch.main(["--cache", str(cache), "--demo"]) == 0 and fetch.main(["--cache", str(cache), "--tests"]) == 0
    assert len(built) == 1  # both satisfied by the stamp: nothing built again
    assert fetch.main(["--cache", str(cache), "--only", "heldout/lung_lps"]) == 0
    assert len(built) == 2 and not (cache / fetch.STAMP_NAME).exists()
    assert fetch.main(["--cache", str(cache)]) == 0
    assert built[-1] is None and (cache / fetch.STAMP_NAME).is_file()
