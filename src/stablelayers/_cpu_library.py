"""Builds, caches and registers the CPU kernels of ``_cpu_kernels.cc``.

The kernels are compiled on first use with the machine's C++ compiler, for the machine's
own CPU (``-march=native``), against the XLA FFI headers that ship with jaxlib, and the
shared library is cached (``$STABLELAYERS_CACHE_DIR``, else ``~/.cache/stablelayers``) under
a name that hashes everything it was built from. Without a compiler, or with
``STABLELAYERS_CPU_KERNELS=0``, every op runs its pure-JAX path, with the same semantics;
so does every op on other platforms (GPU, TPU).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings

import jax
import jaxlib

from stablelayers._kernel_switch import pure_jax_enabled

SOURCE = pathlib.Path(__file__).with_name("_cpu_kernels.cc")

# FFI target name -> symbol in the shared library.
TARGETS = {
    "stablelayers_softmax_f32": "StablelayersSoftmaxF32",
    "stablelayers_softmax_grad_f32": "StablelayersSoftmaxGradF32",
    "stablelayers_log_softmax_f32": "StablelayersLogSoftmaxF32",
    "stablelayers_log_softmax_grad_f32": "StablelayersLogSoftmaxGradF32",
    "stablelayers_softplus_f32": "StablelayersSoftplusF32",
    "stablelayers_softplus_grad_f32": "StablelayersSoftplusGradF32",
}

# No -ffast-math: TwoSum and the NaN and infinity guards need IEEE arithmetic as written.
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-w")
_HOST_FLAGS = ("-march=native",)


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded."""


def available() -> bool:
    """Whether ops traced now may use the kernels: not turned off (``pure_jax()``, or
    ``STABLELAYERS_CPU_KERNELS=0``, both read at each trace), one CPU device, and built
    and registered.

    With several CPU devices (``--xla_force_host_platform_device_count``) a program may be
    sharded, and XLA cannot partition a custom call it knows nothing about: it would gather
    the whole array onto every device. The pure-JAX code partitions like any JAX code.
    """
    if pure_jax_enabled() or os.environ.get("STABLELAYERS_CPU_KERNELS", "1") == "0":
        return False
    return len(jax.devices("cpu")) == 1 and load()


@functools.cache
def load() -> bool:
    """Build (at most once per machine), load and register the kernels.

    Returns whether that worked. A failure is reported once, as a warning, and the ops fall
    back to their pure-JAX path.
    """
    try:
        library = ctypes.CDLL(str(build()))
        for target, symbol in TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(library, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (BuildError, OSError, AttributeError) as error:
        warnings.warn(
            f"stablelayers: the CPU row kernels are unavailable ({error}); softmax and "
            "log_softmax run their pure-JAX path (same results, slower). Set "
            "STABLELAYERS_CPU_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def build() -> pathlib.Path:
    """The path of the compiled library, compiling it first if the cache lacks it."""
    compiler = _compiler()
    errors = []
    # A compiler that does not know -march=native (some clang builds) still gets a build;
    # a marker file remembers the failure, so later processes skip straight to it.
    directory = _cache_dir()
    for flags in (_FLAGS + _HOST_FLAGS, _FLAGS):
        target = directory / f"cpu_kernels-{_fingerprint(compiler, flags)}.so"
        failed = target.with_suffix(".failed")
        if target.exists():
            return target
        if failed.exists():
            errors.append(failed.read_text(errors="replace"))
            continue
        try:
            _compile(compiler, flags, target)
            return target
        except BuildError as error:
            errors.append(str(error))
            try:
                failed.write_text(str(error))
            except OSError:
                pass
    raise BuildError("\n".join(errors))


def _compiler() -> list[str]:
    # $CXX may carry arguments of its own ("ccache g++").
    for candidate in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        command = shlex.split(candidate)
        if command and shutil.which(command[0]):
            return command
    raise BuildError("no C++ compiler found (set CXX, or install g++ or clang++)")


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("STABLELAYERS_CACHE_DIR")
    if root:
        directory = pathlib.Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
        directory = pathlib.Path(base) / "stablelayers"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK | os.X_OK):
            return directory
    except OSError:
        pass
    # A read-only home (some containers and batch jobs): build per user in the temp dir.
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return pathlib.Path(tempfile.gettempdir()) / f"stablelayers-{user}"


def _fingerprint(compiler: list[str], flags: tuple[str, ...]) -> str:
    # Everything the binary depends on: the source, the compiler, the flags, the FFI
    # headers' jaxlib and the machine (-march=native builds for this CPU only).
    parts = [
        SOURCE.read_bytes(),
        " ".join(compiler).encode(),
        _compiler_version(compiler).encode(),
        " ".join(flags).encode(),
        jaxlib.__version__.encode(),
        platform.machine().encode(),
        platform.processor().encode(),
        _cpu_flags().encode(),
    ]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part + b"\0")
    return digest.hexdigest()[:16]


def _compiler_version(compiler: list[str]) -> str:
    try:
        result = subprocess.run(
            [*compiler, "--version"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"{' '.join(compiler)} --version failed: {error}") from error
    return result.stdout


def _cpu_flags() -> str:
    # Two machines that share a cache directory (a network home) may differ in CPU.
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _compile(compiler: list[str], flags: tuple[str, ...], target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes never see half a file.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    command = [
        *compiler,
        *flags,
        "-I",
        jax.ffi.include_dir(),
        str(SOURCE),
        "-o",
        partial,
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, errors="replace", timeout=600
        )
        if result.returncode != 0:
            raise BuildError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        # mkstemp made the file private; a cache directory may be shared between users.
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"{' '.join(command)} failed: {error}") from error
    finally:
        if os.path.exists(partial):
            os.remove(partial)
