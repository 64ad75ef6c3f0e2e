"""The core knows no architecture: a walk over the imports of every module under ``shared/``.

Function bodies are walked too, since imports placed inside functions are where layering
violations hide. Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "test_time_registers"
SHARED = Path(__file__).resolve().parent.parent / "shared"
MODEL_FOLDERS_AND_SCRIPTS = tuple(f"{PACKAGE}.{name}" for name in ("clip", "deit", "dinov2", "scripts"))
MODEL_LIBRARIES = ("timm", "open_clip", "transformers")
#: The wings build on the core; the core (the package's own modules) never imports them. The
#: package's ``__init__`` is its public face and re-exports from every part.
WINGS = tuple(f"{PACKAGE}.{name}" for name in ("analysis", "training"))


def module_name(path: Path) -> str:
    parts = path.relative_to(SHARED).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join((PACKAGE, *parts))


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SHARED.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, known: dict[str, Path], name: str | None = None):
    """``(imported module, line, at module level)`` for every import that runs, function bodies included."""
    name = name or module_name(path)
    package = name if is_package(path) else name.rpartition(".")[0]
    found = []

    def visit(node, top_level: bool):
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child, top_level)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, top_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:   # `from . import distributed` imports a module
                candidate = f"{source}.{alias.name}"
                found.append((candidate if candidate in known else source, node.lineno, top_level))
        inner = top_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    for statement in ast.parse(path.read_text(), str(path)).body:
        visit(statement, True)
    return found


def layering_problems(name: str, path: Path, known: dict[str, Path]) -> list[str]:
    problems = []
    for imported, line, top_level in imports(path, known, name):
        where = f"{name}:{line}"
        if imported.startswith(MODEL_FOLDERS_AND_SCRIPTS):
            problems.append(f"{where} imports {imported}")
        if top_level and imported.split(".")[0] in MODEL_LIBRARIES:
            problems.append(f"{where} imports {imported} at module level")
        if not name.startswith(WINGS) and not is_package(path) and imported.startswith(WINGS):
            problems.append(f"{where}: the core imports the wing {imported}")
    return problems


def test_no_module_under_shared_imports_a_model_folder_scripts_or_a_model_library_at_module_level():
    known = modules()
    assert list(dict.fromkeys(problem for name, path in known.items() for problem in layering_problems(name, path, known))) == []


def test_there_is_no_import_circle_under_shared():
    known = modules()
    graph = {name: sorted({imported for imported, _, _ in imports(path, known) if imported in known and
                           imported != name and not (is_package(path) and imported.startswith(name + "."))})
             for name, path in known.items()}
    # The package's __init__ re-exports from its modules, which then import each other, never it.
    graph = {name: [target for target in targets if target not in known or not is_package(known[target])
                    or target != PACKAGE] for name, targets in graph.items()}
    cycles, state = [], {}

    def walk(node, trail):
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                walk(target, trail + [target])
        state[node] = "done"

    for name in graph:
        if name not in state:
            walk(name, [name])
    assert cycles == []


def test_the_layering_check_sees_imports_inside_functions(tmp_path):
    """The walk is not fooled: a function-level import of a model folder and a module-level timm import are found."""
    sample = tmp_path / "sample.py"
    sample.write_text("from typing import TYPE_CHECKING\nimport timm\nif TYPE_CHECKING:\n    import open_clip\n\n"
                      "def load():\n    from .deit import loader\n    return loader\n")
    assert layering_problems(f"{PACKAGE}.sample", sample, modules()) == [
        f"{PACKAGE}.sample:2 imports timm at module level", f"{PACKAGE}.sample:7 imports {PACKAGE}.deit"]


def test_importing_the_package_imports_no_model_library():
    code = ("import test_time_registers, sys; "
            "print(sorted(m for m in ('timm', 'open_clip', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
