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
