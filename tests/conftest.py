import pathlib

import jax
import numpy as np
import pytest

HARD_INPUTS = (
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "accuracy" / "hard_inputs.npz"
)


@pytest.fixture
def x64():
    """Run a test with float64 enabled (finite-difference checks need it)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def hard_inputs():
    """The float32 inputs with 40-digit references from ../shared/accuracy."""
    if not HARD_INPUTS.exists():
        pytest.skip(f"{HARD_INPUTS} not found; it ships beside the repository in ../shared")
    with np.load(HARD_INPUTS) as data:
        return dict(data)
