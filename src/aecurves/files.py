"""Files written atomically (a temporary beside the target, renamed over it only when complete) and JSON read
back tolerantly. No torch import: the data cache and the report use these too."""

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path


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
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


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
    file left by a killed process is simply taken over. (Where fcntl is missing, e.g. Windows, there is no lock.)
    """
    from aecurves.errors import UserError

    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
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
