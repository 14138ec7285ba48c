"""The CPU kernels are built with the package and loaded only from it: no compiler, cache
or subprocess at run time, no file another user could write, and a clean fallback (one
warning) wherever a build is missing, corrupt, unsafe or unsupported.

Each check runs in a fresh interpreter, since a process loads the kernels at most once.
"""

import functools
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import stablelayers
from stablelayers._cpu import library as _cpu_library

PACKAGE_SOURCES = sorted(pathlib.Path(stablelayers.__file__).parent.rglob("*.py"))

# Runs in a child process: the ops must give the right values, and the kernels' loading must
# end in the build named by argv[1] ('none' for the fallback), with exactly the warnings
# expected (argv[2]: how many).
_LOAD_CHECK = """
import sys, warnings
import jax, jax.numpy as jnp, numpy as np
import stablelayers as sl
from stablelayers._cpu import library as _cpu_library
expected, warning_count = sys.argv[1], int(sys.argv[2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = sl.softmax(jnp.array([0.0, np.log(3.0)]))
    z = sl.log_softmax(jnp.zeros(4))
    g = jax.grad(lambda x: sl.softplus(x).sum())(jnp.zeros(3))
np.testing.assert_allclose(y, [0.25, 0.75], rtol=1e-6)
np.testing.assert_allclose(z, np.full(4, -np.log(4.0)), rtol=1e-6)
np.testing.assert_allclose(g, np.full(3, 0.5), rtol=1e-6)
messages = [str(w.message) for w in caught]
assert len(messages) == warning_count, messages
assert all("pure-JAX path" in m for m in messages), messages
loaded = _cpu_library.load()
assert str(loaded).lower() == expected, (loaded, expected)
print(messages[0] if messages else "")
"""


def _run(code, *args, package_dir=None, **env_updates):
    """Run ``code`` in a fresh interpreter, with the kernels looked for in ``package_dir``
    (the installed package's own directory by default)."""
    if package_dir is not None:
        code = (
            "import pathlib\nfrom stablelayers._cpu import library as _cpu_library\n"
            f"_cpu_library.PACKAGE_DIR = pathlib.Path({str(package_dir)!r})\n{code}"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABLELAYERS_")}
    env.update(env_updates)
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@functools.cache
def _best_variant():
    # One child process for the whole module: each costs an interpreter and a JAX import.
    return _run(
        "from stablelayers._cpu import library as _cpu_library\n"
        "print(_cpu_library.choose_variant())"
    )


needs_kernels = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="no C++ compiler here, so the package was built without its kernels",
)


@needs_kernels
def test_the_installed_package_carries_and_loads_its_kernels():
    # Built with the package: a compiler on the machine means the build must be there.
    variant = _best_variant().strip()
    assert (_cpu_library.PACKAGE_DIR / f"_cpu_kernels_{variant}.so").is_file()
    if platform.machine() == "x86_64":
        assert variant in {"avx512", "avx2", "x86_64"}
    _run(_LOAD_CHECK, variant, "0")


def test_the_package_never_compiles_caches_or_spawns_at_run_time():
    banned = re.compile(r"\b(subprocess|tempfile|gettempdir|mkstemp|shlex|CXX|cache_dir)\b")
    for source in PACKAGE_SOURCES:
        found = banned.findall(source.read_text())
        assert not found, f"{source.name} uses {sorted(set(found))}"
    # Only files of the package's own directory are ever opened as libraries.
    library = (_cpu_library.PACKAGE_DIR / "library.py").read_text()
    assert re.findall(r"ctypes\.CDLL\(([^\n]*)\)$", library, re.MULTILINE) == ["str(path)"]
    # And at run time: no child process of any kind on the first calls.
    guard = (
        "import os, subprocess\n"
        "def refuse(*args, **kwargs):\n"
        "    raise AssertionError('a process was started')\n"
        "subprocess.Popen.__init__ = refuse\n"
        "for name in ('fork', 'forkpty', 'posix_spawn', 'posix_spawnp', 'system', 'execv',\n"
        "             'execve', 'execvp'):\n"
        "    if hasattr(os, name):\n"
        "        setattr(os, name, refuse)\n"
    )
    expected = "none" if not any(shutil.which(c) for c in ("c++", "g++")) else None
    expected = expected or _best_variant().strip()
    _run(guard + _LOAD_CHECK, expected, "0" if expected != "none" else "1")


def test_a_package_without_kernels_falls_back_with_one_warning(tmp_path):
    message = _run(_LOAD_CHECK, "none", "1", package_dir=tmp_path)
    assert "built without a C++ compiler" in message


def _private_copy(tmp_path, variant, corrupt=None):
    folder = tmp_path / "package"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    for name in ("_cpu_features.so", f"_cpu_kernels_{variant}.so", "_cpu_kernels.sha256"):
        shutil.copy(_cpu_library.PACKAGE_DIR / name, folder / name)
        (folder / name).chmod(0o755)
    if corrupt is not None:
        target = folder / f"_cpu_kernels_{variant}.so"
        data = target.read_bytes()
        target.write_bytes(corrupt(data))
    return folder


@needs_kernels
@pytest.mark.parametrize(
    "corrupt",
    [lambda data: data[: len(data) // 3], lambda data: b"\0" * 4096, lambda data: b""],
    ids=["truncated", "zeros", "empty"],
)
def test_a_corrupt_library_falls_back_without_crashing(tmp_path, corrupt):
    variant = _best_variant().strip()
    folder = _private_copy(tmp_path, variant, corrupt)
    _run(_LOAD_CHECK, "none", "1", package_dir=folder)


@needs_kernels
def test_a_private_copy_loads(tmp_path):
    # The control for the tests around it: the same copy, left private, is loaded.
    variant = _best_variant().strip()
    _run(_LOAD_CHECK, variant, "0", package_dir=_private_copy(tmp_path, variant))


@needs_kernels
@pytest.mark.parametrize(
    "unsafe", ["group-writable folder", "world-writable file", "other owner"]
)
def test_files_another_user_could_write_are_never_loaded(tmp_path, unsafe):
    variant = _best_variant().strip()
    folder = _private_copy(tmp_path, variant)
    library = folder / f"_cpu_kernels_{variant}.so"
    if unsafe == "group-writable folder":
        folder.chmod(0o775)
    elif unsafe == "world-writable file":
        library.chmod(0o757)
    else:
        if os.getuid() != 0:
            pytest.skip("only root can give a file to another user")
        os.chown(library, 65534, 65534)
    # Fails if the library is opened at all, not only if its code runs.
    spy = (
        "import ctypes\n"
        "opened = []\n"
        "class Spy(ctypes.CDLL):\n"
        "    def __init__(self, name, *args, **kwargs):\n"
        "        opened.append(name)\n"
        "        assert not name.endswith(" + repr(library.name) + "), name\n"
        "        super().__init__(name, *args, **kwargs)\n"
        "ctypes.CDLL = Spy\n"
    )
    message = _run(spy + _LOAD_CHECK, "none", "1", package_dir=folder)
    assert "may be written by other users" in message


def test_an_instruction_set_the_cpu_cannot_run_is_refused():
    message = _run(_LOAD_CHECK, "none", "1", STABLELAYERS_CPU_ISA="no-such-isa")
    assert "STABLELAYERS_CPU_ISA" in message


def test_the_kernels_can_be_switched_off_without_a_warning():
    _run(
        _LOAD_CHECK.replace("loaded = _cpu_library.load()", "loaded = None"),
        "none",
        "0",
        STABLELAYERS_CPU_KERNELS="0",
    )


# Every build of the kernels that this CPU can run (AVX-512 code, and the generic vector
# code that AVX2, SSE2 and NEON share), against the pure-JAX path.
_ISA_CHECK = """
import sys
import jax, numpy as np
import stablelayers as sl
from stablelayers._cpu import library as _cpu_library
assert _cpu_library.available() and _cpu_library.load() == sys.argv[1]
inputs = dict(np.load(sys.argv[2]))
for name, op in {'softmax': sl.softmax, 'log_softmax': sl.log_softmax,
                 'softplus': sl.softplus}.items():
    for key, x in inputs.items():
        if (key == 'softplus') != (name == 'softplus'):
            continue
        w = np.linspace(-2.0, 2.0, x.size, dtype=np.float32).reshape(x.shape)
        def value_and_vjp(x, w, op=op):
            y, vjp = jax.vjp(op, x)
            return y, vjp(w)[0]
        ours = jax.jit(value_and_vjp)(x, w)
        with sl.pure_jax():
            theirs = jax.jit(value_and_vjp)(x, w)
        for a, b in zip(ours, theirs):
            a, b = np.asarray(a), np.asarray(b)
            message = f'{name} on {key}'
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=message)
            np.testing.assert_allclose(a, b, rtol=3e-6, atol=2e-6, err_msg=message)
"""


@functools.cache
def _variants_this_cpu_runs():
    try:
        return _best_variant_list()
    except AssertionError:
        return []


def _best_variant_list():
    code = (
        "from stablelayers._cpu import library as _cpu_library\n"
        "probe = _cpu_library._open(_cpu_library.PACKAGE_DIR / '_cpu_features.so')\n"
        "import ctypes\n"
        "probe.StablelayersCpuKernelVariants.restype = ctypes.c_char_p\n"
        "print(probe.StablelayersCpuKernelVariants().decode())\n"
    )
    return _run(code).strip().split(",")


@needs_kernels
@pytest.mark.parametrize("variant", ["avx512", "avx2", "x86_64", "baseline"])
def test_every_build_this_cpu_runs_matches_the_pure_jax_path(variant, tmp_path):
    if variant not in _variants_this_cpu_runs():
        pytest.skip(f"this CPU does not run the {variant} build")
    inf = np.inf
    edge_rows = np.array(
        [
            [1.0, inf, inf, 2.0],
            [-inf, -inf, -inf, -inf],
            [3.4e38, -3.4e38, 3.4e38, 1.0],
            [100.0, 0.0, -30.0, 99.0],
            [-1e4, -1e4 - 1, -1e4 - 100, -inf],
        ],
        np.float32,
    )
    # 1000 columns: vectors of 16 and a tail of 8.
    scales = np.repeat([1.0, 7.0, 30.0, 300.0], 5)[:, None]
    random_rows = np.random.default_rng(7).normal(size=(20, 1000)) * scales
    softplus = np.concatenate(
        [[inf, -inf, 0.0, 1e-30, 88.0, -88.0, -104.0, 1e30], np.linspace(-30, 30, 997)]
    )
    inputs = tmp_path / "inputs.npz"
    np.savez(
        inputs,
        edge_rows=edge_rows,
        random_rows=random_rows.astype(np.float32),
        softplus=softplus.astype(np.float32),
    )
    _run(_ISA_CHECK, variant, str(inputs), STABLELAYERS_CPU_ISA=variant)
