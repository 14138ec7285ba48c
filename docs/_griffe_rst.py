"""Griffe extension: render the docstrings' reStructuredText bits as Markdown.

The docstrings are written for ``help()`` and Sphinx habits: ``.. math::`` blocks,
``:func:`name``` roles and ``Example::`` literal blocks. mkdocstrings renders Markdown, so
this rewrites them when the package is loaded: maths to ``$$ ... $$`` (arithmatex), roles
naming a stablelayers object to cross-references and any other role to inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`~?([\w.]+)`")
_MATH = re.compile(r"^([ \t]*)\.\. math::[ \t]*\n((?:\1[ \t]+\S.*\n|[ \t]*\n)+)", re.MULTILINE)
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)


def _math(match: re.Match[str]) -> str:
    indent, body = match.group(1), match.group(2).rstrip()
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    return f"{indent}$$\n" + "".join(f"{indent}{line}\n" for line in lines) + f"{indent}$$\n\n"


class RstToMarkdown(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg, pkg)

    def _visit(self, obj: griffe.Object, pkg: griffe.Module) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj.docstring.value, obj, pkg)
        for member in obj.members.values():
            if not member.is_alias and member.parent is obj:
                self._visit(member, pkg)

    def _rewrite(self, text: str, obj: griffe.Object, pkg: griffe.Module) -> str:
        text = _MATH.sub(_math, text + "\n").rstrip("\n")
        text = _LITERAL.sub(r"\1:", text)
        return _ROLE.sub(lambda m: self._role(m.group(1), obj, pkg), text)

    def _role(self, name: str, obj: griffe.Object, pkg: griffe.Module) -> str:
        module = obj if obj.is_module else obj.module
        for candidate in (name, f"{pkg.path}.{name}", f"{module.path}.{name}"):
            if candidate.split(".")[0] != pkg.path:
                continue
            try:
                target = pkg[candidate.split(".", 1)[1]] if "." in candidate else pkg
            except KeyError:
                continue
            if target.is_alias or not target.name.startswith("_"):
                return f"[`{name}`][{candidate}]"
        return f"`{name}`"
