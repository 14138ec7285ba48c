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


# The longest pages (25 to 43 s each) run under `-m slow`, for CI's 20 minutes.
SLOW_PAGES = {"frameworks.md", "migration.md", "semantics.md"}


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(page, marks=pytest.mark.slow) if page.name in SLOW_PAGES else page
        for page in PAGES
    ],
    ids=[page.name for page in PAGES],
)
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


def _extra_javascript() -> list[str]:
    # mkdocs.yml's extra_javascript list, read as text: the tests' environment has no YAML
    # parser (PyYAML comes with the docs extra only).
    text = (DOCS.parent / "mkdocs.yml").read_text(encoding="utf-8")
    block = re.search(r"^extra_javascript:\n((?:[ \t]+.*\n|[ \t]*\n)*)", text, re.MULTILINE)
    assert block, "mkdocs.yml has no extra_javascript"
    items = re.findall(r"^[ \t]+-[ \t]+(\S+)", block.group(1), re.MULTILINE)
    return [item.strip("'\"") for item in items]


def test_docs_math_renders_offline() -> None:
    # Issue 21: the site loaded MathJax from a CDN, so math showed as raw TeX offline. Every
    # script is a file in docs/, MathJax among them, with the fonts its CHTML output loads
    # (MathJax looks for them beside the script, [mathjax]/output/chtml/fonts/woff-v2).
    scripts = _extra_javascript()
    remote = [s for s in scripts if re.match(r"(?i)^([a-z][a-z0-9+.-]*:)?//", s)]
    assert not remote, f"scripts from the network: {remote}"
    missing = [s for s in scripts if not (DOCS / s).is_file()]
    assert not missing, f"scripts not in docs/: {missing}"
    mathjax = [DOCS / s for s in scripts if re.search(r"(^|/)tex-[\w-]*\.js$", s)]
    assert mathjax, f"no MathJax TeX component among {scripts}"
    source = mathjax[0].read_text(encoding="utf-8")
    fonts_dir = mathjax[0].parent / "output" / "chtml" / "fonts" / "woff-v2"
    fonts = sorted(set(re.findall(r"MathJax_[\w-]+\.woff", source)))
    assert fonts, "no CHTML fonts named in the MathJax script"
    absent = [f for f in fonts if not (fonts_dir / f).is_file()]
    assert not absent, f"fonts the script loads, not shipped: {absent}"
    config = (DOCS / "javascripts" / "mathjax.js").read_text(encoding="utf-8")
    assert not re.search(r"(?i)https?://", config), "the MathJax config points at a URL"


def test_built_site_loads_only_local_scripts(tmp_path: pathlib.Path) -> None:
    # The built pages as a browser gets them: every <script src> is a file of the site, and
    # the maths pages load the shipped MathJax. CI's .ci/docs builds the site too; this runs
    # where the docs extra is installed (a few seconds).
    pytest.importorskip("mkdocs")
    import os
    import subprocess

    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "--site-dir", str(site)],
        cwd=DOCS.parent,
        env=env,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    remote: list[str] = []
    missing: list[str] = []
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        for src in re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", html):
            if re.match(r"(?i)^([a-z][a-z0-9+.-]*:)?//", src):
                remote.append(f"{page.relative_to(site)}: {src}")
                continue
            # 404.html is served from any depth, so its paths are from the site's root.
            base = site if src.startswith("/") else page.parent
            if not (base / src.split("?")[0].lstrip("/")).resolve().is_file():
                missing.append(f"{page.relative_to(site)}: {src}")
    assert not remote, f"scripts from the network: {remote}"
    assert not missing, f"scripts not in the site: {missing}"
    math = (site / "math" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in math
    assert '<script src="../javascripts/mathjax/tex-chtml-full.js"' in math
