"""The error of one row of training data."""

from __future__ import annotations


class BadRow(Exception):
    """A row that cannot become an example; the caller adds file and row, and may skip it if skippable."""

    def __init__(self, reason: str, skippable: bool = True) -> None:
        super().__init__(reason)
        self.skippable = skippable
