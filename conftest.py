"""Shared test fixtures (see also tests/conftest.py)."""

import os

import numpy as np
import pytest

# No network and no writes to HOME during tests: caches go to a temporary place.
os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def rng():
    """A seeded random generator."""
    return np.random.default_rng(0)
