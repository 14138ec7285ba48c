"""The CPU kernels' coefficients are _float_arithmetic's table, number for number."""

import pathlib
import re

import numpy as np

import hatch_build
from stablelayers._core.arithmetic import CPP_NAMES

# The repository's source, which the build compiles (an installed wheel has no .cc).
SOURCE = pathlib.Path(hatch_build.__file__).parent / hatch_build.KERNELS
NUMBER = r"[-+]?[0-9.]+(?:e[-+]?[0-9]+)?f?"


def _cpp_constants() -> dict[str, tuple[float, ...]]:
    """Every ``constexpr float`` in the kernels' source: scalars and arrays, by name."""
    text = SOURCE.read_text()
    found: dict[str, tuple[float, ...]] = {}
    for declaration in re.findall(r"constexpr float (.*?);", text, re.DOTALL):
        for name, values in re.findall(
            rf"(k\w+)(?:\[\d+\])?\s*=\s*(\{{[^}}]*\}}|{NUMBER})", declaration
        ):
            found[name] = tuple(float(v.rstrip("f")) for v in re.findall(NUMBER, values))
    return found


def test_every_table_entry_is_in_the_kernels_with_the_same_float32_values():
    cpp = _cpp_constants()
    for name, values in CPP_NAMES.items():
        assert name in cpp, f"{name} is not declared in {SOURCE.name}"
        np.testing.assert_array_equal(
            np.float32(cpp[name]), np.float32(values), err_msg=f"{name} differs"
        )


def test_the_kernels_declare_no_coefficient_the_table_lacks():
    polynomial = {name for name in _cpp_constants() if name.startswith(("kQ", "kLog", "kLn"))}
    polynomial |= {name for name in _cpp_constants() if name in ("kNearZero", "kExpm1Q")}
    assert polynomial <= set(CPP_NAMES)
