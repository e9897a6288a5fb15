"""Regression data: UTKFace names, CSV sources, split, target scaling, loaders, synthetic data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reviewkd.batch import Batch
from reviewkd.data.regression import (
    TargetScaler,
    build_regression_data,
    load_images,
    make_synthetic_regression,
    parse_utkface_target,
    read_target_csv,
    scan_utkface_folder,
    split_indices,
)


def _write_png(path: Path, value: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Path:
    """A constant image of ``value`` (width x height = ``size``), not square on purpose."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path, format="PNG")
    return path


def _index_tensors(n: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is constant i (so a batch tells which samples it holds); target of i is 10 + 2 i."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    return images, 10.0 + 2.0 * torch.arange(n, dtype=torch.float64)


def _one_line(exc: pytest.ExceptionInfo, csv_path: Path, line: int) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert str(csv_path) in message and f"line {line}" in message
    return message


# ----------------------------------------------------------------------------- UTKFace folders


@pytest.mark.parametrize("name, target", [
    ("26_0_1_20170116174525125.jpg.chip.jpg", 26.0),
    ("1_0_0_20161219140623097.jpg.chip.jpg", 1.0),
    ("116_1_0_20170120134921760.jpg.chip.jpg", 116.0),
    ("39_1_20170116174525125.jpg.chip.jpg", 39.0),  # a real UTKFace name with the race missing
    ("12.5_0_0_000001.png", 12.5),
    ("26.jpg", None),  # no underscore
    ("face_26_0_1.jpg", None),  # no leading number
    ("26_0_1_notes.txt", None),  # not an image
    ("_26.jpg", None),
])
def test_utkface_names_parse_to_the_number_before_the_first_underscore(name, target):
    assert parse_utkface_target(name) == target


def test_utkface_folder_skips_and_counts_files_without_a_target(tmp_path):
    for name, value in [("26_0_1_20170116174525125.jpg.chip.jpg", 10), ("3_1_2_20161219.jpg.chip.jpg", 20),
                        ("80_0_0_20170110.jpg.chip.jpg", 30)]:
        _write_png(tmp_path / name, value)  # PNG bytes under a .jpg name: PIL reads the content
    _write_png(tmp_path / "face.jpg", 40)
    (tmp_path / "labels.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")  # hidden: ignored, not counted
    paths, targets, skipped = scan_utkface_folder(tmp_path)
    assert [p.name.split("_")[0] for p in paths] == ["26", "3", "80"]
    assert targets.tolist() == [26.0, 3.0, 80.0] and targets.dtype == torch.float64
    assert skipped == 2
    images = load_images(paths, image_size=6)
    assert images.shape == (3, 3, 6, 6) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [10, 20, 30]


def test_utkface_folder_without_any_target_name_is_a_one_line_error(tmp_path):
    _write_png(tmp_path / "face.jpg", 40)
    with pytest.raises(ValueError, match="UTKFace") as exc:
        scan_utkface_folder(tmp_path)
    assert "\n" not in str(exc.value) and "1 files skipped" in str(exc.value)


def test_folder_source_reports_skipped_files_and_reads_every_parsed_image(tmp_path):
    for i in range(10):
        _write_png(tmp_path / f"{20 + i}_0_0_{i:06d}.jpg.chip.jpg", 10 * i)
    _write_png(tmp_path / "broken_name.jpg", 0)
    data = build_regression_data(tmp_path, image_size=8, batch_size=4, test_fraction=0.3)
    assert data.skipped == 1
    assert (data.num_samples, data.test.num_samples) == (7, 3)
    assert data.input_size == (3, 8, 8)
    all_targets = sorted(data.train_targets.tolist() + data.scaler.denormalise(data.test.labels).tolist())
    assert all_targets == pytest.approx([20.0 + i for i in range(10)])


def test_grey_channel_and_rgb_conversion(tmp_path):
    grey = _write_png(tmp_path / "5_0_0_0.png", 77, mode="L")
    rgb = load_images([grey], image_size=4, channels=3)
    assert rgb.shape == (1, 3, 4, 4) and (rgb == 77).all()
    assert load_images([grey], image_size=4, channels=1).shape == (1, 1, 4, 4)
    _write_png(tmp_path / "6_0_0_1.png", 10, mode="L")
    _write_png(tmp_path / "7_0_0_2.png", 20, mode="L")
    data = build_regression_data(tmp_path, image_size=5, channels=1, test_fraction=0.34)
    assert data.input_size == (1, 5, 5)


# ----------------------------------------------------------------------------- CSV


def _csv_dataset(folder: Path, rows: list[tuple[str, str]], header: str = "file,age") -> Path:
    for i, (name, _) in enumerate(rows):
        if name and not name.startswith("missing"):
            _write_png(folder / name, 10 * i)
    path = folder / "labels.csv"
    path.write_text("\n".join([header, *(f"{name},{target}" for name, target in rows)]) + "\n")
    return path


def test_csv_reads_paths_relative_to_the_csv_and_numeric_targets(tmp_path):
    path = _csv_dataset(tmp_path / "data", [("img/a.png", "3.5"), ("img/b.png", "-2"), ("c.png", "1e2")])
    paths, targets = read_target_csv(path, target_column="age")
    assert paths == [tmp_path / "data" / "img/a.png", tmp_path / "data" / "img/b.png", tmp_path / "data/c.png"]
    assert targets.tolist() == [3.5, -2.0, 100.0]
    # A relative csv is taken relative to root.
    data = build_regression_data(tmp_path, csv="data/labels.csv", target_column="age", image_size=4,
                                 test_fraction=0.34, normalise="none")
    assert data.num_samples == 2 and data.test.num_samples == 1
    assert sorted(data.train_targets.tolist() + data.test.labels.tolist()) == [-2.0, 3.5, 100.0]


def test_csv_missing_column_is_a_one_line_error(tmp_path):
    path = _csv_dataset(tmp_path, [("a.png", "3")], header="file,value")
    with pytest.raises(ValueError) as exc:
        read_target_csv(path, target_column="age")
    message = _one_line(exc, path, 1)
    assert "'age'" in message and "file, value" in message


def test_csv_non_numeric_target_is_a_one_line_error(tmp_path):
    path = _csv_dataset(tmp_path, [("a.png", "3"), ("b.png", "thirty")])
    with pytest.raises(ValueError) as exc:
        read_target_csv(path, target_column="age")
    assert "'thirty'" in _one_line(exc, path, 3)


def test_csv_nan_target_is_rejected(tmp_path):
    path = _csv_dataset(tmp_path, [("a.png", "nan")])
    with pytest.raises(ValueError) as exc:
        read_target_csv(path, target_column="age")
    _one_line(exc, path, 2)


def test_csv_missing_image_file_is_a_one_line_error(tmp_path):
    path = _csv_dataset(tmp_path, [("a.png", "3"), ("b.png", "4"), ("missing.png", "5")])
    with pytest.raises(FileNotFoundError) as exc:
        read_target_csv(path, target_column="age")
    assert "'missing.png'" in _one_line(exc, path, 4)


def test_csv_default_columns_and_train_test_files(tmp_path):
    for split, offset, n in [("train", 0, 3), ("test", 100, 2)]:
        rows = [f"{split}/{i}.png,{offset + i}" for i in range(n)]
        for i in range(n):
            _write_png(tmp_path / split / f"{i}.png", i)
        (tmp_path / f"{split}.csv").write_text("\n".join(["file,target", *rows]) + "\n")
    data = build_regression_data(csv=tmp_path, image_size=4, normalise="none", test_fraction=0.9)
    assert data.train_targets.tolist() == [0.0, 1.0, 2.0]  # test_fraction is ignored
    assert data.test.labels.tolist() == [100.0, 101.0]


# ----------------------------------------------------------------------------- split


def test_split_is_seeded_disjoint_and_sized_by_test_fraction():
    train, test = split_indices(100, 0.2, seed=0)
    again_train, again_test = split_indices(100, 0.2, seed=0)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    assert (len(train), len(test)) == (80, 20)
    assert torch.equal(train, train.sort().values) and torch.equal(test, test.sort().values)  # source order
    assert torch.equal(torch.sort(torch.cat([train, test])).values, torch.arange(100))
    assert not torch.equal(split_indices(100, 0.2, seed=1)[1], test)
    assert test.tolist() != list(range(80, 100)) and test.tolist() != list(range(20))  # random, not a slice
    assert len(split_indices(10, 0.25, seed=0)[1]) == round(2.5)
    for bad in (0.0, 1.0, 0.01):
        with pytest.raises(ValueError):
            split_indices(10, bad, seed=0)


def _test_ids(data) -> list[int]:
    """Which source samples (encoded as the pixel value) the test loader holds."""
    return data.test.images[:, 0, 0, 0].tolist()


def test_single_source_split_follows_split_seed_not_the_training_seed():
    tensors = _index_tensors(50)
    data = build_regression_data(tensors=tensors, image_size=8, test_fraction=0.2)
    assert (data.num_samples, data.test.num_samples) == (40, 10)
    assert _test_ids(data) == split_indices(50, 0.2, seed=0)[1].tolist()
    train_ids = data.train.images[:, 0, 0, 0].tolist()
    assert not set(train_ids) & set(_test_ids(data))
    # Targets travel with their images.
    assert data.train_targets.tolist() == [10.0 + 2 * i for i in train_ids]
    assert _test_ids(build_regression_data(tensors=tensors, image_size=8, seed=5)) == _test_ids(data)
    assert _test_ids(build_regression_data(tensors=tensors, image_size=8, split_seed=5)) != _test_ids(data)


def test_two_folder_layout_is_used_as_given(tmp_path):
    for i in range(3):
        _write_png(tmp_path / "train" / f"{i + 1}_0_0_{i}.jpg.chip.jpg", 0)
    for i in range(2):
        _write_png(tmp_path / "test" / f"{i + 50}_0_0_{i}.jpg.chip.jpg", 0)
    data = build_regression_data(tmp_path, image_size=4, test_fraction=0.5, normalise="none")
    assert data.train_targets.tolist() == [1.0, 2.0, 3.0]
    assert data.test.labels.tolist() == [50.0, 51.0]
    (tmp_path / "test").rename(tmp_path / "val")
    with pytest.raises(FileNotFoundError, match="no test/ folder"):
        build_regression_data(tmp_path)


def test_subset_keeps_a_seeded_random_part_of_each_split():
    train, test = _index_tensors(40), _index_tensors(20)
    test = (test[0] + 100, test[1])
    data = build_regression_data(tensors=(train, test), image_size=8, subset=8, seed=1)
    again = build_regression_data(tensors=(train, test), image_size=8, subset=8, seed=1)
    assert (data.num_samples, data.test.num_samples) == (8, 8)
    ids = data.train.images[:, 0, 0, 0].tolist()
    assert ids == again.train.images[:, 0, 0, 0].tolist() and ids == sorted(ids) and ids != list(range(8))
    assert all(i >= 100 for i in _test_ids(data))


def test_exactly_one_source_is_required(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        build_regression_data()
    with pytest.raises(ValueError, match="exactly one"):
        build_regression_data(tmp_path, tensors=_index_tensors(4))


# ----------------------------------------------------------------------------- target scaling


def test_standard_scaler_uses_the_population_std_of_numpy():
    targets = torch.tensor([1.0, 4.0, 9.0, 16.0, 30.0, 77.0], dtype=torch.float64)
    scaler = TargetScaler.fit(targets, "standard")
    values = targets.numpy()
    assert scaler.a == pytest.approx(np.mean(values), rel=1e-12)
    assert scaler.b == pytest.approx(np.std(values, ddof=0), rel=1e-12)
    assert scaler.b != pytest.approx(np.std(values, ddof=1), rel=1e-3)
    z = scaler.normalise(targets)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-12) and z.std(correction=0).item() == pytest.approx(1.0)
    assert torch.allclose(scaler.denormalise(z), targets)


def test_minmax_and_none_scalers_and_the_round_trip():
    targets = torch.tensor([3.0, 8.0, 5.0, 13.0])
    minmax = TargetScaler.fit(targets, "minmax")
    assert (minmax.a, minmax.b) == (3.0, 10.0)
    assert minmax.normalise(targets).tolist() == pytest.approx([0.0, 0.5, 0.2, 1.0])
    none = TargetScaler.fit(targets, "none")
    assert torch.equal(none.normalise(targets), targets)
    for scaler in (minmax, none):
        assert torch.allclose(scaler.denormalise(scaler.normalise(targets)), targets)
    assert TargetScaler.fit(torch.full((5,), 7.0)).b == 1.0  # constant targets: shift only
    with pytest.raises(ValueError):
        TargetScaler.fit(targets, "zscore")


def test_scaler_dict_round_trip_is_plain_data():
    scaler = TargetScaler.fit(torch.tensor([2.0, 4.0, 9.0]))
    values = json.loads(json.dumps(scaler.to_dict()))  # plain types only
    assert values == {"kind": "standard", "a": scaler.a, "b": scaler.b}
    assert TargetScaler.from_dict(values) == scaler
    with pytest.raises(ValueError):
        TargetScaler("standard", 0.0, 0.0)


def test_scaler_is_fitted_on_the_training_targets_only():
    train, test = _index_tensors(30), _index_tensors(10)
    test = (test[0], test[1] + 1000.0)  # far from the training targets
    data = build_regression_data(tensors=(train, test), image_size=8)
    raw = data.train_targets.double().numpy()
    assert data.scaler.a == pytest.approx(np.mean(raw)) and data.scaler.b == pytest.approx(np.std(raw))
    assert torch.allclose(data.train.labels, data.scaler.normalise(train[1]).float())


# ----------------------------------------------------------------------------- loaders


def test_train_batches_are_normalised_floats_indexed_into_the_training_set():
    images, targets = _index_tensors(30, size=12)
    data = build_regression_data(tensors=(images, targets), image_size=10, batch_size=8, test_fraction=0.2)
    assert data.input_size == (3, 10, 10) and data.num_outputs == 1 and data.name == "regression"
    seen = []
    for batch in data.train:
        assert isinstance(batch, Batch)
        x = batch.inputs["image"]
        assert x.dtype == torch.float32 and x.shape == (len(batch), 3, 10, 10)
        assert batch.targets.dtype == torch.float32 and batch.index.dtype == torch.int64
        assert int(batch.index.max()) < data.num_samples
        raw = data.train_targets[batch.index]
        assert torch.allclose(batch.targets, data.scaler.normalise(raw).float())
        # Pixels: constant v -> (v / 255 - 0.5) / 0.5; the id v also gives the raw target.
        ids = data.train.images[batch.index, 0, 0, 0].float()
        assert torch.allclose(x[:, :, 5, 5], ((ids / 255 - 0.5) / 0.5)[:, None].expand(-1, 3), atol=1e-6)
        assert torch.allclose(raw, 10.0 + 2.0 * ids)
        seen += batch.index.tolist()
    assert sorted(seen) == list(range(data.num_samples))
    normalised = data.train.labels
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-5)


def test_training_augmentation_is_a_horizontal_flip_only():
    n, size = 64, 8
    ramp = torch.arange(size, dtype=torch.uint8).mul(30).expand(size, size)  # columns differ
    images = ramp.expand(n, 3, size, size).clone()
    data = build_regression_data(tensors=(images, torch.rand(n)), image_size=size, batch_size=n, test_fraction=0.5)
    x = next(iter(data.train)).inputs["image"]
    plain = (ramp.float() / 255 - 0.5) / 0.5
    flipped = torch.tensor([torch.allclose(img[0], plain.flip(-1)) for img in x])
    straight = torch.tensor([torch.allclose(img[0], plain) for img in x])
    assert (flipped | straight).all()  # never shifted or cropped
    assert 0 < flipped.sum() < len(x)
    off = build_regression_data(tensors=(images, torch.rand(n)), image_size=size, batch_size=n, augment=False)
    assert all(torch.allclose(img[0], plain) for img in next(iter(off.train)).inputs["image"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_test_loader_covers_every_test_sample_exactly_once(world_size):
    data = [build_regression_data(tensors=_index_tensors(37), image_size=8, batch_size=4, eval_batch_size=4,
                                  rank=rank, world_size=world_size, test_fraction=0.3) for rank in range(world_size)]
    seen = [i for d in data for batch in d.test for i in batch.index.tolist()]
    assert sorted(seen) == list(range(data[0].test.num_samples)) and len(seen) == 11
    batch = next(iter(data[0].test))
    assert batch.targets.dtype == torch.float32 and batch.inputs["image"].shape[1:] == (3, 8, 8)


def test_in_memory_images_of_another_size_are_resized():
    images, targets = _index_tensors(10, size=20)
    data = build_regression_data(tensors=(images, targets), image_size=16)
    assert data.train.images.shape[1:] == (3, 16, 16) and data.input_size == (3, 16, 16)
    assert torch.equal(data.train.images[:, :, 0, 0], data.train.images[:, :, 15, 15])  # constants stay constant
    with pytest.raises(ValueError, match="channels"):
        build_regression_data(tensors=(images[:, :1], targets), image_size=8)


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_images_of_larger_targets_have_more_bright_pixels(tmp_path):
    folder = make_synthetic_regression(tmp_path / "synth", n=60, image_size=32, seed=3)
    paths, targets, skipped = scan_utkface_folder(folder)
    assert skipped == 0 and len(paths) == 60
    assert targets.min() >= 1 and targets.max() <= 90 and len(targets.unique()) > 30
    bright = (load_images(paths, image_size=32).float().mean(1) > 128).sum((1, 2))
    order = torch.argsort(targets, stable=True)
    assert (bright[order].diff() >= 0).all()  # non-decreasing in the target
    low, high = bright[targets <= 20], bright[targets >= 70]
    assert len(low) and len(high) and low.max() * 4 < high.min()
    # Seeded: the same seed writes the same images.
    again = make_synthetic_regression(tmp_path / "again", n=60, image_size=32, seed=3)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in folder.iterdir())
    data = build_regression_data(folder, image_size=32, batch_size=16)
    assert (data.num_samples, data.test.num_samples) == (48, 12)
