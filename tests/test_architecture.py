"""The layering of ARCHITECTURE.md, checked on every import statement of the package (TYPE_CHECKING and
function-level imports included): nothing imports a layer above its own, evaluation never imports
training, and no two modules import each other, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rledit"

LAYERS = [  # bottom to top: a module may import its own layer and the layers below
    ("foundation", ("rledit.errors", "rledit.atomic_write", "rledit.paths", "rledit.runtime", "rledit.threads",
                    "rledit.heap", "rledit.environment")),
    ("data", ("rledit.data",)),
    ("models and kernels", ("rledit.models", "rledit.kernels")),
    ("editing", ("rledit.editing",)),
    ("editors", ("rledit.editors",)),
    ("session", ("rledit.session",)),
    ("pipeline", ("rledit.pipeline",)),
    ("evaluation and training", ("rledit.evaluation", "rledit.training")),
    ("entry points", ("rledit.api", "rledit.cli", "rledit")),
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of ARCHITECTURE.md"
    return max(matches)[1]


def module_imports() -> dict[str, set[str]]:
    imports = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        imports[module] = {name for name in found if name == "rledit" or name.startswith("rledit.")}
    return imports


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})"
              for module, imported_set in module_imports().items() for imported in imported_set
              if layer_of(imported) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_evaluation_never_imports_training():
    imports = module_imports()
    wrong = [(m, i) for m, found in imports.items() if m.startswith("rledit.evaluation")
             for i in found if i.startswith("rledit.training")]
    assert not wrong


def test_no_import_cycles():
    imports = module_imports()
    known = set(imports)

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in imports.get(todo.pop(), ()):
                if nxt in known and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in imports if m != "rledit" and m in reachable(m))
    assert not cycles, f"modules on an import cycle: {cycles}"
