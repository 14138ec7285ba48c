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


PACKAGE = pathlib.Path(stablelayers.__file__).parent
PARTS = ("ops", "losses", "attention")


def test_parts_namespaces_reexport_the_top_level_names():
    # Each part's namespace holds its public names, the very objects the package exports,
    # and together they hold all of them but the two switches.
    import importlib

    seen = set()
    for part in PARTS:
        module = importlib.import_module(f"stablelayers.{part}")
        for name in module.__all__:
            assert getattr(module, name) is getattr(stablelayers, name), (part, name)
        seen |= set(module.__all__)
    assert seen == set(stablelayers.__all__) - {"forward_mode", "pure_jax"}


def test_layout_each_part_in_its_folder_and_small_modules():
    # The layout CONTRIBUTING.md describes: attention and the losses in subpackages, few
    # modules loose in the root, none over 400 lines.
    for part in (*PARTS, "_core", "_cpu"):
        assert (PACKAGE / part / "__init__.py").is_file(), part
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= 10, loose
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long


def test_core_imports_no_op_loss_or_framework():
    # _core is the bottom layer: nothing in it imports an op, a loss, attention or a
    # framework, so every part can build on it without a cycle.
    forbidden = ("stablelayers.ops", "stablelayers.losses", "stablelayers.attention")
    forbidden += ("flax", "equinox", "stablelayers.nnx", "stablelayers.linen")
    for path in (PACKAGE / "_core").glob("*.py"):
        text = path.read_text()
        for name in forbidden:
            assert f"from {name}" not in text and f"import {name}" not in text, (path, name)
