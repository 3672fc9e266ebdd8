"""The zoo's marker for its CI selection (``pytest -m zoo_smoke``)."""
from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line("markers", "zoo_smoke: a few fast, diverse zoo models for CI (run with -m zoo_smoke)")
