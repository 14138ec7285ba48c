"""The process environment: glibc's allocator settings, and what machine and versions ran."""

from __future__ import annotations

import datetime
import importlib
import os
import pathlib
import platform
import subprocess
import sys

# Without these, glibc returns each freed 64-256 MiB buffer to the kernel and the next run
# page-faults a fresh one in, which costs more than the ops being timed. With them, freed
# buffers stay in the heap and are reused, as in a training loop's steady state.
MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_ARENA_MAX": "1",
}
# torch's OpenMP workers spin for a while after each parallel region. With contenders
# interleaved in one process, that spinning takes a core from whichever case runs next
# (measured: stablelayers' two-thread log_softmax kernel 1.42x jax.nn's time right after
# torch, 1.00x with this set; torch's own times unchanged). Passive workers sleep at once.
SHARED_PROCESS_ENV = {**MALLOC_ENV, "OMP_WAIT_POLICY": "PASSIVE"}


def ensure_process_env(
    argv: list[str], module: str = "benchmarks", env: dict[str, str] = SHARED_PROCESS_ENV
) -> None:
    """Re-execute ``python -m <module>`` with ``env`` (:data:`SHARED_PROCESS_ENV`: glibc's
    settings and passive OpenMP workers) unless it is already set.

    glibc and OpenMP read these variables once, at start-up, so setting them in a running
    process changes nothing: the only way is a fresh process.
    """
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    env = {**os.environ, **env}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what ``platform`` knows)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


def _git_state() -> str:
    """Short commit and whether src/stablelayers/ differs from it (the core changes often)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src/stablelayers"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    if not commit:
        return "unknown"
    return f"{commit}{' + uncommitted changes' if dirty else ''}"


def load_average() -> str:
    """The 1-minute load average: on a shared machine, how busy the other users were."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def _jax_device() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.platform} ({device.device_kind})"


def describe() -> dict[str, str]:
    """Date, machine and versions, for the report's header."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()}, {cores} cores ({usable} usable), {platform.system()}",
        "jax device": _jax_device(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "flax": _version("flax"),
        "equinox": _version("equinox"),
        "stablelayers": f"{_version('stablelayers')} (git {_git_state()})",
        "stablelayers path": _stablelayers_path(),
    }


def _stablelayers_path() -> str:
    from stablelayers._cpu import library as _cpu_library

    if _cpu_library.available():
        return f"CPU kernels, {_cpu_library.load()} build (softmax, log_softmax, softplus)"
    return "pure JAX (CPU kernels off or unavailable)"
