"""The architecture rule, read from the source with ast: the library never imports a command, commands import
the library (the study also runs the commands it is made of), and nothing imports cli; and no function in src/ is
longer than MAX_FUNCTION_LINES."""

import ast
from pathlib import Path

import aecurves

PACKAGE = Path(aecurves.__file__).parent
LIBRARY = {"capture", "checkpoint", "config", "console", "curves", "data", "errors", "evaluation", "executors",
           "files", "kl_autoencoder", "losses", "metrics", "models", "plane_geometry", "plots", "renormalize",
           "report", "runtime", "schedules", "ssim", "stats", "symmetry", "training", "records", "wandb_log"}
COMMANDS = {"train", "train_curve", "eval_curve", "export_point", "align", "plane", "fge", "ensembles", "study"}
ENTRY = {"cli", "__main__", "__init__"}


def aecurves_imports(path: Path) -> set[str]:
    """Modules of the package imported anywhere in the file (top level or inside functions)."""
    found = set()
    paths = [path] if path.name != "__init__.py" or path.parent.parent.name != "commands" else \
        sorted(path.parent.glob("*.py"))  # a command that is a package (the study): all its modules
    for node in (n for p in paths for n in ast.walk(ast.parse(p.read_text()))):
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
    found.update({p.name: p / "__init__.py" for p in (PACKAGE / "commands").iterdir() if (p / "__init__.py").is_file()})
    found.update({p.name: p / "__init__.py" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()
                  and p.name != "commands"})
    return found


def test_every_module_is_classified_and_the_commands_live_in_their_package():
    assert set(_modules()) == LIBRARY | COMMANDS | ENTRY
    assert {p.stem for p in (PACKAGE / "commands").glob("*.py")} | {"study"} == COMMANDS | {"__init__"}
    assert (PACKAGE / "commands" / "study" / "__init__.py").is_file()  # the study is a package (commands/study/)


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


MAX_FUNCTION_LINES = 90  # a body longer than this reads as several jobs: split it into named helpers


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (N lines)' of every function or method under `root` longer than `limit` lines, its
    decorators and docstring included."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - first + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_src_is_longer_than_the_limit():
    assert long_functions(PACKAGE) == []


def test_the_length_rule_counts_nested_functions_methods_and_decorators(tmp_path):
    body = [f"x{i} = {i}" for i in range(8)]
    source = ["@decorator", "def f():", *("    " + b for b in body), "", "",
              "class C:", "    def g(self):", "        def inner():", *("            " + b for b in body)]
    (tmp_path / "m.py").write_text("\n".join(source) + "\n")
    assert long_functions(tmp_path, limit=9) == ["m.py:2 f (10 lines)", "m.py:14 g (10 lines)"]
    assert long_functions(tmp_path, limit=8) == ["m.py:2 f (10 lines)", "m.py:14 g (10 lines)",
                                                 "m.py:15 inner (9 lines)"]
