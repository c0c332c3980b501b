"""Shared fixtures (the helpers they use live in helpers.py)."""
from __future__ import annotations

import pytest

from helpers import make_experiment


@pytest.fixture
def toy_experiment(tmp_path):
    return lambda **sections: make_experiment(tmp_path, **sections)
