"""Files written atomically (a temporary beside the target, renamed over it only when complete), alone or as a
set (write_all), and JSON read back tolerantly. No torch import: the data cache and the report use these too."""

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
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
def atomic_path(path: str | os.PathLike, exclusive: bool = False):
    """Yields a temporary path beside `path`; renames it over `path` only if the block succeeds. `exclusive`: the
    finished file is linked into place only if nothing is at `path` then (FileExistsError otherwise), so of two
    runs writing one path at once, exactly one succeeds and the other's file is never replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path.parent, path.name, ".tmp" + path.suffix)
    try:
        yield tmp
        if exclusive:
            os.link(tmp, path)  # atomic, and fails when `path` exists (a link to anything included)
        else:
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
    with open_append(path) as f:
        f.write(json.dumps(obj) + "\n")


def open_append(path: str | os.PathLike):
    """`path` opened for appending text (created if missing) without following a link: a symbolic link, a hard
    link to another file or anything but a plain file is refused (UserError) and left unchanged, so an append can
    never change a file outside the folder it is in."""
    from aecurves.errors import UserError

    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR):
            raise UserError(not_plain(path, "a symbolic link" if exc.errno == errno.ELOOP else "a folder")) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise UserError(not_plain(path, "a hard link to another file" if stat.S_ISREG(info.st_mode)
                                  else "not a regular file"))
    return os.fdopen(fd, "a")


def not_plain(path: Path, what: str) -> str:
    return (f"{path} is {what}, not the plain file aecurves writes there; it was not written to. aecurves writes "
            "through no link, so that a folder someone sent cannot point its writes at files elsewhere. Remove it "
            "and run again; nothing was changed.")


# ----------------------------------------------------------------------------------------------------------
# folders someone sent: aecurves reads and writes only inside them, and follows no link there


LINK_RULE = ("aecurves follows no link inside an output folder when it writes, clears or reads results, so that a "
             "folder someone sent cannot point it at files elsewhere (docs/reliability.md#folders-someone-sent)")


def links_in(root: str | os.PathLike, limit: int = 5, allow=None) -> list[Path]:
    """Up to `limit` symbolic links inside `root` (the folder itself may be one: the user named it), found without
    following any, except those `allow(link)` accepts. Hard links to folders cannot exist; hard-linked files are
    harmless to atomic writes (a rename replaces the name, not the file) and refused where aecurves appends
    (open_append)."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            p = Path(folder) / name
            if p.is_symlink() and not (allow and allow(p)):
                found.append(p)
                if len(found) >= limit:
                    return found
    return found


def refuse_links(root: str | os.PathLike, what: str, allow=None) -> None:
    """UserError naming the symbolic links inside `root` (a study folder, a run folder), before anything is read
    from or written to it; `allow(link)`: links that are known not to be followed."""
    from aecurves.errors import UserError

    found = links_in(root, allow=allow)
    if found:
        shown = "\n".join(f"  {p} -> {os.readlink(p)}" for p in found)
        raise UserError(f"The {what} {root} holds symbolic links:\n{shown}\n{LINK_RULE}. Replace each link by the "
                        "files it points to (cp -rL), or start in a new folder; nothing was changed.")


def refuse_study_links(root: str | os.PathLike) -> None:
    """refuse_links for a study folder, where submitit leaves one link of its own per Slurm job (submitit_link)."""
    refuse_links(root, "study folder", allow=lambda p: submitit_link(root, p))


def submitit_link(root: str | os.PathLike, link: Path) -> bool:
    """Whether `link` is the one submitit makes where sbatch ran a job's script: STUDY/slurm/RUN/
    .submission_file_UUID.sh -> STUDY/slurm/RUN/JOB/JOB_submission.sh, pointing into its own run folder (the same
    place: a copied or moved study folder's points elsewhere, and is refused). aecurves never reads through it."""
    parts = Path(os.path.relpath(link, root)).parts
    if len(parts) != 3 or parts[0] != "slurm" or not parts[2].startswith(".submission_file_") \
            or not parts[2].endswith(".sh"):
        return False
    run = Path(os.path.realpath(link.parent))  # the study may have been named through a link, then or now
    target = Path(os.path.realpath(os.path.join(link.parent, os.readlink(link))))
    return target.parent.parent == run and \
        target.name == f"{target.parent.name}_submission.sh"


def check_no_link(root: str | os.PathLike, path: str | os.PathLike) -> None:
    """UserError when `path` is not inside `root`, or when any part of it below `root` that exists is a symbolic
    link (`root` itself may be one: the user named it)."""
    from aecurves.errors import UserError

    root, path = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    if path != root and root not in path.parents:
        raise UserError(f"{path} is outside the folder {root}; aecurves writes only inside it. Nothing was changed.")
    for part in [path, *path.parents]:
        if part == root:
            return
        if part.is_symlink():
            raise UserError(f"{part} is a symbolic link (to {os.readlink(part)}). {LINK_RULE}. Replace the link by "
                            "the files it points to (cp -rL), or remove it; nothing was changed.")


def clear_folder(root: str | os.PathLike, folder: str | os.PathLike, keep: tuple = ()) -> None:
    """Removes everything inside `folder` (inside `root`) except the names in `keep`, following no link: a link
    inside is removed as a link (its target is untouched), and a `folder` that is a link, or lies below one, is
    refused (check_no_link) before anything is removed."""
    check_no_link(root, folder)
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)  # follows no link inside (and refuses one at the top)
        else:
            p.unlink()


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
