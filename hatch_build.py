"""Compiles the CPU kernels into the wheel when the package is built.

First the kernels' constants: ``_cpu_coefficients.h`` is written from the one table,
``src/stablelayers/_core/coefficients.py``, which is read as a file (the build environment
has no JAX to import the package with). Then ``src/stablelayers/_cpu/_cpu_kernels.cc``,
which includes that header, is compiled once per instruction set a CPU of this
architecture may have (x86-64: AVX-512, AVX2 and baseline x86-64; other architectures:
their baseline, which is NEON on arm64), plus a small probe that tells, at import, which of
them the running CPU and OS support. The package loads only these files, from its own
directory; nothing is compiled or cached in a user's process.

Set ``STABLELAYERS_CPU_KERNELS=0`` when building to leave the kernels out (a pure-Python
wheel). A platform without a C++ compiler gets the same wheel, with a message; a compiler
that fails fails the build, with a message that says how to build without the kernels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# The kernel binding's subpackage: the sources, and where the libraries are installed.
PACKAGE = pathlib.Path("src", "stablelayers", "_cpu")
KERNELS = PACKAGE / "_cpu_kernels.cc"
PROBE = PACKAGE / "_cpu_features.cc"
# The table the kernels' constants come from, and the header written from it next to the
# libraries (a build output: git ignores it; the wheel carries it, as a record of the
# constants its libraries were built with).
TABLE = pathlib.Path("src", "stablelayers", "_core", "coefficients.py")
HEADER = "_cpu_coefficients.h"

# No -ffast-math: TwoSum and the NaN and infinity guards need IEEE arithmetic as written.
COMMON_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-w")

# Instruction sets per architecture, best first. The names are the ones the probe reports
# and the loader reads (src/stablelayers/_cpu/library.py); each must be a subset of what the
# probe checks for it.
VARIANTS = {
    "x86_64": {
        "avx512": (
            "-mavx512f",
            "-mavx512dq",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx2",
            "-mfma",
            "-mf16c",
            "-mtune=skylake-avx512",
        ),
        "avx2": ("-mavx2", "-mfma", "-mf16c", "-mtune=haswell"),
        "x86_64": ("-march=x86-64", "-mtune=generic"),
    },
}
DEFAULT_VARIANTS = {"baseline": ()}
# SHA-256 of each library, checked before it is loaded: a truncated or damaged file is
# refused instead of crashing the process that maps it.
MANIFEST = "_cpu_kernels.sha256"


def architecture() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def library_name(variant: str) -> str:
    return f"_cpu_kernels_{variant}.so"


class KernelBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Hatchling build hook: the kernels for every instruction set, and the probe."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if os.environ.get("STABLELAYERS_CPU_KERNELS", "1") == "0":
            self.app.display_info("stablelayers: STABLELAYERS_CPU_KERNELS=0, no CPU kernels")
            return
        compiler = find_compiler()
        if compiler is None or sys.platform == "win32":
            self.app.display_warning(
                "stablelayers: no C++ compiler (g++ or clang++; set CXX to choose one), so "
                "the wheel has no CPU kernels; every op runs its pure-JAX path."
            )
            return
        root = pathlib.Path(self.root)
        # An editable install imports the source tree, so the libraries go there (ignored
        # by git); a wheel gets them from a temporary folder.
        if version == "editable":
            out = root / PACKAGE
        else:
            out = pathlib.Path(tempfile.mkdtemp(prefix="stablelayers-build-"))
        header = write_header(read_table(root / TABLE), out / HEADER)
        # -I puts the fresh header, not one an earlier build left next to the source, first:
        # the .cc includes it with <>, which does not look in the source's own folder.
        include = (out, jaxlib_include())
        variants = VARIANTS.get(architecture(), DEFAULT_VARIANTS)
        built = [compile_library(compiler, root / PROBE, out / "_cpu_features.so", (), ())]
        for variant, flags in variants.items():
            target = out / library_name(variant)
            built.append(compile_library(compiler, root / KERNELS, target, flags, include))
        built.append(write_manifest(built, out / MANIFEST))
        built.append(header)
        self.app.display_info(f"stablelayers: CPU kernels for {', '.join(variants)}")
        build_data["pure_python"] = False
        # The libraries call no Python API: one wheel serves every Python 3 on the platform.
        build_data["tag"] = (
            f"py3-none-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"
        )
        if version != "editable":
            for path in built:
                build_data["force_include"][str(path)] = f"stablelayers/_cpu/{path.name}"


def read_table(path: pathlib.Path) -> dict[str, tuple[float, ...] | float]:
    """The table's ``CPP_NAMES``, from its file: executed on its own, not imported as part
    of the package, whose ``__init__`` imports JAX."""
    spec = importlib.util.spec_from_file_location("_stablelayers_coefficients", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"stablelayers: cannot read the coefficient table {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table: dict[str, tuple[float, ...] | float] = module.CPP_NAMES
    return table


def float32_literal(value: float) -> str:
    """``value`` rounded to float32 (to nearest), as an exact C++ hex-float literal."""
    rounded = struct.unpack("f", struct.pack("f", value))[0]
    significand, exponent = rounded.hex().split("p")
    return f"{significand.rstrip('0').rstrip('.')}p{exponent}f"


def render_header(table: dict[str, tuple[float, ...] | float]) -> str:
    """The kernels' constants as C++: a scalar or, for a polynomial, an array of its
    coefficients in increasing degree, each with the table's decimal as a comment."""
    lines = [
        f"// Written by hatch_build.py at build time from CPP_NAMES in {TABLE.as_posix()}:",
        "// edit the table there, not this file. Each hex float is exactly the float32 that",
        "// the table's number (the comment) rounds to.",
        "#pragma once",
        "",
    ]
    for name, values in table.items():
        if isinstance(values, tuple):
            lines.append(f"constexpr float {name}[{len(values)}] = {{")
            lines += [f"    {float32_literal(v)},  // {v!r}" for v in values]
            lines.append("};")
        else:
            lines.append(f"constexpr float {name} = {float32_literal(values)};  // {values!r}")
    return "\n".join(lines) + "\n"


def write_header(
    table: dict[str, tuple[float, ...] | float], target: pathlib.Path
) -> pathlib.Path:
    target.write_text(render_header(table))
    return target


def write_manifest(libraries: list[pathlib.Path], target: pathlib.Path) -> pathlib.Path:
    lines = [
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n" for path in libraries
    ]
    target.write_text("".join(lines))
    return target


def find_compiler() -> list[str] | None:
    # $CXX may carry arguments of its own ("ccache g++").
    for candidate in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        try:
            command = shlex.split(candidate)
        except ValueError as error:
            raise RuntimeError(
                f"stablelayers: CXX={candidate!r} cannot be parsed: {error}"
            ) from error
        if command and shutil.which(command[0]):
            return command
    return None


def jaxlib_include() -> pathlib.Path:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or spec.origin is None:
        raise RuntimeError("stablelayers: building the CPU kernels needs jaxlib's FFI headers")
    include = pathlib.Path(spec.origin).parent / "include"
    if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
        raise RuntimeError(f"stablelayers: no XLA FFI headers under {include}")
    return include


def compile_library(
    compiler: list[str],
    source: pathlib.Path,
    target: pathlib.Path,
    flags: tuple[str, ...],
    include: tuple[pathlib.Path, ...],
) -> pathlib.Path:
    command = [*compiler, *COMMON_FLAGS, *flags]
    for folder in include:
        command += ["-I", str(folder)]
    command += [str(source), "-o", str(target)]
    result = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        raise RuntimeError(
            f"stablelayers: compiling the CPU kernels failed:\n  {shlex.join(command)}\n"
            f"{result.stderr[-4000:]}\nInstall with STABLELAYERS_CPU_KERNELS=0 to build "
            "without them (every op then runs its pure-JAX path)."
        )
    return target
