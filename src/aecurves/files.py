"""Files written atomically (a temporary beside the target, renamed over it only when complete), alone or as a
set (write_all), and JSON read back tolerantly. No torch import: the data cache and the report use these too."""

import contextlib
import errno
import hashlib
import json
import math
import os
import stat
import uuid
from pathlib import Path

import numpy as np


def new_temp_file(folder: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> Path:
    """A new empty file in `folder` (same file system, so os.replace is atomic), with the permissions open()
    would give it under the process umask."""
    path = Path(folder) / f".{prefix}.{uuid.uuid4().hex[:12]}{suffix}"
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside `path`; renames it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path.parent, path.name, ".tmp" + path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        # e.g. a full disk met by a writer given a file object: the message must say where
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_all(writers: dict) -> None:
    """Writes a set of files that belong together, {path: write}: each write(temporary) fills a temporary beside
    its path, and only when every one of them has succeeded are they renamed into place, in the order given (so
    the last, e.g. the JSON record that readers look for, appears only with the rest). A failure while writing
    removes every temporary and leaves every previous file whole."""
    with contextlib.ExitStack() as stack:
        # entered last to first: the stack leaves them in reverse, so the renames follow the order given
        temporaries = {path: stack.enter_context(atomic_path(path)) for path in reversed(list(writers))}
        for path, write in writers.items():
            write(temporaries[path])


def save_npz(path: str | os.PathLike, arrays: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append .npz to the name
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def write_json(path: str | os.PathLike, obj) -> None:
    """Standard JSON: a non-finite float (NaN, inf), which json.dumps would write as a bare token no other reader
    accepts, is written as null."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n")


def finite_or_none(obj):
    """`obj` with every non-finite float replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def read_json(path: str | os.PathLike):
    """The parsed file, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def append_jsonl(path: str | os.PathLike, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list:
    """The rows of a JSON-lines file ([] when it is missing or damaged)."""
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(folder: str | os.PathLike) -> None:
    """Creates `folder` and a file in it (removed at once): a read-only, forbidden or full place fails here with
    the OSError the CLI explains, before hours of work rather than after."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    new_temp_file(folder, "write-check").unlink()


LOCK_NAME = ".aecurves.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run"):
    """One writer per output folder: an exclusive flock on FOLDER/.aecurves.lock for the duration of the block.

    A second process is refused with the holder's PID. The OS releases the lock when its holder dies, so a lock
    file left by a killed process is simply taken over. The lock is opened without following a symbolic link and
    must be a plain file of its own (one link): writing the PID into it can then never change another file.
    (Where fcntl is missing, e.g. Windows, there is no lock.)
    """
    from aecurves.errors import UserError

    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    refusal = (f"The lock file {lock} is {{}}, not the plain file aecurves makes; it was not written to. Remove "
               "it (it holds only a process ID) and run again; nothing was changed.")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(refusal.format("a symbolic link")) from None
        if exc.errno == errno.EISDIR:
            raise UserError(refusal.format("a folder")) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise UserError(refusal.format("a hard link to another file" if stat.S_ISREG(info.st_mode)
                                           else "not a regular file"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"Another aecurves process (PID {holder}) is writing the {what} in {folder}. Wait for it "
                            "to finish, or choose another --out folder; nothing was changed.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
