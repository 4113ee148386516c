"""Tests for aecurves.data: splits, crop geometry, cache, bad input, BatchLoader."""

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aecurves import data
from aecurves.data import BatchLoader, load_data
from aecurves.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CELEBA_SAMPLE = SHARED_DATA / "celeba-sample"
CELEBA_FULLRES = SHARED_DATA / "celeba-sample-fullres"
needs_shared = pytest.mark.skipif(
    not (CELEBA_SAMPLE / "img_align_celeba").is_dir() or not (CELEBA_FULLRES / "img_align_celeba").is_dir(),
    reason=f"real CelebA sample not found at {SHARED_DATA} (CI copies shared/ beside the clone)",
)


# ----------------------------------------------------------------------------------------------------------
# helpers: small image files whose uniform colour encodes an id, so tests can tell which image went where


def _write_image(path: Path, value: int, size=(18, 22), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 100)).save(path, format=fmt, quality=95)


def _ids(images: torch.Tensor, step: int = 1) -> list[int]:
    """Recover the ids written by _write_image (value = id * step) from the centre pixel."""
    return [round(v / step) for v in images[:, 0, images.shape[2] // 2, images.shape[3] // 2].tolist()]


def _make_folder(root: Path, ids, ext=".png") -> None:
    for i in ids:
        _write_image(root / f"sub{i % 3}" / f"img{i:03d}{ext}", i)


def _make_celeba(root: Path, ids, step: int = 20) -> None:
    """Fake official layout: root/img_align_celeba/NNNNNN.jpg, value = id * step (JPEG-robust spacing)."""
    for i in ids:
        _write_image(root / "img_align_celeba" / f"{i:06d}.jpg", i * step)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------------------------------------
# arguments


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(UserError) as err:
        load_data("imagenet", cache_dir=tmp_path / "cache")
    for name in data.DATASETS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"limit": 0}, "limit"), ({"val_fraction": 0.0}, "fraction"), ({"val_fraction": 1.0}, "fraction"),
     ({"val_fraction": 1.5}, "fraction"), ({"image_size": 0}, "size")],
)
def test_bad_arguments(tmp_path, kwargs, word):
    with pytest.raises(UserError, match=word):
        load_data("synthetic", cache_dir=tmp_path / "cache", **kwargs)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AECURVES_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("AECURVES_CACHE")
    assert data.default_cache_dir() == Path.home() / ".cache" / "aecurves"


# ----------------------------------------------------------------------------------------------------------
# split


def test_split_keyed_on_name_only(tmp_path):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    _make_folder(root, range(40))
    first = load_data("folder", root, image_size=8, val_fraction=0.3, cache_dir=cache, progress=False)
    train, held = set(_ids(first.train)), set(_ids(first.test))
    assert train | held == set(range(40)) and not train & held
    assert 0 < len(held) < 40

    _make_folder(root, range(40, 80))  # more files: the first 40 must keep their split
    second = load_data("folder", root, image_size=8, val_fraction=0.3, cache_dir=cache, progress=False)
    train2, held2 = set(_ids(second.train)), set(_ids(second.test))
    assert train2 | held2 == set(range(80)) and not train2 & held2
    assert held2 & set(range(40)) == held and train2 & set(range(40)) == train

    # limit keeps the first names in sorted order (relative paths: sub0/..., sub1/..., sub2/...)
    names = sorted(f"sub{i % 3}/img{i:03d}.png" for i in range(80))
    limited = load_data("folder", root, image_size=8, val_fraction=0.3, limit=30, cache_dir=cache, progress=False)
    expected = {int(name[-7:-4]) for name in names[:30]}
    assert set(_ids(limited.train)) | set(_ids(limited.test)) == expected


def test_held_out_fraction_and_use_test_without_partition(tmp_path):
    d = load_data("synthetic", image_size=4, limit=3000, val_fraction=0.2, cache_dir=tmp_path / "cache")
    assert len(d.train) + len(d.test) == 3000
    assert abs(len(d.test) / 3000 - 0.2) < 0.025
    # without a partition file the held-out set is the same whether or not use_test is set
    t = load_data("synthetic", image_size=4, limit=3000, val_fraction=0.2, use_test=True, cache_dir=tmp_path / "c")
    assert torch.equal(t.test, d.test) and torch.equal(t.train, d.train)
    assert "use_test changes nothing" in t.source


def test_empty_split_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="held-out split .* is empty"):
        load_data("synthetic", image_size=4, limit=2, val_fraction=0.01, cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="train split .* is empty"):
        load_data("synthetic", image_size=4, limit=2, val_fraction=0.999999, cache_dir=tmp_path / "cache")


def test_official_partition_file(tmp_path, capsys):
    root, cache = tmp_path / "celeba", tmp_path / "cache"
    _make_celeba(root, range(1, 14))  # 000013.jpg is not in the partition file
    parts = {i: 0 for i in range(1, 7)} | {i: 1 for i in range(7, 10)} | {i: 2 for i in range(10, 13)}
    (root / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {p}\n" for i, p in parts.items()))

    val = load_data("celeba", root, image_size=16, cache_dir=cache, progress=False)
    assert sorted(_ids(val.train, 20)) == [1, 2, 3, 4, 5, 6]
    assert sorted(_ids(val.test, 20)) == [7, 8, 9]
    assert "000013.jpg" in capsys.readouterr().err  # the unlisted image is named and left out

    test = load_data("celeba", root, image_size=16, use_test=True, cache_dir=cache, progress=False)
    assert sorted(_ids(test.train, 20)) == [1, 2, 3, 4, 5, 6]
    assert sorted(_ids(test.test, 20)) == [10, 11, 12]
    assert test.channels == 3 and test.image_size == 16 and test.train.dtype == torch.uint8

    # --limit N with a partition: the first N train images and round(N * val_fraction) of valid and of test
    limited = load_data("celeba", root, image_size=16, limit=4, val_fraction=0.5, cache_dir=cache, progress=False)
    assert sorted(_ids(limited.train, 20)) == [1, 2, 3, 4] and sorted(_ids(limited.test, 20)) == [7, 8]
    limited = load_data("celeba", root, image_size=16, limit=4, val_fraction=0.1, use_test=True, cache_dir=cache,
                        progress=False)
    assert sorted(_ids(limited.test, 20)) == [10]

    # a partition file that lists no valid image: the error says which split is empty
    (root / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg 0\n" for i in range(1, 14)))
    with pytest.raises(UserError, match="valid split .* is empty"):
        load_data("celeba", root, image_size=16, cache_dir=cache, progress=False)


# ----------------------------------------------------------------------------------------------------------
# crop geometry


def test_crop_geometry_synthetic(tmp_path):
    # white exactly inside the centred 140/178-of-width square, black outside: the crop is all white,
    # at full and at double resolution; the inverse picture gives an all-black crop (no bleeding).
    for w, h in [(178, 218), (356, 436)]:
        side = round(140 / 178 * w)
        left, top = (w - side) // 2, (h - side) // 2
        inside = np.zeros((h, w, 3), np.uint8)
        inside[top : top + side, left : left + side] = 255
        Image.fromarray(inside).save(tmp_path / "inside.png")
        Image.fromarray(255 - inside).save(tmp_path / "outside.png")
        assert data._decode_image(tmp_path / "inside.png", 32).min() == 255
        assert data._decode_image(tmp_path / "outside.png", 32).max() == 0
        # one pixel of black inside the square's left edge must show up in the crop
        inside[:, left] = 0
        Image.fromarray(inside).save(tmp_path / "edge.png")
        out = data._decode_image(tmp_path / "edge.png", 32)
        assert out[:, :, 0].max() < 255 and out[:, :, -1].min() == 255
    # landscape image: the side is clipped to the height
    wide = np.zeros((50, 300, 3), np.uint8)
    wide[:, 125:175] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert data._decode_image(tmp_path / "wide.png", 16).min() == 255


@needs_shared
def test_crop_geometry_celeba_both_resolutions(tmp_path):
    cache = tmp_path / "cache"
    full = load_data("celeba", CELEBA_FULLRES, cache_dir=cache, progress=False)
    half = load_data("celeba", CELEBA_SAMPLE, limit=100, cache_dir=cache, progress=False)
    assert full.train.shape == half.train.shape and full.train.shape[1:] == (3, 64, 64)
    assert len(full.train) + len(full.test) == 100
    both = lambda d: torch.cat([d.train, d.test]).float() / 255  # noqa: E731
    # A half-pixel misplacement of the crop at 89x109 already gives ~8.4/255.
    assert (both(full) - both(half)).abs().mean() < 6 / 255

    # At 178x218 the crop is exactly the usual 140x140 box at (19, 39), resized bicubic.
    ref = Image.open(CELEBA_FULLRES / "img_align_celeba" / "000001.jpg").convert("RGB")
    ref = np.asarray(ref.crop((19, 39, 159, 179)).resize((64, 64), Image.BICUBIC)).transpose(2, 0, 1)
    got = data._decode_image(CELEBA_FULLRES / "img_align_celeba" / "000001.jpg", 64)
    np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------------------------------------------------
# layouts, bad files, bad folders


def test_zip_layout_matches_folder(tmp_path):
    root, cache = tmp_path / "celeba", tmp_path / "cache"
    _make_celeba(root, range(1, 31), step=8)
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    with zipfile.ZipFile(zipped / "img_align_celeba.zip", "w") as zf:
        for path in sorted((root / "img_align_celeba").iterdir()):
            zf.write(path, f"img_align_celeba/{path.name}")

    folder = load_data("celeba", root, image_size=16, cache_dir=cache, progress=False)
    for source in (zipped, zipped / "img_align_celeba.zip"):
        z = load_data("celeba", source, image_size=16, cache_dir=cache, progress=False)
        assert torch.equal(z.train, folder.train) and torch.equal(z.test, folder.test)
        assert "img_align_celeba.zip" in z.source


def test_corrupt_files_are_skipped_and_named(tmp_path, capsys):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    _make_folder(root, range(12))
    (root / "bad.jpg").write_bytes(b"this is not an image")
    good_png = (root / "sub0" / "img000.png").read_bytes()
    (root / "truncated.png").write_bytes(good_png[: len(good_png) // 2])

    d = load_data("folder", root, image_size=8, val_fraction=0.3, cache_dir=cache, progress=False)
    assert d.skipped == ["bad.jpg", "truncated.png"]
    err = capsys.readouterr().err
    assert "bad.jpg" in err and "truncated.png" in err
    assert sorted(_ids(d.train) + _ids(d.test)) == list(range(12))

    again = load_data("folder", root, image_size=8, val_fraction=0.3, cache_dir=cache, progress=False)
    assert again.skipped == ["bad.jpg", "truncated.png"] and torch.equal(again.train, d.train)


def test_all_files_corrupt_is_a_user_error(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="None of the 3 images"):
        load_data("folder", root, cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*.npy"))


def test_missing_or_empty_celeba_folder(tmp_path):
    cache = tmp_path / "cache"
    empty = tmp_path / "empty"
    (empty / "img_align_celeba").mkdir(parents=True)
    cases = [tmp_path / "missing", tmp_path / "empty", tmp_path / "empty" / "img_align_celeba", None]
    (tmp_path / "nothing").mkdir()
    cases.append(tmp_path / "nothing")
    before = _snapshot(tmp_path)
    for path in cases:
        with pytest.raises(UserError) as err:
            load_data("celeba", path, cache_dir=cache, progress=False)
        message = str(err.value)
        assert "img_align_celeba/000001.jpg" in message and "list_eval_partition.txt" in message
        assert "mmlab.ie.cuhk.edu.hk" in message and "jessicali9530/celeba-dataset" in message
        assert "root/celeba" in message and "\n" not in message
        if path is not None:
            assert str(path.resolve()) in message
    assert _snapshot(tmp_path) == before  # nothing written, not even the cache folder


def test_missing_or_empty_image_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for path in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(UserError) as err:
            load_data("folder", path, cache_dir=tmp_path / "cache", progress=False)
        assert str(path) in str(err.value) and ".png" in str(err.value) and ".webp" in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# cache


def test_cache_is_reused_and_never_in_data_dir(tmp_path, monkeypatch):
    root, cache = tmp_path / "celeba", tmp_path / "cache"
    _make_celeba(root, range(1, 21), step=10)
    before = _snapshot(root)
    calls = []
    decode = data._decode_image
    monkeypatch.setattr(data, "_decode_image", lambda fp, size: calls.append(fp) or decode(fp, size))

    first = load_data("celeba", root, image_size=16, cache_dir=cache, progress=False)
    assert len(calls) == 20
    second = load_data("celeba", root, image_size=16, cache_dir=cache, progress=False)
    assert len(calls) == 20  # no decoding on the second call
    assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)
    # train and held-out are slices of one memory-mapped array
    assert second.train.untyped_storage().data_ptr() == second.test.untyped_storage().data_ptr()

    assert len(list(cache.glob("*.npy"))) == 1 and len(list(cache.glob("*.json"))) == 1
    assert not [p for p in cache.iterdir() if p.suffix not in (".npy", ".json")]  # no temp files left
    assert _snapshot(root) == before

    # a different size is a different cache entry
    load_data("celeba", root, image_size=8, cache_dir=cache, progress=False)
    assert len(calls) == 40 and len(list(cache.glob("*.npy"))) == 2


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    _make_folder(root, range(20))
    decode = data._decode_image
    count = [0]

    def flaky(fp, size):
        count[0] += 1
        if count[0] == 10:
            raise KeyboardInterrupt
        return decode(fp, size)

    monkeypatch.setattr(data, "_decode_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        load_data("folder", root, image_size=8, val_fraction=0.3, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []  # neither a cache nor a temp file
    d = load_data("folder", root, image_size=8, val_fraction=0.3, cache_dir=cache, progress=False)
    assert sorted(_ids(d.train) + _ids(d.test)) == list(range(20))


# ----------------------------------------------------------------------------------------------------------
# embedded and generated datasets


def test_lfw(tmp_path):
    d = load_data("lfw", "/ignored", cache_dir=tmp_path / "cache")
    assert d.train.shape[1:] == (1, 32, 32) and d.test.shape[1:] == (1, 32, 32)
    assert len(d.train) + len(d.test) == 100 and len(d.test) > 0
    assert d.channels == 1 and d.image_size == 32 and d.train.dtype == torch.uint8
    assert d.train.float().std() > 20  # real pictures, not a constant


def test_synthetic_is_deterministic(tmp_path):
    a = load_data("synthetic", cache_dir=tmp_path / "cache")
    b = load_data("synthetic", cache_dir=tmp_path / "cache")
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert len(a.train) + len(a.test) == data.SYNTHETIC_COUNT
    assert a.train.shape[1:] == (3, 64, 64) and a.channels == 3
    # image i does not depend on how many are generated
    small = load_data("synthetic", limit=50, image_size=64, cache_dir=tmp_path / "cache")
    assert np.array_equal(data._synthetic_image(7, 64), data._synthetic_image(7, 64))
    assert any(torch.equal(small.train[0], img) for img in torch.cat([a.train, a.test]))
    # varied across images, smooth within one (learnable structure, not noise)
    x = a.train.float()
    assert x.std(dim=0).mean() > 30
    assert (x[..., 1:] - x[..., :-1]).abs().mean() < 6


# ----------------------------------------------------------------------------------------------------------
# BatchLoader


def _indexed_images(n: int) -> torch.Tensor:
    """Image i is filled with value i, so a batch tells which images it holds."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 3, 3).contiguous()


def _epoch_ids(loader: BatchLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [round(v * 255) for batch in loader for v in batch[:, 0, 0, 0].tolist()]


def test_batch_loader_values_and_length():
    images = _indexed_images(10)
    loader = BatchLoader(images, batch_size=4)
    batches = list(loader)
    assert len(loader) == 3 and [len(b) for b in batches] == [4, 4, 2]  # last partial batch kept
    assert all(b.dtype == torch.float32 and b.shape[1:] == (2, 3, 3) for b in batches)
    assert torch.allclose(torch.cat(batches), images.float() / 255)
    full = BatchLoader(torch.full((3, 1, 2, 2), 255, dtype=torch.uint8), batch_size=8)
    assert torch.equal(next(iter(full)), torch.ones(3, 1, 2, 2))


def test_batch_loader_shuffle_is_per_epoch_and_reproducible():
    images = _indexed_images(50)
    loader = BatchLoader(images, batch_size=8, shuffle=True, seed=3)
    e0, e1 = _epoch_ids(loader, 0), _epoch_ids(loader, 1)
    assert sorted(e0) == list(range(50)) and sorted(e1) == list(range(50))
    assert e0 != e1 and e0 != list(range(50))
    # epoch 1 without replaying epoch 0, in a fresh loader
    assert _epoch_ids(BatchLoader(images, batch_size=8, shuffle=True, seed=3), 1) == e1
    g = torch.Generator().manual_seed(3 * 1_000_003 + 1)
    assert e1 == torch.randperm(50, generator=g).tolist()
    assert _epoch_ids(BatchLoader(images, batch_size=8, shuffle=True, seed=4), 1) != e1


def test_batch_loader_ranks_shuffled():
    images = _indexed_images(11)
    ranks = [BatchLoader(images, batch_size=2, shuffle=True, seed=0, rank=r, world_size=2) for r in range(2)]
    ids = [_epoch_ids(loader, 5) for loader in ranks]
    assert len(ids[0]) == len(ids[1]) == 5
    assert all(loader.num_samples == 5 and len(loader) == 3 for loader in ranks)
    assert not set(ids[0]) & set(ids[1])
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(5)).tolist()
    assert sorted(ids[0] + ids[1]) == sorted(perm[:10])  # the truncated permutation, covered exactly


def test_batch_loader_ranks_unshuffled():
    images = _indexed_images(11)
    ranks = [BatchLoader(images, batch_size=4, rank=r, world_size=3) for r in range(3)]
    ids = [_epoch_ids(loader, 0) for loader in ranks]
    assert ids[0] + ids[1] + ids[2] == list(range(11))  # contiguous shards, nothing dropped
    assert [loader.num_samples for loader in ranks] == [3, 4, 4]
    assert [len(loader) for loader in ranks] == [1, 1, 1]


def test_batch_loader_bad_arguments():
    with pytest.raises(UserError, match="batch size"):
        BatchLoader(_indexed_images(4), batch_size=0)
    with pytest.raises(UserError, match="processes"):
        BatchLoader(_indexed_images(1), batch_size=1, shuffle=True, world_size=2)
    with pytest.raises(ValueError):
        BatchLoader(_indexed_images(4).float(), batch_size=1)
    with pytest.raises(ValueError):
        BatchLoader(_indexed_images(4), batch_size=1, rank=2, world_size=2)


def test_outputs_and_caches_inside_the_data_folder_are_refused(tmp_path, monkeypatch, capsys):
    """They would be read back as training images by the next run."""
    from conftest import run_cli

    images = tmp_path / "images"
    _make_folder(images, range(40))
    before = _snapshot(images)
    common = ["--dataset", "folder", "--data-dir", images, "--image-size", 16, "--epochs", 1, "--no-progress"]
    assert run_cli("train", *common, "--out", images / "run") == 2
    assert "inside the data folder" in capsys.readouterr().err
    monkeypatch.chdir(images)  # `study --dataset folder --data-dir .` run from the image folder
    assert run_cli("study", "--dataset", "folder", "--data-dir", ".", "--losses", "mse", "--no-progress") == 2
    assert "inside the data folder" in capsys.readouterr().err
    monkeypatch.setenv("AECURVES_CACHE", str(images / "cache"))
    assert run_cli("train", *common, "--out", tmp_path / "run") == 2
    assert "image cache" in capsys.readouterr().err
    assert _snapshot(images) == before  # nothing was written into the data folder


def test_images_replaced_under_the_same_names_are_decoded_again(tmp_path):
    images, cache = tmp_path / "images", tmp_path / "cache"
    _make_celeba(images, range(30), step=5)
    first = load_data("celeba", images, image_size=16, cache_dir=cache, progress=False)
    _make_celeba(images, range(30), step=8)  # same names, other pixels
    second = load_data("celeba", images, image_size=16, cache_dir=cache, progress=False)
    assert not torch.equal(first.train, second.train)
    assert sorted(_ids(second.train, step=8)) == sorted(_ids(first.train, step=5))


def test_a_cache_damaged_in_place_is_rebuilt(tmp_path, capsys):
    images, cache = tmp_path / "images", tmp_path / "cache"
    _make_celeba(images, range(30))
    good = load_data("celeba", images, image_size=16, cache_dir=cache, progress=False)
    good_train, good_test = good.train.clone(), good.test.clone()  # the loaded tensors map the cache file
    npy = next(cache.glob("*.npy"))
    size = npy.stat().st_size
    with open(npy, "r+b") as f:  # random bytes after the header, same size
        f.seek(size - good.train.numel())
        f.write(np.random.default_rng(0).integers(0, 256, good.train.numel(), dtype=np.uint8).tobytes())
    assert npy.stat().st_size == size
    capsys.readouterr()
    again = load_data("celeba", images, image_size=16, cache_dir=cache, progress=False)
    assert "damaged" in capsys.readouterr().err
    assert torch.equal(again.train, good_train) and torch.equal(again.test, good_test)


def test_folder_items_that_cannot_be_used_as_given_are_named_not_dropped(tmp_path, capsys):
    root = tmp_path / "images"
    _make_folder(root, range(6))
    elsewhere = tmp_path / "elsewhere"
    _make_folder(elsewhere, range(6, 9))
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    _write_image(root / "run" / "x.png", 1)
    (root / "run" / ".aecurves.lock").write_text("1\n")  # an aecurves output folder (e.g. an old run)
    bad = os.path.join(os.fsencode(root), b"bad\xff.png")
    with open(bad, "wb") as f:
        Image.new("RGB", (8, 8)).save(f, format="png")
    sixteen = np.full((20, 20), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(sixteen).save(root / "deep.png")
    capsys.readouterr()
    data = load_data("folder", root, image_size=8, cache_dir=tmp_path / "cache", progress=False)
    err = capsys.readouterr().err
    for phrase in ("linked/ (a link to a folder", "run/ (an aecurves output folder)", "not valid UTF-8"):
        assert phrase in err, phrase
    assert len(data.skipped) == 3 and len(data.train) + len(data.test) == 7  # 6 images and the 16-bit one
    grey = [img for img in torch.cat([data.train, data.test])
            if int(img[0].float().std()) == 0 and img[0, 0, 0] == img[1, 0, 0]]
    assert [int(g[0, 0, 0]) for g in grey] == [128]  # scaled by its bit depth, not clipped to white


# ----------------------------------------------------------------------------------------------------------
# size bounds: images x pixels checked before any work (issue 27, N16)


def test_images_that_cannot_fit_in_memory_are_refused_before_any_work(tmp_path, capsys):
    """--limit 65536 and --image-size 1024 are each within their ranges, and together 192 GiB: train built them."""
    from conftest import run_cli

    assert run_cli("train", "--dataset", "synthetic", "--limit", 65536, "--image-size", 1024, "--no-progress",
                   "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    bound = data.physical_memory() // data.MEMORY_SHARE
    assert err.startswith("error: The synthetic images are made in memory: 65,536 images x 3 x 1024 x 1024 px = "
                          f"192.0 GiB of uint8 images, more than the bound of {bound / 2**30:,.1f} GiB (a quarter of "
                          "this machine's ") and "Pass a smaller --limit or --image-size" in err, err
    assert not (tmp_path / "run").exists()


def test_the_memory_bound_is_a_share_of_the_machines(monkeypatch, tmp_path):
    """Exactly at the bound passes, one image more is refused; a machine that does not say uses the fixed cap."""
    one = 3 * 16 * 16
    monkeypatch.setattr(data, "physical_memory", lambda: data.MEMORY_SHARE * 100 * one)
    at_bound = load_data("synthetic", image_size=16, limit=100)
    assert len(at_bound.train) + len(at_bound.test) == 100
    with pytest.raises(UserError, match=r"101 images x 3 x 16 x 16 px = 0\.1 MiB of uint8 images, more than the "
                                        r"bound of 0\.1 MiB \(a quarter of this machine's"):
        load_data("synthetic", image_size=16, limit=101)
    monkeypatch.setattr(data, "physical_memory", lambda: None)
    monkeypatch.setattr(data, "FALLBACK_MEMORY", data.MEMORY_SHARE * 100 * one)
    with pytest.raises(UserError, match="as this machine's is unknown"):
        load_data("synthetic", image_size=16, limit=101)
    # lfw's 100 grey faces are made in memory too, whatever --limit keeps of them
    monkeypatch.setattr(data, "FALLBACK_MEMORY", data.MEMORY_SHARE * 100 * 16 * 16 - 1)
    with pytest.raises(UserError, match="The lfw images are made in memory: 100 images x 1 x 16 x 16 px"):
        load_data("lfw", image_size=16, limit=10)


def test_an_image_cache_larger_than_the_free_disk_is_refused_before_decoding(tmp_path, monkeypatch):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    _make_folder(root, range(20))
    need = 20 * 3 * 8 * 8
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: type("Usage", (), {"free": need - 1})())
    monkeypatch.setattr(data, "_decode_image", lambda fp, size: pytest.fail("decoded"))
    with pytest.raises(UserError, match=rf"The image cache would hold 20 images x 3 x 8 x 8 px = .*, more than the "
                                        rf"0\.0 MiB free in {cache}\. Pass a smaller --limit or --image-size, or a "
                                        r"cache folder on a disk with room"):
        load_data("folder", root, image_size=8, val_fraction=0.3, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []  # neither a cache nor a temp file
    monkeypatch.undo()
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: type("Usage", (), {"free": need})())
    assert len(load_data("folder", root, image_size=8, val_fraction=0.3, cache_dir=cache, progress=False).train) > 0


@pytest.mark.parametrize("command", ["train-curve", "eval-curve", "plane", "fge", "align", "study"])
def test_every_command_that_loads_data_checks_the_bound_first(command, tiny_endpoints, tmp_path, monkeypatch,
                                                              capsys):
    """The endpoints' data (synthetic, 384 images of 32 px) is beyond a bound made small: each command that reads
    it says so before it writes anything."""
    from aecurves.checkpoint import load_checkpoint

    from conftest import TINY, run_cli

    a, b = tiny_endpoints
    c = tmp_path / "c.pt"  # a third network, for the plane
    state = load_checkpoint(a, "endpoint")
    torch.save({**state, "model": {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}},
               c)
    monkeypatch.setattr(data, "physical_memory", lambda: data.MEMORY_SHARE * 383 * 3 * 32 * 32)
    out = tmp_path / "out"
    argv = {"train-curve": ["--init-start", a, "--init-end", b],
            "eval-curve": ["--segment", a, b, "--vgg-weights", "random"],
            "plane": ["--points", a, b, c],
            "fge": ["--ckpt", a],
            "align": ["--init-start", a, "--init-end", b],
            "study": [*TINY, "--vgg-weights", "random"]}[command]
    assert run_cli(command, *argv, "--no-progress", "--out", out) == 2
    err = capsys.readouterr().err
    assert "384 images x 3 x 32 x 32 px" in err and "Traceback" not in err, err
    assert not out.exists()
