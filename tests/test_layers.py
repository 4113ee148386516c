"""The architecture rule, read from the source with ast: the library never imports a command, commands import
the library (the study also runs the commands it is made of), and nothing imports cli."""

import ast
from pathlib import Path

import aecurves

PACKAGE = Path(aecurves.__file__).parent
LIBRARY = {"checkpoint", "config", "console", "curves", "data", "errors", "executors", "files", "losses", "metrics",
           "models", "planes", "plots", "renormalize", "runtime", "schedules", "stats", "symmetry", "training"}
COMMANDS = {"train", "train_curve", "eval_curve", "export_point", "align", "plane", "fge", "ensembles", "report",
            "study"}
ENTRY = {"cli", "__main__", "__init__"}


def aecurves_imports(path: Path) -> set[str]:
    """Modules of the package imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("aecurves.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "aecurves":
                found |= {a.name for a in node.names}
            elif node.module.startswith("aecurves."):
                found.add(node.module.split(".")[1])
    return found - {"__version__"}


def test_every_module_is_classified():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == LIBRARY | COMMANDS | ENTRY


def test_library_never_imports_a_command_and_nothing_imports_cli():
    imports = {p.stem: aecurves_imports(p) for p in PACKAGE.glob("*.py")}
    for module in LIBRARY:
        assert imports[module] <= LIBRARY, (module, imports[module] - LIBRARY)
    for module in COMMANDS - {"study"}:
        assert imports[module] <= LIBRARY, (module, imports[module] - LIBRARY)
    assert imports["study"] <= LIBRARY | COMMANDS - {"study"}
    assert [m for m, found in imports.items() if "cli" in found and m != "__main__"] == []


def test_the_rule_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from aecurves import train\n    import aecurves.eval_curve\n"
                      "from aecurves.metrics import evaluate\n")
    assert aecurves_imports(source) == {"train", "eval_curve", "metrics"}
