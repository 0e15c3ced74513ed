"""A shim for tools that still look for setup.py: the metadata lives in pyproject.toml's [project] table."""
from setuptools import setup

setup()
