"""The installed package: version, typing marker, and no framework imports."""

import pathlib
import subprocess
import sys

import stablelayers


def test_version_and_typing_marker():
    assert isinstance(stablelayers.__version__, str) and stablelayers.__version__
    assert (pathlib.Path(stablelayers.__file__).parent / "py.typed").exists()


def test_public_api():
    assert set(stablelayers.__all__) >= {
        "softmax",
        "log_softmax",
        "softplus",
        "masked_softmax",
        "forward_mode",
    }


def test_importing_the_core_imports_no_framework():
    code = (
        "import sys, stablelayers; "
        "bad = [m for m in ('flax', 'equinox', 'optax', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
