"""The import rules of docs/architecture.md hold: every module of the package is parsed with `ast`."""

import ast

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "distributed_train"
BASE = {"config", "errors", "task", "batches", "files", "storage", "__init__", "__version__"}
# layer -> the layers it may import (each may import itself and the base)
ALLOWED = {
    "cli": {"training", "engines", "distributed", "tasks"},
    "__main__": {"cli"},
    "training": {"engines", "distributed"},
    "engines": {"distributed"},
    "distributed": set(),
    "tasks": set(),
    "base": set(),
}


def layer_of(module: str) -> str:
    """`distributed_train.training.trainer` -> `training`; config, errors, task, batches, files -> `base`."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # the package itself (`from distributed_train import __version__`)
    return "base" if parts[1] in BASE else parts[1]


def package_imports():
    """(importing module, imported module, names) for every import of the package, also inside functions."""
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [(node.module, [a.name for a in node.names])]
                # `from distributed_train import distributed` imports the subpackage distributed
                if node.module == "distributed_train":
                    targets = [(f"distributed_train.{a.name}", []) for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            else:
                continue
            for target, names in targets:
                if target == "distributed_train" or target.startswith("distributed_train."):
                    yield module, target, names


def test_the_rules_see_every_layer():
    imports = list(package_imports())
    layers = {layer_of(source) for source, _, _ in imports}
    assert {"cli", "training", "engines", "distributed", "base"} <= layers  # the parser found the package


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for source, target, _ in package_imports():
        src, dst = layer_of(source), layer_of(target)
        allowed = ALLOWED[src] | {src, "base"}
        if dst not in allowed:
            wrong.append(f"{source} imports {target} ({src} -> {dst})")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def test_base_modules_import_no_layer_above():
    above = [f"{s} imports {t}" for s, t, _ in package_imports()
             if layer_of(s) == "base" and layer_of(t) != "base"]
    assert not above, above


def test_no_module_imports_another_modules_private_names():
    private = [f"{source} imports {target}.{name}" for source, target, names in package_imports()
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, "import a public name instead:\n" + "\n".join(private)


@pytest.mark.parametrize("module, expected", [
    ("distributed_train.engines.base", "engines"),
    ("distributed_train.errors", "base"),
    ("distributed_train.__version__", "base"),
    ("distributed_train.cli.launch", "cli"),
])
def test_layer_of_reads_the_folder(module, expected):
    assert layer_of(module) == expected


def test_no_function_is_longer_than_50_lines_and_the_trainer_stays_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 50:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}() has {lines} lines")
    assert not long, "split these into named steps:\n" + "\n".join(long)
    trainer = (PACKAGE / "training" / "trainer.py").read_text().count("\n")
    assert trainer <= 230, f"training/trainer.py has {trainer} lines: move side jobs into components"
