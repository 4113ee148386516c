"""User-facing errors: the CLI prints the message (no traceback) and exits with code 2."""

import sys
from pathlib import Path


class UserError(Exception):
    """Something the user can fix: a missing file, a wrong folder, a bad flag value."""


def call_guarded(fn, model: str | None, what: str):
    """fn(), where a SystemExit, GeneratorExit or other BaseException that is not an error class (KeyboardInterrupt
    aside, which keeps its meaning) becomes a UserError naming it. Such an exception from a --model's code (its
    forward calling sys.exit(0)) would otherwise end the process quietly, with exit status 0, the work unfinished.
    `model`: the --model spec when it is not the built-in model; `what`: the work, e.g. "aecurves train"."""
    try:
        return fn()
    except (KeyboardInterrupt, Exception):
        raise
    except BaseException as exc:
        raise UserError(quiet_exit_message(exc, model, what)) from None


def quiet_exit_message(exc: BaseException, model: str | None, what: str) -> str:
    """What raised `exc`, where (the innermost frame in the model's module, or outside aecurves) and while doing
    what."""
    if isinstance(exc, SystemExit):
        raised = f"called sys.exit({'' if exc.code is None else repr(exc.code)})"
    else:
        raised = f"raised {type(exc).__name__}" + (f" ({exc})" if str(exc) else "")
    where = _raised_at(exc.__traceback__, _module_file(model) if model else None)
    who = f"--model {model}" if model else "code outside aecurves"
    return (f"{who} {raised}{where} while {what} was running: a model (its factory, its forward) must raise an "
            "exception to fail, not exit. The command stopped unfinished; what it wrote before is intact.")


def _module_file(spec: str) -> str | None:
    """The file of a --model's module: FILE.py, or the imported module's file."""
    where = spec.rpartition(":")[0]
    if where.endswith(".py"):
        return str(Path(where).expanduser().resolve())
    file = getattr(sys.modules.get(where), "__file__", None)
    return str(Path(file).resolve()) if file else None


def _raised_at(tb, file: str | None) -> str:
    """The innermost frame of a traceback in `file` (the model's module; without it, outside aecurves' own code),
    as " in NAME (FILE, line N)", or "" (e.g. a traceback that ends in a worker process)."""
    own = str(Path(__file__).resolve().parent) + "/"
    found = ""
    while tb is not None:
        code = tb.tb_frame.f_code
        path = str(Path(code.co_filename).resolve())
        if (path == file) if file else not path.startswith(own):
            found = f" in {code.co_name} ({code.co_filename}, line {tb.tb_lineno})"
        tb = tb.tb_next
    return found
