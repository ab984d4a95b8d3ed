"""The package's import layers, read from the source (function-level imports included): each module imports only
from lower levels or from its own package, so the layers stay one-way and free of circles."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mobilevlm"

# Bottom first. An entry is a top-level module or a subpackage with all its modules; an entry imports only from
# entries on lower levels (not from others on its own level). Within core, constants and errors are the leaves
# that the other core modules share.
LEVELS = [
    ["constants", "errors"],
    ["config", "conversation", "tokenizer", "processing"],
    ["model"],
    ["generation", "testing"],
    ["fast"],
    ["eval", "export", "chat"],
    ["train"],
    ["serve"],
    ["demo"],
    ["cli"],
]
# Modules that exist to offer other import paths (the package root's public names, the original MobileVLM's module
# paths): each may import from any level below demo, and nothing below demo may import it.
FACADES = {"mobilevlm", "mobilevlm.utils", "mobilevlm.model.mobilellama", "mobilevlm.model.vision_encoder",
           "mobilevlm.model.vision_projector"}
FACADE_LEVEL = next(i for i, level in enumerate(LEVELS) if "demo" in level) - 0.5


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def level_of(module: str) -> float:
    if module in FACADES:
        return FACADE_LEVEL
    entry = module.split(".")[1]
    for i, level in enumerate(LEVELS):
        if entry in level:
            return i
    raise AssertionError(f"{module}: its place is not in LEVELS (tests/test_import_layers.py); add it there")


def entry_of(module: str) -> str:
    return module if module in FACADES else ".".join(module.split(".")[:2])


def imported_modules(module: str, path: Path):
    """(line, module) for every import of a mobilevlm module, wherever it stands in the file; an imported name
    that is not a module counts as an import of the module that defines it."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            if name == "mobilevlm" or name.startswith("mobilevlm."):
                yield node.lineno, name


def test_every_module_sits_on_a_level():
    for module in MODULES:
        if module != "mobilevlm":
            level_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_levels(module):
    path = MODULES[module]
    wrong = []
    for line, target in imported_modules(module, path):
        if module in FACADES:
            allowed = level_of(target) < FACADE_LEVEL
        else:  # its own package's modules, or a lower level
            allowed = entry_of(target) == entry_of(module) or level_of(target) < level_of(module)
        if not allowed:
            wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "imports up or across the layers:\n" + "\n".join(dict.fromkeys(wrong))
