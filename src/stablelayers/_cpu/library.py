"""Loads and registers the CPU kernels that were compiled when the package was built.

The build (``hatch_build.py``) compiles ``_cpu_kernels.cc`` once per instruction set a CPU
of its architecture may have, into this package's own directory: on x86-64
``_cpu_kernels_avx512.so``, ``_cpu_kernels_avx2.so`` and ``_cpu_kernels_x86_64.so``, and
``_cpu_features.so``, which tells which of them the running CPU and OS support, and
``_cpu_kernels.sha256``, their checksums. The best build is loaded on the first op traced for
the CPU. Nothing is compiled, cached or read from anywhere else; a file is refused if anyone
but its owner (or root) could have written it, or if it differs from its checksum (a
truncated library would crash the process that maps it).

Where the kernels are absent (a wheel built without a compiler, or with
``STABLELAYERS_CPU_KERNELS=0``), or turned off at run time (``STABLELAYERS_CPU_KERNELS=0``,
:func:`stablelayers.pure_jax`), every op runs its pure-JAX path, with the same semantics;
so does every op on other platforms (GPU, TPU).

``STABLELAYERS_CPU_ISA`` names a build to use instead of the best one (``avx2`` or
``x86_64`` on an AVX-512 machine, say): for testing and for comparing builds; a build the
CPU cannot run is refused.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import stat
import sys
import warnings

import jax

from stablelayers._core.switches import pure_jax_enabled

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent

# Kernel -> its handler's symbol in the shared library.
SYMBOLS = {
    "softmax": "StablelayersSoftmaxF32",
    "softmax_grad": "StablelayersSoftmaxGradF32",
    "log_softmax": "StablelayersLogSoftmaxF32",
    "log_softmax_grad": "StablelayersLogSoftmaxGradF32",
    "softplus": "StablelayersSoftplusF32",
    "softplus_grad": "StablelayersSoftplusGradF32",
}


def target_name(kernel: str) -> str:
    """The FFI target of a kernel. ``jax.export`` refuses a program that calls it and names
    the target in its error, so the name says what to do instead."""
    return f"stablelayers_{kernel}_f32__to_export_trace_inside_stablelayers_pure_jax"


class KernelsUnavailable(RuntimeError):
    """The installed package has no usable CPU kernels."""


def available() -> bool:
    """Whether ops traced now may use the kernels: not turned off (``pure_jax()``, or
    ``STABLELAYERS_CPU_KERNELS=0``, both read at each trace), one CPU device, and loaded
    and registered.

    With several CPU devices (``--xla_force_host_platform_device_count``) a program may be
    sharded, and XLA cannot partition a custom call it knows nothing about: it would gather
    the whole array onto every device. The pure-JAX code partitions like any JAX code.
    """
    if pure_jax_enabled() or os.environ.get("STABLELAYERS_CPU_KERNELS", "1") == "0":
        return False
    return len(jax.devices("cpu")) == 1 and load() is not None


@functools.cache
def load() -> str | None:
    """Load the best build of the kernels this CPU can run and register its FFI targets.

    Returns the build's name (``avx512``, ``avx2``, ``x86_64``, ``baseline``), or ``None``
    where there is none, after one warning that says why.
    """
    try:
        variant = choose_variant()
        library = _open(PACKAGE_DIR / f"_cpu_kernels_{variant}.so")
        for kernel, symbol in SYMBOLS.items():
            capsule = jax.ffi.pycapsule(getattr(library, symbol))
            jax.ffi.register_ffi_target(target_name(kernel), capsule, platform="cpu")
    except (KernelsUnavailable, OSError, AttributeError) as error:
        warnings.warn(
            f"stablelayers: the CPU kernels are unavailable ({error}); every op runs its "
            "pure-JAX path (same results, slower). Set STABLELAYERS_CPU_KERNELS=0 to "
            "silence this.",
            RuntimeWarning,
            stacklevel=_caller_stacklevel(),
        )
        return None
    return variant


def _caller_stacklevel() -> int:
    # Point the warning at the user's call, past this package's frames and JAX's tracing.
    frame, level = sys._getframe(1), 1
    inside = (str(PACKAGE_DIR), str(pathlib.Path(jax.__file__).resolve().parent))
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def choose_variant() -> str:
    """The build to load: ``$STABLELAYERS_CPU_ISA`` if set, else the best this CPU runs."""
    probe = _open(PACKAGE_DIR / "_cpu_features.so")
    report = probe.StablelayersCpuKernelVariants
    report.restype = ctypes.c_char_p
    supported: list[str] = report().decode().split(",")
    wanted = os.environ.get("STABLELAYERS_CPU_ISA", "")
    if not wanted:
        return supported[0]
    if wanted not in supported:
        raise KernelsUnavailable(
            f"STABLELAYERS_CPU_ISA={wanted!r} is not a build this CPU can run; it runs "
            f"{', '.join(supported)}"
        )
    return wanted


def _open(path: pathlib.Path) -> ctypes.CDLL:
    if not path.is_file():
        raise KernelsUnavailable(
            f"{path.name} is not installed: the package was built without a C++ compiler "
            "or with STABLELAYERS_CPU_KERNELS=0"
        )
    _check_private(path.parent)
    _check_private(path)
    _check_intact(path)
    return ctypes.CDLL(str(path))


def _check_intact(path: pathlib.Path) -> None:
    manifest = path.with_name("_cpu_kernels.sha256")
    _check_private(manifest)
    expected = dict(line.split()[::-1] for line in manifest.read_text().splitlines() if line)
    if hashlib.sha256(path.read_bytes()).hexdigest() != expected.get(path.name):
        raise KernelsUnavailable(
            f"{path} differs from the checksum it was installed with (damaged or replaced); "
            "reinstall the package"
        )


def _check_private(path: pathlib.Path) -> None:
    # Loading a library runs its code: refuse one that another user could have replaced.
    info = path.stat()
    owners = {0, os.getuid()} if hasattr(os, "getuid") else {info.st_uid}
    if info.st_uid not in owners or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelsUnavailable(
            f"{path} may be written by other users (owner uid {info.st_uid}, mode "
            f"{stat.filemode(info.st_mode)}); reinstall the package where only you can write"
        )
