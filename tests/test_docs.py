"""The documentation site (docs/ + mkdocs.yml): every example runs, every public name has an
API entry, the CLI reference covers the parser, the TOML page every bundled key, and the site
builds with --strict (a broken link, a missing reference or a warning fails)."""
from __future__ import annotations

import html
import importlib
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import gradalign
from tests.support.markdown import blocks, run_blocks

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md"))
EXAMPLE_PAGES = [p for p in PAGES if blocks(p)]
INTEGRATIONS = ["gradalign.integrations.lightning", "gradalign.integrations.transformers"]


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_page_examples_run(page, tmp_path, monkeypatch):
    """A page's ```python blocks run in order in one namespace (in a scratch folder)."""
    page_blocks = blocks(page)
    for module in {b.requires for b in page_blocks if b.requires}:
        pytest.importorskip(module, reason=f"{page.relative_to(ROOT)} needs {module}")
    monkeypatch.chdir(tmp_path)
    run_blocks(page, page_blocks)


def test_every_example_page_is_found():
    """The parametrisation above is not empty, and skipped blocks are few and say why."""
    assert len(EXAMPLE_PAGES) >= 15
    skipped = [(p.name, b.skip) for p in EXAMPLE_PAGES for b in blocks(p) if b.skip]
    assert len(skipped) <= 3, skipped
    assert all(reason.strip() for _, reason in skipped)


def _api_entries() -> set[str]:
    return {m.group(1) for page in (DOCS / "api").glob("*.md")
            for m in re.finditer(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.M)}


def test_every_public_name_has_an_api_entry():
    """`gradalign.X` for every name in gradalign.__all__, and each integration's names."""
    entries = _api_entries()
    wanted = {f"gradalign.{name}" for name in gradalign.__all__}
    for module_name in INTEGRATIONS:
        module = importlib.import_module(module_name)
        wanted |= {f"{module_name}.{name}" for name in module.__all__}
    assert not wanted - entries, f"no API entry (::: NAME in docs/api/*.md) for {sorted(wanted - entries)}"
    # Entries name public paths only (module paths inside gradalign are not promised to stay).
    assert not entries - wanted, f"API entries that are not public names: {sorted(entries - wanted)}"


def _cli_reference():
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        return importlib.import_module("cli_reference")
    finally:
        sys.path.pop(0)


def test_cli_reference_covers_every_command_and_option():
    """The generated reference has a section per subcommand listing each of its options."""
    import argparse

    from gradalign.cli import build_parser
    parser = build_parser()
    text = _cli_reference().render(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"demo", "reproduce", "train", "tune", "report", "list"}
    sections = dict(re.findall(r"^## `gradalign (\w+)`\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S))
    assert set(sections) == set(sub.choices)
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = action.option_strings[0] if action.option_strings else action.dest
            assert f"`{label}" in sections[name], f"gradalign {name}: {label} is not in the CLI reference"
            if action.help:  # the help text too, not only the name
                assert " ".join(_words(action.help)[:5]) in " ".join(_words(sections[name])), (name, label)
    for option in ("--version",):
        assert option in text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", html.unescape(text).lower())


def _toml_keys(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in table.items():
        if isinstance(value, dict) and key not in ("params", "search", "options"):
            keys |= _toml_keys(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):  # [[arms]]
            for item in value:
                keys |= _toml_keys(item, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_config_page_documents_every_bundled_key():
    """Every key the bundled experiment files use appears on the configuration page."""
    page = (DOCS / "experiments" / "config.md").read_text()
    configs = [f for f in (resources.files("gradalign") / "configs").iterdir() if f.name.endswith(".toml")]
    assert len(configs) >= 8
    missing = set()
    for config in configs:
        for key in _toml_keys(tomllib.loads(config.read_text())):
            leaf = key.split(".")[-1]
            if not re.search(rf"`{re.escape(leaf)}`", page):
                missing.add(f"{config.name}: {key}")
    assert not missing, sorted(missing)


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`, as `make docs` runs it, offline, into a scratch folder."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    cli = (site / "experiments" / "cli" / "index.html").read_text()
    assert "gradalign tune" in cli and "--heartbeat" in cli
    api = (site / "api" / "methods" / "index.html").read_text()
    assert "gradalign.GASW" in api and "leave_one_out" in api
    for page in PAGES:  # every page is built (mkdocs.yml: a page left out of the nav is a warning)
        rel = page.relative_to(DOCS).with_suffix("")
        built = site / (rel.parent if rel.name == "index" else rel) / "index.html"
        assert built.exists(), built
    html = "".join(p.read_text() for p in site.rglob("*.html"))
    assert "fonts.googleapis.com" not in html, "the theme would fetch fonts: keep theme.font false"


def test_readme_is_a_front_page():
    """At most 200 lines, names the test command CI runs, and links into the site."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make test" in readme and "make demo" in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).exists(), link
