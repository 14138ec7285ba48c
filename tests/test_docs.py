"""Run every ```python block in docs/*.md, page by page.

The blocks of one page run in order in one namespace, so a page may build on its earlier
blocks. A block preceded by a ``<!-- skip-test -->`` line is not run. Pages that import
Flax or Equinox are skipped when that framework is not installed.
"""

from __future__ import annotations

import pathlib
import re
import sys
import types

import jax
import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
SKIP_MARKER = "<!-- skip-test -->"
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_FRAMEWORKS = {name: re.compile(rf"\b{name}\b") for name in ("flax", "equinox", "optax")}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The (line number, code) of each ```python block not preceded by the skip marker."""
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.strip() == SKIP_MARKER:
            continue
        line = text.count("\n", 0, match.start()) + 2
        blocks.append((line, match.group(1)))
    return blocks


PAGES = sorted(DOCS.glob("*.md"))


def test_pages_found() -> None:
    assert any(python_blocks(page.read_text()) for page in PAGES), "no python blocks in docs/"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_page_code_runs(page: pathlib.Path) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip("no python blocks")
    code = "\n".join(code for _, code in blocks)
    for module, pattern in _FRAMEWORKS.items():
        if any(
            line.lstrip().startswith(("import ", "from ")) and pattern.search(line)
            for line in code.splitlines()
        ):
            pytest.importorskip(module)
    # A real module, so that classes a page defines (dataclasses, Flax modules) can find
    # it in sys.modules.
    module = types.ModuleType(f"docs_{page.stem}")
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    # The pages are user code, run with JAX's default settings (the suite's own code runs
    # with rank promotion "raise", conftest.py).
    with jax.numpy_rank_promotion("allow"):
        for line, source in blocks:
            # Pad so tracebacks point at the page's own line numbers.
            exec(compile("\n" * (line - 1) + source, str(page), "exec"), namespace)


def test_skip_marker() -> None:
    text = "a\n```python\nx = 1\n```\n<!-- skip-test -->\n```python\nraise RuntimeError\n```\n"
    assert [code for _, code in python_blocks(text)] == ["x = 1\n"]


def test_readme_api_list_and_frameworks_table_name_every_public_name():
    # Each public name of the package and of every framework module, in README's API list
    # and (for the layers) in docs/frameworks.md's table: neither can drift again.
    import importlib

    import stablelayers

    root = pathlib.Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    api = readme[readme.index("## API") :]
    missing = [name for name in stablelayers.__all__ if f"`{name}(" not in api]
    table = (root / "docs" / "frameworks.md").read_text()
    for framework in ("nnx", "linen", "equinox"):
        module = importlib.import_module(f"stablelayers.{framework}")
        missing += [f"{framework}.{n}" for n in module.__all__ if f"`{n}" not in api]
        missing += [f"table: {n}" for n in module.__all__ if f"| `{n}(" not in table]
    assert not missing, f"not named: {missing}"
