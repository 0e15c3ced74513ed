"""The documentation: the generated reference covers every config field and backend, every page is in the site's
navigation, the README stays a front page, and (where mkdocs is installed) the site builds with --strict."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from lisa_dist import config

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def load_hook():
    spec = importlib.util.spec_from_file_location("config_reference", DOCS / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nav_pages(nav: list) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_reference_lists_every_field_with_its_default():
    reference = load_hook().reference_markdown()
    for section in dataclasses.fields(config.Config):
        values = dataclasses.asdict(getattr(config.Config(), section.name))
        assert f"## `{section.name}`" in reference
        for key in values:
            row = next(
                (line for line in reference.splitlines() if line.startswith(f"| `{section.name}.{key}` |")), None
            )
            assert row is not None, f"{section.name}.{key} is missing from the configuration reference"
            assert row.count(" | ") >= 4, row


def test_allowed_values_come_from_a_literal_type_or_the_choices():
    hook = load_hook()
    assert hook.literal_values(typing.Literal["a", "b"] | None) == ("a", "b")
    assert hook.literal_values(int) == ()
    reference = hook.reference_markdown()
    row = next(line for line in reference.splitlines() if line.startswith("| `lisa.frozen_storage` |"))
    assert all(f"`{value}`" in row for value in ("float32", "bfloat16", "int8", "nf4")), row


def test_table_cells_escape_pipes_and_angle_brackets_outside_code():
    hook = load_hook()
    assert hook.cell("a|b in <output_dir> and `<x>`") == "a\\|b in &lt;output_dir&gt; and `<x>`"


def test_the_capability_table_has_every_backend_and_capability():
    table = load_hook().capabilities_markdown()
    header = table.splitlines()[0]
    assert all(f"`{name}`" in header for name in config.CAPABILITIES)
    for f in dataclasses.fields(type(next(iter(config.CAPABILITIES.values())))):
        assert f"| `{f.name}`:" in table


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = nav_pages(site["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(listed) == pages


def test_pages_describe_the_package_not_its_history():
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        text = page.read_text().lower()
        for phrase in ("this round", "before this work", "work in progress"):
            assert phrase not in text, f"{page.relative_to(ROOT)} speaks of {phrase!r}: history goes to CHANGELOG.md"


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 200
    assert any(line.startswith("make test ") for line in readme)


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs and mkdocs-material are installed by make docs",
)
def test_the_site_builds_strictly(tmp_path):
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    done = subprocess.run(
        mkdocs, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
