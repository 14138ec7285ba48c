"""Settings of the peers' own suites (JAX's and Equinox's), applied to every test here.

JAX's tests run with implicit rank promotion as an error and Flax's and Equinox's with
warnings as errors; the ports in this folder hold stablelayers to the same settings,
whatever the rest of the suite configures.
"""

import pathlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

_HERE = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in pathlib.Path(str(item.fspath)).resolve().parents:
            # Appended, so a test's own filterwarnings marks (closer to it) still win.
            item.add_marker(pytest.mark.filterwarnings("error"), append=False)
