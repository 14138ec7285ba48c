import pathlib

import jax
import numpy as np
import pytest

# As the peers test (JAX's and Equinox's suites): an implicit rank promotion is an error,
# so stablelayers' own broadcasts must be explicit or deliberate (_rank_promotion.py).
# Warnings are errors too (pyproject.toml's filterwarnings).
jax.config.update("jax_numpy_rank_promotion", "raise")

# Part of the repository: a missing file is a failure, never a skip.
HARD_INPUTS = pathlib.Path(__file__).resolve().parent / "data" / "hard_inputs.npz"


@pytest.fixture
def x64():
    """Run a test with float64 enabled (finite-difference checks need it)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def hard_inputs():
    """The float32 inputs with 40-digit references (tests/data/README.md)."""
    with np.load(HARD_INPUTS) as data:
        return dict(data)


# The numerical claims hold on both paths an op can take: the CPU kernels (the default
# here) and the pure-JAX code that runs everywhere else (GPU, TPU) and wherever the kernels
# cannot be built. These modules run once on each; test_cpu_kernels.py checks the two
# against each other under every transform. A test that must hold on both paths goes in
# one of these modules rather than taking a kernels/pure_jax parameter of its own.
BOTH_PATHS = {
    "test_values",
    "test_accuracy",
    "test_gradients",
    "test_residuals",
    "test_debug_flags",
}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__.rsplit(".", 1)[-1] in BOTH_PATHS:
        metafunc.fixturenames.append("op_path")
        # Module scope: pytest runs a module's tests on one path, then on the other.
        metafunc.parametrize("op_path", ["kernels", "pure_jax"], indirect=True, scope="module")


@pytest.fixture(scope="module")
def op_path(request):
    """``kernels`` (if they could be built here) or ``pure_jax``, read at each trace."""
    from stablelayers._cpu import library as _cpu_library

    with pytest.MonkeyPatch.context() as patch:
        if request.param == "pure_jax":
            patch.setenv("STABLELAYERS_CPU_KERNELS", "0")
        elif not _cpu_library.available():
            pytest.skip("the CPU kernels could not be built here")
        jax.clear_caches()  # nothing traced on the other path may be reused
        yield request.param
    jax.clear_caches()
