"""Unit tests: one process, no launcher."""
