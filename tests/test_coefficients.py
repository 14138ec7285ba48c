"""The CPU kernels' constants are the table's (``_core/coefficients.py``): the build writes
them into the header the kernels include, each as the exact float32 the table's number
rounds to, and reads the table without JAX."""

import pathlib
import re
import sys

import numpy as np
import pytest

import hatch_build
from stablelayers._core import coefficients

ROOT = pathlib.Path(hatch_build.__file__).parent
# A declaration of the generated header (a build output, not kernel source): a scalar or an
# array of hex floats.
DECLARATION = re.compile(r"constexpr float (\w+)(\[\d+\])? = \{?([^;}]*)\}?;")


def _header_values(text: str) -> dict[str, tuple[float, ...] | float]:
    """The header's constants by name, each hex float parsed back to a Python float."""
    code = re.sub(r"//[^\n]*", "", text)
    found: dict[str, tuple[float, ...] | float] = {}
    for name, brackets, body in DECLARATION.findall(code):
        values = tuple(
            float.fromhex(v.strip().removesuffix("f")) for v in body.split(",") if v.strip()
        )
        found[name] = values if brackets else values[0]
    return found


def _float32(values):
    return (
        tuple(float(v) for v in np.float32(values).ravel())
        if isinstance(values, tuple)
        else float(np.float32(values))
    )


def test_the_build_reads_the_table_without_jax_or_the_package(monkeypatch):
    # The build environment has hatchling and jaxlib only.
    for module in ("jax", "numpy", "stablelayers"):
        monkeypatch.setitem(sys.modules, module, None)
    assert hatch_build.read_table(ROOT / hatch_build.TABLE) == coefficients.CPP_NAMES


def test_the_header_holds_every_table_entry_as_its_exact_float32(tmp_path):
    header = hatch_build.write_header(coefficients.CPP_NAMES, tmp_path / hatch_build.HEADER)
    values = _header_values(header.read_text())
    assert list(values) == list(coefficients.CPP_NAMES)
    for name, table in coefficients.CPP_NAMES.items():
        # Compared as float64: the header's float is the float32 rounding, exactly.
        assert values[name] == _float32(table), name
        assert type(values[name]) is type(table), name


def test_the_installed_header_is_the_current_table():
    # The libraries next to it were compiled with it: a table edited since the last build
    # (pip install -e . rebuilds) fails here.
    from stablelayers._cpu import library

    if not (library.PACKAGE_DIR / hatch_build.MANIFEST).exists():
        pytest.skip("installed without the CPU kernels")
    installed = (library.PACKAGE_DIR / hatch_build.HEADER).read_text()
    assert installed == hatch_build.render_header(coefficients.CPP_NAMES)
