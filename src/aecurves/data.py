"""Image datasets as uint8 tensors, and batches cut from them on the training device.

load_data() returns the train and held-out images as uint8 [N, C, H, W] tensors. Real datasets (celeba,
folder) are decoded once into CACHE/<dataset>-<size>px-<n>-<key>.npy (+ a .json of metadata) and
memory-mapped on later calls. The images are stored in split order, so train and held-out are zero-copy
slices of that memmap. BatchLoader moves such a tensor to the device once and cuts float batches from it.

Split rule: with DIR/list_eval_partition.txt (celeba only) the official partitions are used; otherwise an
image is held out when sha1(name) mapped to [0, 1) is < val_fraction, so an image keeps its split whatever
else is in the folder. Storing images sorted by that hash value makes the held-out set a prefix of the
cache for every val_fraction.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import errno
import hashlib
import io
import json
import math
import os
import pathlib
import shutil
import sys
import threading
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from aecurves import console, runtime
from aecurves.config import DATASETS, DEFAULT_IMAGE_SIZE, MAX_SYNTHETIC, VAL_FRACTION
from aecurves.errors import UserError
from aecurves.files import LOCK_NAME, new_temp_file, write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# The usual 64x64 CelebA crop is a centered 140x140 square of the 178x218 originals. It is expressed as a
# fraction of the width so that downscaled copies give the same faces.
CROP_FRACTION = 140 / 178
# Part of the cache key: bump it whenever decoding changes, so stale caches are never reused.
TRANSFORM_VERSION = "center-crop-140/178-bicubic-v1"
SYNTHETIC_COUNT = 512
LFW_COUNT = 100  # the faces of scikit-image's lfw_subset
_SYNTHETIC_SEED = 20_240_607
_PARTITION_FILE = "list_eval_partition.txt"
_MAX_NAMES_SHOWN = 10
# The images a dataset holds (uint8, N x C x S x S bytes) are bounded before any work, as every --limit and
# --image-size within their own ranges may still multiply to hundreds of GB. Generated and embedded images live in
# memory: at most a quarter of the machine's (generating them holds about twice that at the peak), or of
# FALLBACK_MEMORY where the machine does not say. Decoded images are cached on disk: the cache must fit its free space.
MEMORY_SHARE = 4
FALLBACK_MEMORY = 16 * 2**30


def default_cache_dir() -> pathlib.Path:
    """$AECURVES_CACHE if set, else ~/.cache/aecurves."""
    env = os.environ.get("AECURVES_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "aecurves"


def check_outside_data(path, data_dir, flag: str) -> None:
    """What aecurves writes (runs, caches) must not live inside the image folder: it would be read back as
    training images by the next run."""
    if not data_dir or path is None:
        return
    p, d = pathlib.Path(path).expanduser().resolve(), pathlib.Path(data_dir).expanduser().resolve()
    if p == d or d in p.parents:
        raise UserError(f"{flag} {path} is inside the data folder {data_dir}: what aecurves writes there would be "
                        "read back as training images. Choose a folder outside it; nothing was written.")


@dataclass
class ImageData:
    train: torch.Tensor  # uint8 [N, C, H, W], CPU
    test: torch.Tensor  # uint8 [M, C, H, W], the held-out split
    channels: int
    image_size: int
    source: str  # short human description
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded


# ----------------------------------------------------------------------------------------------------------
# user-facing messages


def _celeba_help(problem: str) -> str:
    return (
        f"{problem} The celeba dataset expects the official layout: DIR/img_align_celeba/000001.jpg, "
        "DIR/img_align_celeba/000002.jpg, ... (any resolution), and optionally DIR/list_eval_partition.txt "
        "for the official train/valid/test split; a zip, DIR/img_align_celeba.zip or --data-dir pointing at "
        "the .zip itself, works too. CelebA's aligned images are available from the official site "
        "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, from the Kaggle mirror "
        '"jessicali9530/celeba-dataset", or via torchvision.datasets.CelebA(root, download=True), which '
        "creates root/celeba/img_align_celeba, so --data-dir root/celeba works."
    )


def _folder_help(problem: str) -> str:
    exts = ", ".join(IMAGE_EXTENSIONS)
    return (
        f"{problem} The folder dataset reads every image below --data-dir, recursively, with one of the "
        f"extensions {exts} (any case); pass --data-dir pointing at a folder that holds such images."
    )


def _name_list(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return shown + (f" ... and {more} more" if more > 0 else "")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# splitting


def _hash_unit(name: str) -> float:
    """Map a name to [0, 1): the split of an image depends on its name alone."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2**64


def _storage_order(names: list[str], partition: dict[str, int] | None) -> list[str]:
    """Order in which images are stored: every split is then a contiguous slice."""
    if partition is None:
        return sorted(names, key=lambda n: (_hash_unit(n), n))
    return sorted(names, key=lambda n: (partition[n], n))


def _read_partition(path: pathlib.Path) -> dict[str, int]:
    """Parse list_eval_partition.txt: lines "000001.jpg 0" (0=train, 1=valid, 2=test); a CSV works too."""
    partition = {}
    for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields or (line_no == 1 and not fields[-1].isdigit()):  # blank line or a CSV header
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise UserError(
                f"{path}, line {line_no}, is not of the form 'NNNNNN.jpg P' with P = 0 (train), 1 (valid) or "
                f"2 (test): {line.strip()!r}. Restore the official list_eval_partition.txt, or remove it to use "
                "a deterministic split keyed on the file names."
            )
        partition[fields[0]] = int(fields[1])
    return partition


def _limit_per_partition(names: list[str], partition: dict[str, int], limit: int, val_fraction: float) -> list[str]:
    """--limit with the official partition: the first `limit` train names and the first
    max(1, round(limit * val_fraction)) names of valid and of test, so no split is left empty."""
    held = max(1, round(limit * val_fraction))
    keep = {0: limit, 1: held, 2: held}
    out = []
    for name in names:
        p = partition[name]
        if keep[p] > 0:
            out.append(name)
            keep[p] -= 1
    return out


def _split(
    dataset: str,
    images: np.ndarray,
    names: list[str],
    partition_counts: list[int] | None,
    val_fraction: float,
    use_test: bool,
    where: str,
    skipped: list[str],
) -> ImageData:
    """Cut images stored in _storage_order into train / held-out (zero-copy slices)."""
    tensor = torch.from_numpy(images)
    n = len(names)
    if partition_counts is None:
        units = [_hash_unit(name) for name in names]  # ascending, by construction of the storage order
        k = bisect.bisect_left(units, val_fraction)
        train, test = tensor[k:], tensor[:k]
        held_name = "held-out"
        how = f"name-hash split, val_fraction={val_fraction:g}"
        if use_test:
            reason = f"no {_PARTITION_FILE}, so " if dataset == "celeba" else ""
            how += f"; {reason}use_test changes nothing"
        direction = "smaller" if len(train) == 0 else "larger"
        fix = f"use more images (a larger --limit, or none) or a {direction} --val-fraction"
    else:
        n0, n1, _ = partition_counts
        train = tensor[:n0]
        test = tensor[n0 + n1 :] if use_test else tensor[n0 : n0 + n1]
        held_name = "test" if use_test else "valid"
        how = _PARTITION_FILE
        fix = (
            f"add the missing images or fix {_PARTITION_FILE} (train 000001-162770, valid 162771-182637, test "
            "182638-202599), or remove it to get a split keyed on the file names"
        )
    if len(train) == 0 or len(test) == 0:
        empty = "train" if len(train) == 0 else held_name
        raise UserError(
            f"The {empty} split of {dataset} {where} is empty ({n} images: {len(train)} train, {len(test)} "
            f"{held_name}; {how}). To fix it, {fix}."
        )
    return ImageData(
        train=train,
        test=test,
        channels=images.shape[1],
        image_size=images.shape[2],
        source=f"{dataset} {where}: {len(train)} train / {len(test)} {held_name} ({how})",
        skipped=skipped,
    )


# ----------------------------------------------------------------------------------------------------------
# listing image files


@dataclass
class _Files:
    """Where a dataset's image files are: a folder, or a zip archive (members maps name -> member)."""

    root: pathlib.Path  # resolved folder or .zip, part of the cache key
    names: list[str]  # sorted; celeba: file names, folder: relative posix paths
    members: dict[str, str] | None = None
    partition_file: pathlib.Path | None = None
    passed_over: list[str] = field(default_factory=list)  # what the listing could not use, and why

    @contextlib.contextmanager
    def opener(self):
        """Yield a thread-safe function name -> something PIL can open."""
        if self.members is None:
            yield lambda name: self.root / name
            return
        lock = threading.Lock()
        with zipfile.ZipFile(self.root) as archive:

            def open_member(name):
                with lock:  # one shared file handle: read under a lock, decode in parallel
                    return io.BytesIO(archive.read(self.members[name]))

            yield open_member


def _files_fingerprint(files: _Files, names: list[str]) -> str:
    """What the images' content is known by without reading them: each file's size and modification time, or
    in a zip each member's size and CRC-32. Part of the cache key, so images replaced under the same names
    are decoded again rather than served from a stale cache."""
    h = hashlib.sha1()
    if files.members is None:
        for name in names:
            st = os.stat(files.root / name)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        with zipfile.ZipFile(files.root) as archive:
            info = {i.filename: i for i in archive.infolist()}
        for name in names:
            i = info[files.members[name]]
            h.update(f"{name}\0{i.file_size}\0{i.CRC}\n".encode())
    return h.hexdigest()


def _sample_digest(images: np.ndarray) -> str:
    """SHA-1 of up to 256 evenly spaced images of the cache: checked on every open, so a cache damaged in place
    (same size, other bytes) is rebuilt instead of trained on, at the cost of reading 256 images."""
    rows = np.unique(np.linspace(0, len(images) - 1, num=min(256, len(images))).round().astype(np.int64))
    return hashlib.sha1(np.ascontiguousarray(images[rows]).tobytes()).hexdigest() if len(images) else ""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _zip_members(path: pathlib.Path) -> dict[str, str]:
    """Images whose parent folder inside the zip is img_align_celeba, keyed by file name."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise UserError(_celeba_help(f"Cannot read the zip archive {path} ({exc}).")) from None
    found = {}
    for member in sorted(members):
        parts = member.split("/")
        if len(parts) >= 2 and parts[-2] == "img_align_celeba" and _is_image(parts[-1]):
            found.setdefault(parts[-1], member)
    if not found:
        raise UserError(_celeba_help(f"The zip archive {path} holds no img_align_celeba/NNNNNN.jpg images."))
    return found


def _list_celeba(data_dir: str | os.PathLike | None) -> _Files:
    if data_dir is None:
        raise UserError(_celeba_help("The celeba dataset needs --data-dir."))
    path = pathlib.Path(data_dir).expanduser().resolve()
    if path.is_file() and path.suffix.lower() == ".zip":
        members = _zip_members(path)
        partition = path.parent / _PARTITION_FILE
        return _Files(path, sorted(members), members, partition if partition.is_file() else None)
    if not path.is_dir():
        what = "is a file, not a folder (or img_align_celeba.zip)" if path.exists() else "does not exist"
        raise UserError(_celeba_help(f"The CelebA data folder {path} {what}."))
    partition = path / _PARTITION_FILE
    partition = partition if partition.is_file() else None
    image_dir = path / "img_align_celeba"
    if image_dir.is_dir():
        names = sorted(name for name in os.listdir(image_dir) if _is_image(name))
        if names:
            return _Files(image_dir, names, None, partition)
        hint = ""
        if (image_dir / "img_align_celeba").is_dir():  # the Kaggle archive unpacks to a nested folder
            hint = f" It holds a nested img_align_celeba folder: pass --data-dir {image_dir}."
        raise UserError(_celeba_help(f"The folder {image_dir} holds no images.{hint}"))
    zip_path = path / "img_align_celeba.zip"
    if zip_path.is_file():
        members = _zip_members(zip_path)
        return _Files(zip_path, sorted(members), members, partition)
    hint = ""
    if path.name == "img_align_celeba" or any(_is_image(name) for name in os.listdir(path)):
        hint = f" If {path} is the image folder itself, pass its parent folder, {path.parent}."
    raise UserError(_celeba_help(f"{path} has no img_align_celeba folder or img_align_celeba.zip.{hint}"))


def _list_folder(data_dir: str | os.PathLike | None) -> _Files:
    if data_dir is None:
        raise UserError(_folder_help("The folder dataset needs --data-dir."))
    path = pathlib.Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise UserError(_folder_help(f"The image folder {path} {what}."))
    names, passed_over = [], []

    def unreadable(exc: OSError) -> None:
        passed_over.append(f"{pathlib.Path(exc.filename).relative_to(path)}/ (unreadable folder: {exc.strerror})")

    for dirpath, dirnames, filenames in os.walk(path, onerror=unreadable):
        rel = pathlib.PurePath(dirpath).relative_to(path)
        if (pathlib.Path(dirpath) / LOCK_NAME).exists() and rel != pathlib.PurePath("."):
            passed_over.append(f"{rel.as_posix()}/ (an aecurves output folder)")
            dirnames[:] = []
            continue
        for d in dirnames:
            if not d.startswith(".") and os.path.islink(os.path.join(dirpath, d)):
                passed_over.append(f"{(rel / d).as_posix()}/ (a link to a folder; links are not followed)")
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip .git, .cache and the like
        for name in filenames:
            if not _is_image(name):
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # bytes that are not UTF-8: the name cannot be recorded faithfully
                passed_over.append(f"{(rel / name).as_posix().encode('utf-8', 'replace').decode()} (a file name "
                                   "that is not valid UTF-8)")
                continue
            names.append((rel / name).as_posix())
    if passed_over:
        _warn(f"passed over {len(passed_over)} item(s) in {path}: {_name_list(passed_over)}")
    if not names:
        raise UserError(_folder_help(f"The folder {path} holds no images."))
    return _Files(path, sorted(names), passed_over=passed_over)


# ----------------------------------------------------------------------------------------------------------
# decoding


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16- and 32-bit grayscale (e.g. 16-bit PNG) is scaled to 0-255 by its bit depth: PIL's own
    convert("RGB") would clip every value above 255 to white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or values.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


def _decode_image(fp, image_size: int) -> np.ndarray:
    """One image file -> uint8 [3, S, S]: centered square crop of side round(140/178 * width), bicubic resize."""
    with Image.open(fp) as im:
        w, h = im.size
        side = max(1, min(round(CROP_FRACTION * w), h))
        if 2 * image_size < side:
            # JPEGs decode at 1/2, 1/4, 1/8 scale almost for free; keep the crop >= 2x the output size.
            scale = 2 * image_size / side
            im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            side *= im.size[0] / w
            w, h = im.size
        im = _to_rgb(im)
        # Crop the smallest integer box around the exact (possibly half-pixel) square, then resize with the
        # exact square as a box: the filter never reads outside the crop, and centering stays exact.
        left, top = (w - side) / 2, (h - side) / 2
        box = (math.floor(left), math.floor(top), math.ceil(left + side), math.ceil(top + side))
        im = im.crop(box)
        inner = (left - box[0], top - box[1], left - box[0] + side, top - box[1] + side)
        im = im.resize((image_size, image_size), Image.BICUBIC, box=inner)
        return np.asarray(im).transpose(2, 0, 1)


def _decode_into(out: np.ndarray, files: _Files, names: list[str], desc: str, progress: bool) -> dict[int, str]:
    """Decode names[i] into out[i] with a thread pool (PIL releases the GIL); return {index: error}."""
    image_size = out.shape[-1]
    errors = {}
    with files.opener() as open_file:

        def work(i):
            try:
                out[i] = _decode_image(open_file(names[i]), image_size)
                return None
            except Exception as exc:  # PIL raises many types for bad files: any failure means "skip it"
                return f"{type(exc).__name__}: {exc}"

        pool = concurrent.futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1))
        try:
            results = pool.map(work, range(len(names)))
            for i, error in enumerate(console.progress(results, desc, progress, unit="img", total=len(names))):
                if error is not None:
                    errors[i] = error
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, do not decode the rest first
    return errors


# ----------------------------------------------------------------------------------------------------------
# size bounds


def physical_memory() -> int | None:
    """The machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def _images(count: int, channels: int, image_size: int) -> str:
    size = count * channels * image_size * image_size
    return f"{count:,} images x {channels} x {image_size} x {image_size} px = {_gib(size)} of uint8 images"


def check_in_memory(dataset: str, count: int, channels: int, image_size: int) -> None:
    """Refuses images generated in memory that would not fit a share of it (MEMORY_SHARE), before any is made."""
    total = physical_memory()
    bound = (total or FALLBACK_MEMORY) // MEMORY_SHARE
    if count * channels * image_size * image_size > bound:
        whose = f"this machine's {_gib(total)}" if total else f"{_gib(FALLBACK_MEMORY)}, as this machine's is unknown"
        raise UserError(f"The {dataset} images are made in memory: {_images(count, channels, image_size)}, more than "
                        f"the bound of {_gib(bound)} (a quarter of {whose}). Pass a smaller --limit or "
                        "--image-size; nothing was done.")


def check_cache_room(cache_dir: pathlib.Path, count: int, image_size: int) -> None:
    """Refuses an image cache larger than its disk's free space, before decoding into it (cache_dir exists)."""
    free = shutil.disk_usage(cache_dir).free
    if count * 3 * image_size * image_size > free:
        raise UserError(f"The image cache would hold {_images(count, 3, image_size)}, more than the {_gib(free)} "
                        f"free in {cache_dir}. Pass a smaller --limit or --image-size, or a cache folder on a disk "
                        "with room (--cache-dir, or $AECURVES_CACHE); nothing was decoded.")


# ----------------------------------------------------------------------------------------------------------
# cache


def _reserve(path) -> None:
    """Allocates the file's blocks now: a memory-mapped file on a full disk would otherwise die with SIGBUS at
    the first page that finds no room, leaving a sparse file behind. ENOSPC here is an ordinary error."""
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system without fallocate: carry on
                return
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from None
        finally:
            os.close(fd)


def _open_cache(npy: pathlib.Path, meta_path: pathlib.Path, key: str):
    """Return (memmap, metadata) when a complete cache for key exists, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        # "c" (copy-on-write) rather than "r": the tensors are writable without a warning, and a stray
        # in-place write changes private pages only, never the cache file.
        images = np.load(npy, mmap_mode="c")
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    if images.shape[0] != len(meta.get("names", ())) or images.shape[1:] != tuple(meta.get("shape", ())) \
            or meta.get("sample_sha1") != _sample_digest(images):
        _warn(f"the image cache {npy.name} is damaged (its shape or content changed since it was written); "
              "decoding the images again")
        return None
    return images, meta


def _load_cached(
    dataset: str,
    files: _Files,
    names: list[str],
    partition: dict[str, int] | None,
    image_size: int,
    limit: int | None,
    cache_dir: pathlib.Path,
    progress: bool,
):
    """Decoded images in storage order, from the cache or decoded now (and cached)."""
    key_fields = {
        "dataset": dataset,
        "source": str(files.root),
        "names": names,
        "image_size": image_size,
        "transform": TRANSFORM_VERSION,
        "limit": limit,
        "partition": None if partition is None else [partition[n] for n in names],
        "files": _files_fingerprint(files, names),
    }
    key = hashlib.sha1(json.dumps(key_fields).encode()).hexdigest()
    stem = f"{dataset}-{image_size}px-{len(names)}-{key[:16]}"
    npy, meta_path = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
    cached = _open_cache(npy, meta_path, key)
    if cached is not None:
        images, meta = cached
        if meta["skipped"]:
            _warn(f"skipped {len(meta['skipped'])} unreadable image(s) in {files.root}: "
                  f"{_name_list(meta['skipped'])}")
        return images, meta

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        check_cache_room(cache_dir, len(names), image_size)  # a UserError passes through
        tmp = str(new_temp_file(cache_dir, stem))
    except OSError as exc:
        raise UserError(
            f"Cannot write the image cache in {cache_dir} ({exc}). Pass a writable folder with --cache-dir "
            "or set AECURVES_CACHE."
        ) from None
    order = _storage_order(names, partition)
    tmp_files = [tmp]
    try:
        shape = (len(order), 3, image_size, image_size)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _reserve(tmp)
        errors = _decode_into(out, files, order, f"decoding {dataset}", progress)
        if errors:
            skipped = [order[i] for i in sorted(errors)]
            first = min(errors)
            if len(errors) == len(order):
                raise UserError(
                    f"None of the {len(order)} images in {files.root} could be decoded (first error, "
                    f"{order[first]}: {errors[first]}). Check that the files are intact images, e.g. by "
                    "opening one with an image viewer, and download or unpack them again if not."
                )
            _warn(f"skipped {len(skipped)} unreadable image(s) in {files.root}: {_name_list(skipped)} "
                  f"(first error, {order[first]}: {errors[first]})")
            # Rare path: copy the good rows into a smaller file (the .npy header fixes the shape).
            keep = np.array([i for i in range(len(order)) if i not in errors])
            tmp2 = str(new_temp_file(cache_dir, stem))
            tmp_files.append(tmp2)
            kept = np.lib.format.open_memmap(tmp2, mode="w+", dtype=np.uint8, shape=(len(keep),) + out.shape[1:])
            for start in range(0, len(keep), 1024):
                kept[start : start + 1024] = out[keep[start : start + 1024]]
            del out
            out, tmp = kept, tmp2
            order = [order[i] for i in keep]
        else:
            skipped = []
        out.flush()
        del out
        counts = None if partition is None else [sum(partition[n] == p for n in order) for p in range(3)]
        written = np.load(tmp, mmap_mode="r")
        meta = {"key": key, "dataset": dataset, "source": str(files.root), "transform": TRANSFORM_VERSION,
                "names": order, "skipped": skipped, "partition_counts": counts, "shape": list(written.shape[1:]),
                "sample_sha1": _sample_digest(written)}
        del written
        # The .npy goes in place first: a .json with a matching key then always means a complete cache.
        os.replace(tmp, npy)
        write_json(meta_path, meta)
    finally:
        for path in tmp_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return np.load(npy, mmap_mode="c"), meta


def load_run_data(args: dict, cache_dir=None, progress: bool = True) -> ImageData:
    """The data a checkpoint's run was trained on, from its recorded settings (`args`)."""
    return load_data(args.get("dataset"), args.get("data_dir"), args["image_size"], args.get("limit"),
                     args.get("val_fraction") or VAL_FRACTION, bool(args.get("use_test")), cache_dir,
                     progress=progress)


def load_data_once(info: runtime.Dist, progress: bool, **kwargs) -> ImageData:
    """load_data() under torchrun: rank 0 builds the image cache; the other ranks wait for it, then read it."""
    data = load_data(**kwargs, progress=progress) if info.is_main else None
    runtime.barrier()
    return data if data is not None else load_data(**kwargs, progress=False)


# ----------------------------------------------------------------------------------------------------------
# generated / embedded datasets (small: built in memory, not cached)


def _lfw_images(image_size: int) -> np.ndarray:
    """The 100 faces of scikit-image's lfw_subset (25x25 grayscale, shipped with the package) -> uint8 [100, 1, S, S].

    lfw_subset holds 100 faces followed by 100 non-face patches; only the faces are used.
    """
    from skimage.data import lfw_subset  # deferred: scikit-image is slow to import

    faces = lfw_subset()[:LFW_COUNT].astype(np.float32)  # values in [0, 1]
    out = np.empty((len(faces), 1, image_size, image_size), dtype=np.uint8)
    for i, face in enumerate(faces):
        resized = np.asarray(Image.fromarray(face).resize((image_size, image_size), Image.BICUBIC))
        out[i, 0] = np.rint(np.clip(resized, 0, 1) * 255)
    return out


def _synthetic_image(index: int, image_size: int) -> np.ndarray:
    """A smooth RGB image (a colour gradient under 1-3 soft ellipses), uint8 [3, S, S], fixed per index."""
    rng = np.random.default_rng([_SYNTHETIC_SEED, index])
    coords = (np.arange(image_size) + 0.5) / image_size  # drawn in [0, 1] coordinates: any size, same picture
    y, x = np.meshgrid(coords, coords, indexing="ij")
    angle = rng.uniform(0, 2 * np.pi)
    c0, c1 = rng.uniform(0, 1, (2, 3, 1, 1))
    t = 0.5 + (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) / np.sqrt(2)
    img = c0 + (c1 - c0) * t
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        ry, rx = rng.uniform(0.08, 0.3, 2)
        theta = rng.uniform(0, np.pi)
        color = rng.uniform(0, 1, (3, 1, 1))
        u = ((x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)) / rx
        v = (-(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)) / ry
        mask = 1 / (1 + np.exp((np.sqrt(u * u + v * v) - 1) / 0.1))  # soft edge
        img = img * (1 - mask) + color * mask
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _in_memory(dataset, names, images, val_fraction, use_test, where) -> ImageData:
    order = _storage_order(names, None)
    index = {name: i for i, name in enumerate(names)}
    stored = images[[index[name] for name in order]]
    return _split(dataset, stored, order, None, val_fraction, use_test, where, [])


# ----------------------------------------------------------------------------------------------------------
# public entry point


def load_data(
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    limit: int | None = None,
    val_fraction: float = VAL_FRACTION,
    use_test: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ImageData:
    """Load a dataset as uint8 train / held-out tensors (see the module docstring for split and cache)."""
    if dataset not in DATASETS:
        raise UserError(f"Unknown dataset {dataset!r}. Choose one of: {', '.join(DATASETS)}.")
    image_size = DEFAULT_IMAGE_SIZE[dataset] if image_size is None else int(image_size)
    if image_size < 1:
        raise UserError(f"The image size must be at least 1 pixel, got {image_size}."
                        " Pass a positive --image-size.")
    if limit is not None and limit < 1:
        raise UserError(f"The image limit must be at least 1, got {limit}. Pass a positive --limit, or omit it.")
    if not 0 < val_fraction < 1:
        raise UserError(
            f"The held-out fraction must lie strictly between 0 and 1, got {val_fraction}. "
            "Pass e.g. --val-fraction 0.1."
        )

    if dataset == "synthetic":
        count = SYNTHETIC_COUNT if limit is None else limit
        if count > MAX_SYNTHETIC:
            raise UserError(f"The synthetic dataset is generated in memory: at most {MAX_SYNTHETIC:,} images, got "
                            f"--limit {count:,}. Pass a smaller --limit.")
        check_in_memory(dataset, count, 3, image_size)
        names = [f"synthetic_{i:06d}" for i in range(count)]
        images = np.empty((count, 3, image_size, image_size), dtype=np.uint8)  # filled in place: no second copy
        for i in range(count):
            images[i] = _synthetic_image(i, image_size)
        return _in_memory(dataset, names, images, val_fraction, use_test, "(generated)")
    if dataset == "lfw":
        check_in_memory(dataset, LFW_COUNT, 1, image_size)
        images = _lfw_images(image_size)[:limit]
        names = [f"lfw_{i:03d}" for i in range(len(images))]
        return _in_memory(dataset, names, images, val_fraction, use_test, "(scikit-image lfw_subset)")

    files = _list_celeba(data_dir) if dataset == "celeba" else _list_folder(data_dir)
    names = files.names
    partition = None
    if files.partition_file is None:
        names = names[:limit]
    else:
        partition = _read_partition(files.partition_file)
        unlisted = [name for name in names if name not in partition]
        if unlisted:
            _warn(f"{len(unlisted)} image(s) in {files.root} are not listed in {files.partition_file} and are "
                  f"left out: {_name_list(unlisted)}")
            names = [name for name in names if name in partition]
            if not names:
                raise UserError(
                    f"None of the images in {files.root} is listed in {files.partition_file}. Use the "
                    f"{_PARTITION_FILE} that belongs to these images, or remove it to get a split keyed on the "
                    "file names."
                )
        if limit is not None:
            names = _limit_per_partition(names, partition, limit, val_fraction)
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    check_outside_data(cache, files.root, "The image cache (--cache-dir or $AECURVES_CACHE)")
    images, meta = _load_cached(dataset, files, names, partition, image_size, limit, cache, progress)
    return _split(dataset, images, meta["names"], meta["partition_counts"], val_fraction, use_test,
                  str(files.root), list(files.passed_over) + list(meta["skipped"]))


# ----------------------------------------------------------------------------------------------------------
# batches


class BatchLoader:
    """Float batches in [0, 1] cut from a uint8 image tensor.

    The uint8 tensor is moved to `device` ONCE in __init__ (on CUDA this puts the whole cache on the GPU);
    each batch is an index-gather + .float().div_(255) on that device, so there is no per-batch host
    decoding or host->device copy. The last partial batch is kept. With channels_last, the batches come in that
    memory format (the same values).

    shuffle=True (training): epoch e uses a permutation from a torch.Generator seeded with
    seed * 1_000_003 + e, so any epoch's order is reproducible without replaying earlier ones (exact resume).
    Call set_epoch(e) before iterating. The permutation is truncated to a multiple of world_size and rank r
    takes perm[r::world_size]: every rank gets the same number of batches, as DDP needs.

    shuffle=False (evaluation): rank r takes the contiguous shard [r*N//W, (r+1)*N//W) in order, with no
    truncation, so every image is seen exactly once across ranks; shard sizes (and batch counts) may differ
    by one image, which is fine when results are summed across ranks.
    """

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected a uint8 [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
        if batch_size < 1:
            raise UserError(f"The batch size must be at least 1, got {batch_size}. Pass a positive --batch-size.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        n = len(images)
        if shuffle and n < world_size:
            raise UserError(
                f"{n} training image(s) cannot be shared among {world_size} processes: every process needs at "
                "least one. Use more images or fewer processes."
            )
        self.device = torch.device(device)
        self.images = images.to(self.device)  # the one host->device copy
        if channels_last:  # then every batch is too (slices and .float() keep the format)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        if shuffle:
            self.num_samples = n // world_size
        else:
            self._start, self._end = rank * n // world_size, (rank + 1) * n // world_size
            self.num_samples = self._end - self._start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(len(self.images), generator=g)  # on the CPU: identical on every device
            index = perm[: self.num_samples * self.world_size][self.rank :: self.world_size].to(self.device)
            for start in range(0, self.num_samples, self.batch_size):
                yield self.images[index[start : start + self.batch_size]].float().div_(255)
        else:
            for start in range(self._start, self._end, self.batch_size):
                yield self.images[start : min(start + self.batch_size, self._end)].float().div_(255)
