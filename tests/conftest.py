"""Fixtures shared by the test modules (a module's own fixture of the same name takes precedence)."""

import pytest

from .helpers import write_text_data


@pytest.fixture
def data_file(tmp_path):
    """The demo's responses as text rows, in this test's own folder."""
    return write_text_data(tmp_path / "data.jsonl")
