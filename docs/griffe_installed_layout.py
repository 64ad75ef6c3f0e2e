"""A Griffe extension for this site's API reference: the package as it is installed.

``test_time_registers`` is built from several top-level folders (``shared/`` is the package,
``clip/``, ``dinov2/``, ``deit/`` and ``scripts/`` its subpackages; see ``pyproject.toml``). Griffe
finds the package itself, but looks for subpackages only inside its folder. This extension asks
the import system where each subpackage named in the configuration is installed (an editable
install or a wheel; nothing is imported but the package's own lazy ``__init__``) and adds the
ones Griffe did not find, so that ``::: test_time_registers.clip`` works.

It also reads the docstrings' reStructuredText habits as Markdown: Sphinx roles
(``:class:`X```, ``:func:`~a.b```) become plain code spans, a paragraph's closing ``::`` one colon,
and token layouts written as brackets (``[CLS][patches]``, which Markdown would take for a
reference link) code spans.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`~?([^`]+)`")
_CODE_SPAN = re.compile(r"(``[^`]+``|`[^`]+`)")
_BRACKETS = re.compile(r"(?:\[[^\][`\n]*\]){2,}")


class InstalledSubpackages(griffe.Extension):
    def __init__(self, subpackages: list[str] | None = None) -> None:
        super().__init__()
        self.subpackages = list(subpackages or [])

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        for name in self.subpackages:
            if name in pkg.members:
                continue   # an ordinary install: Griffe found it inside the package's folder
            spec = importlib.util.find_spec(f"{pkg.path}.{name}")
            if spec is None or not spec.submodule_search_locations:
                raise ModuleNotFoundError(f"{pkg.path}.{name} is not installed")
            self._add_package(pkg, name, Path(next(iter(spec.submodule_search_locations))), loader)
        _plain_roles(pkg)

    def _add_package(self, parent: griffe.Module, name: str, folder: Path, loader: griffe.GriffeLoader) -> None:
        module = self._visit(parent, name, folder / "__init__.py", loader)
        for path in sorted(folder.iterdir()):
            if path.suffix == ".py" and path.stem != "__init__":
                self._visit(module, path.stem, path, loader)
            elif path.is_dir() and (path / "__init__.py").is_file():
                self._add_package(module, path.name, path, loader)

    @staticmethod
    def _visit(parent: griffe.Module, name: str, path: Path, loader: griffe.GriffeLoader) -> griffe.Module:
        code = path.read_text(encoding="utf-8-sig")
        loader.lines_collection[path] = code.splitlines(keepends=False)
        module = griffe.visit(name, filepath=path, code=code, extensions=loader.extensions, parent=parent,
                              docstring_parser=loader.docstring_parser, docstring_options=loader.docstring_options,
                              lines_collection=loader.lines_collection, modules_collection=loader.modules_collection)
        parent.set_member(name, module)
        return module


def _as_markdown(text: str) -> str:
    lines = []
    for line in _ROLE.sub(r"`\1`", text).split("\n"):
        if not line.startswith("    "):   # indented lines may be literal blocks, shown as they are
            parts = _CODE_SPAN.split(line)
            parts[::2] = [_BRACKETS.sub(lambda match: f"`{match.group(0)}`", part) for part in parts[::2]]
            line = "".join(parts)
            if line.endswith("::") and not line.endswith(" ::"):
                line = line[:-1]
        lines.append(line)
    return "\n".join(lines)


def _plain_roles(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = _as_markdown(obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _plain_roles(member)
