"""The architecture rule, read from the source with ast: the library never imports a command, commands import
the library (the study also runs the commands it is made of), and nothing imports cli."""

import ast
from pathlib import Path

import aecurves

PACKAGE = Path(aecurves.__file__).parent
LIBRARY = {"capture", "checkpoint", "config", "console", "curves", "data", "errors", "evaluation", "executors",
           "files", "kl_autoencoder", "losses", "metrics", "models", "plane_geometry", "plots", "renormalize",
           "report", "runtime", "schedules", "ssim", "stats", "symmetry", "training", "records"}
COMMANDS = {"train", "train_curve", "eval_curve", "export_point", "align", "plane", "fge", "ensembles", "study"}
ENTRY = {"cli", "__main__", "__init__"}


def aecurves_imports(path: Path) -> set[str]:
    """Modules of the package imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_module(a.name) for a in node.names if a.name.startswith("aecurves.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in ("aecurves", "aecurves.commands"):
                found |= {a.name for a in node.names}
            elif node.module.startswith("aecurves."):
                found.add(_module(node.module))
    return found - {"__version__"}


def _module(dotted: str) -> str:
    """aecurves.metrics -> metrics; aecurves.commands.train -> train (a command's name is its module's)."""
    parts = dotted.split(".")
    return parts[2] if parts[1] == "commands" and len(parts) > 2 else parts[1]


def _modules() -> dict:
    """{module name: path} of the library (the package's top level) and the commands (aecurves/commands/)."""
    found = {p.stem: p for p in PACKAGE.glob("*.py")}
    found.update({p.stem: p for p in (PACKAGE / "commands").glob("*.py") if p.stem != "__init__"})
    found.update({p.name: p / "__init__.py" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()
                  and p.name != "commands"})
    return found


def test_every_module_is_classified_and_the_commands_live_in_their_package():
    assert set(_modules()) == LIBRARY | COMMANDS | ENTRY
    assert {p.stem for p in (PACKAGE / "commands").glob("*.py")} == COMMANDS | {"__init__"}


def test_library_never_imports_a_command_and_nothing_imports_cli():
    imports = {name: aecurves_imports(path) for name, path in _modules().items()}
    for module in LIBRARY:
        assert imports[module] <= LIBRARY, (module, imports[module] - LIBRARY)
    for module in COMMANDS - {"study"}:
        assert imports[module] <= LIBRARY, (module, imports[module] - LIBRARY)
    assert imports["study"] <= LIBRARY | COMMANDS - {"study"}
    assert [m for m, found in imports.items() if "cli" in found and m != "__main__"] == []


def test_the_rule_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from aecurves.commands import train\n    import aecurves.commands.eval_curve\n"
                      "from aecurves.metrics import evaluate\nfrom aecurves.commands.plane import run\n")
    assert aecurves_imports(source) == {"train", "eval_curve", "metrics", "plane"}
