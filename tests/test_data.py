"""Every input format decodes to uint8 levels; every bad file is a clear per-file error."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pixeldefend.data import (
    ImageSpec,
    ImageStream,
    from_8bit,
    load_images,
    save_image,
    save_npz,
    to_8bit,
    training_splits,
)
from pixeldefend.errors import DataError

DIGITS = ImageSpec(1, 8, 8, 17)


def test_digits_splits_are_fixed_disjoint_and_complete():
    splits = {k: load_images(f"digits:{k}") for k in ("train", "val", "calib", "test")}
    names = [set(s.names) for s in splits.values()]
    assert sum(len(n) for n in names) == 1797
    assert len(set().union(*names)) == 1797
    assert splits["test"].names == load_images("digits:test").names  # seeded, repeatable
    train = splits["train"]
    assert train.images.dtype == torch.uint8 and train.levels == 17
    assert train.images.shape[1:] == (1, 8, 8) and int(train.images.max()) == 16
    assert train.labels is not None and set(train.labels.tolist()) == set(range(10))


def test_slices_of_builtin_sets():
    part = load_images("digits:test[10:20]")
    assert len(part) == 10 and part.names == load_images("digits:test").names[10:20]
    with pytest.raises(DataError, match="selects no images"):
        load_images("digits:test[5:5]")


def test_level_mapping_round_trips_exactly():
    for levels in (2, 3, 17, 100, 256):
        v = np.arange(levels, dtype=np.uint8)
        assert np.array_equal(from_8bit(to_8bit(v, levels), levels), v)
    assert to_8bit(np.array([16]), 17)[0] == 255 and from_8bit(np.array([255]), 17)[0] == 16


def test_folder_with_class_subfolders_gives_labels_and_exact_values(tmp_path):
    digits = load_images("digits:test[:6]")
    for k in range(6):
        label = int(digits.labels[k])
        save_image(tmp_path / f"class{label}" / f"img{k}.png", digits.images[k], 17)
    loaded = load_images(str(tmp_path), DIGITS)
    assert len(loaded) == 6 and loaded.classes is not None
    order = [int(n.split("img")[1].split(".")[0]) for n in loaded.names]
    assert torch.equal(loaded.images, digits.images[order])  # PNG round trip is exact
    expected = [loaded.classes.index(f"class{int(digits.labels[k])}") for k in order]
    assert loaded.labels.tolist() == expected


def make_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    good = np.zeros((8, 8), dtype=np.uint8)
    Image.fromarray(good).save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((9, 7), dtype=np.uint8)).save(folder / "wrong_size.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "colour.png")
    Image.fromarray(np.full((8, 8), 300, dtype=np.uint16)).save(folder / "deep.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "ok.bmp")


def test_each_bad_file_is_a_clear_per_file_error(tmp_path):
    make_bad_files(tmp_path)
    stream = ImageStream([str(tmp_path), str(tmp_path / "missing.png")], DIGITS)
    rows = {}
    for batch in stream.batches(3):
        assert batch.images.shape[0] == sum(e is None for e in batch.errors)
        for name, error in zip(batch.names, batch.errors, strict=True):
            rows[name.split("/")[-1]] = error
    assert rows["full.png"] is None and rows["ok.bmp"] is None
    assert "empty" in rows["empty.png"]
    assert "not an image" in rows["text.png"]
    assert "truncated" in rows["truncated.png"]
    assert "7x9" in rows["wrong_size.png"] and "8x8" in rows["wrong_size.png"]
    assert "resize=True" in rows["wrong_size.png"]
    assert "3 channel" in rows["colour.png"] and "expects 1" in rows["colour.png"]
    assert "16-bit" in rows["deep.png"]
    assert "no such file" in rows["missing.png"]


def test_resize_and_grayscale_convert_on_request(tmp_path):
    Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8)).save(tmp_path / "big.png")
    images = load_images(str(tmp_path / "big.png"), DIGITS, resize=True, grayscale=True)
    assert images.images.shape == (1, 1, 8, 8) and int(images.images.min()) == 16


def test_npz_with_levels_loads_exactly_and_npy_is_taken_as_8bit(tmp_path):
    digits = load_images("digits:test[:4]")
    save_npz(tmp_path / "a.npz", digits.images, 17, digits.labels)
    again = load_images(str(tmp_path / "a.npz"), DIGITS)
    assert torch.equal(again.images, digits.images) and torch.equal(again.labels, digits.labels)
    np.save(tmp_path / "b.npy", np.full((2, 8, 8), 255, dtype=np.uint8))
    assert int(load_images(str(tmp_path / "b.npy"), DIGITS).images.min()) == 16
    np.save(tmp_path / "c.npy", np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_images(str(tmp_path / "c.npy"), DIGITS)
    save_npz(tmp_path / "d.npz", torch.zeros((2, 1, 5, 5), dtype=torch.uint8), 17)
    with pytest.raises(DataError, match=r"\(1, 5, 5\)"):
        load_images(str(tmp_path / "d.npz"), DIGITS)


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                      *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_found_in_data_root(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    monkeypatch.setattr("pixeldefend.data.DEBIAN_DATASET_DIRS", {})
    loaded = load_images("mnist:test", data_root=str(tmp_path))
    assert np.array_equal(loaded.images[:, 0].numpy(), images)
    assert loaded.labels.tolist() == [0, 1, 2, 3, 4]
    monkeypatch.setenv("PIXELDEFEND_DATA", str(tmp_path))
    assert len(load_images("mnist:test")) == 5
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" +
                                                                      b"\x00" * 8))
    with pytest.raises(DataError, match="IDX"):
        load_images("mnist:test")


def test_missing_dataset_explains_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr("pixeldefend.data.DEBIAN_DATASET_DIRS", {})
    monkeypatch.delenv("PIXELDEFEND_DATA", raising=False)
    with pytest.raises(DataError, match="set download") as info:
        load_images("fashion-mnist:test", data_root=str(tmp_path))
    assert info.value.param == ("data_root", "download")  # the CLI shows --data-root


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(DataError, match="no such file or folder"):
        load_images("no-such-dataset")


def test_folder_splits_for_training(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(20):
        Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    splits = training_splits(str(tmp_path))
    assert [len(splits[k]) for k in ("train", "val", "calib")] == [16, 2, 2]
    assert splits["train"].spec == ImageSpec(1, 6, 5, 256)
