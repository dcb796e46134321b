"""Shared fixtures. ``organism_test`` builds the test-preset organism once per session.

It builds into a fresh temporary directory (so the build itself is tested every session). Set
``ALIGNSCOPE_TEST_ORGANISM_DIR`` to build into / reuse a fixed directory instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # The CI and dev machines have 2 shared cores: one thread is faster and deterministic.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def organism_test(tmp_path_factory):
    """The ``test`` preset organism (seed 0), built once per session."""
    from alignscope.organism import load_organism

    fixed = os.environ.get("ALIGNSCOPE_TEST_ORGANISM_DIR")
    out = Path(fixed) if fixed else tmp_path_factory.mktemp("organism") / "test-seed0"
    return load_organism(preset="test", seed=0, out=out, threads=1, quiet=True)
