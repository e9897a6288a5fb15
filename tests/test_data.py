"""Data side: batched augmentation, CIFAR reader, ImageFolder loaders, TensorLoader, build_datasets."""
from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from reviewkd.data import BatchAugment, TensorLoader, build_datasets, load_cifar, subset_indices
from reviewkd.data.augment import CIFAR100_MEAN, CIFAR100_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from reviewkd.data.cifar import cifar_class_names
from reviewkd.data.fashion_mnist import load_fashion_mnist
from reviewkd.data.imagefolder import ImageFolderLoader, imagenet_transforms, load_image_folder

from conftest import to_model_input


def astuple(batch):
    """(images, targets, dataset indices) of a Batch."""
    return batch.image, batch.targets, batch.index


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- augmentation


def test_random_crop_keeps_a_shifted_block_of_the_image():
    n, size, pad = 600, 8, 4
    white = torch.full((n, 1, size, size), 255, dtype=torch.uint8)
    out = BatchAugment(crop_padding=pad, flip=True)(white, generator=_gen())
    assert out.shape == (n, 1, size, size)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    mask = out[:, 0] > 0
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # n x size each
    # Nonzero rows/columns form one run; the rest of the crop is zero padding.
    height, width = rows.sum(1), cols.sum(1)
    top = rows.float().argmax(1)
    left = cols.float().argmax(1)
    shift_y = torch.where(top > 0, -top, size - height)  # < 0: padding on top
    shift_x = torch.where(left > 0, -left, size - width)
    assert (shift_y.abs() <= pad).all() and (shift_x.abs() <= pad).all()
    assert (height == size - shift_y.abs()).all() and (width == size - shift_x.abs()).all()
    assert (mask.sum((1, 2)) == height * width).all()  # the nonzero region is a full rectangle
    assert len(set(zip(shift_y.tolist(), shift_x.tolist()))) > 40  # many of the 81 offsets occur


def test_each_output_is_a_crop_of_the_padded_image_possibly_flipped():
    n, pad = 16, 4
    images = torch.randint(0, 256, (n, 3, 10, 12), dtype=torch.uint8, generator=_gen(1))
    out = BatchAugment(crop_padding=pad, flip=True)(images, generator=_gen(2))
    padded = F.pad(images.float() / 255, (pad, pad, pad, pad))
    for i in range(n):
        candidates = [
            crop
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for crop in [padded[i, :, dy:dy + 10, dx:dx + 12]]
            for crop in (crop, crop.flip(-1))
        ]
        assert any(torch.equal(out[i], c) for c in candidates), f"sample {i} is not a crop"


def test_flip_happens_about_half_the_time():
    images = torch.zeros(2000, 1, 4, 4, dtype=torch.uint8)
    images[:, :, :, 0] = 255  # a bright left column
    out = BatchAugment(flip=True)(images, generator=_gen(3))
    flipped = out[:, 0, :, -1].amax(1) > 0
    assert torch.equal(out[~flipped], images[~flipped].float() / 255)
    assert 0.45 <= flipped.float().mean().item() <= 0.55


def test_disabled_augmentation_is_exactly_scaling():
    images = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8, generator=_gen(4))
    out = BatchAugment(crop_padding=0, flip=False, mean=(0.0,), std=(1.0,))(images, generator=_gen())
    assert out.dtype == torch.float32
    assert torch.equal(out, images.float() / 255)


def test_eval_mode_is_deterministic_and_matches_torchvision():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=_gen(5))
    augment = BatchAugment(crop_padding=4, flip=True, mean=CIFAR100_MEAN, std=CIFAR100_STD).evaluation()
    first, second = augment(images, generator=_gen(0)), augment(images, generator=_gen(1))
    assert torch.equal(first, second)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    expected = torch.stack([reference(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)


def test_grey_images_are_padded_to_32_and_repeated_to_3_channels():
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=_gen(6))
    augment = BatchAugment(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, pad_to=32, channels=3, train=False)
    out = augment(images)
    assert out.shape == (4, 3, 32, 32)
    assert augment.output_size((1, 28, 28)) == (3, 32, 32)
    assert torch.equal(out[:, 0], out[:, 2])
    mean, std = FASHION_MNIST_MEAN[0], FASHION_MNIST_STD[0]
    torch.testing.assert_close(out[:, :, 2:30, 2:30], to_model_input(images)[:, :, 2:30, 2:30])
    # The border is raw black (0) padding, normalised like any other black pixel.
    torch.testing.assert_close(out[:, :, :2], torch.full_like(out[:, :, :2], (0 - mean) / std))


def test_channels_last_output():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    out = BatchAugment(crop_padding=2, flip=True, channels_last=True)(images, generator=_gen())
    assert out.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- CIFAR reader


def _batch_file(obj) -> bytes:
    # The real files are Python 2 pickles (protocol 2) naming numpy.core.multiarray, as here.
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.", b"numpy.core.")


def _fake_cifar100(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n).tolist()


def _cifar100_members() -> dict[str, bytes]:
    train, test = _fake_cifar100(7, 0), _fake_cifar100(3, 1)
    batch = lambda data, labels: {b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)], b"coarse_label_names": []}
    return {
        "train": _batch_file(batch(*train)),
        "test": _batch_file(batch(*test)),
        "meta": _batch_file(meta),
    }


def _check_cifar100(root):
    data, labels = _fake_cifar100(7, 0)
    images, targets = load_cifar(root, "cifar100", "train")
    assert images.shape == (7, 3, 32, 32) and images.dtype == torch.uint8
    assert targets.dtype == torch.int64 and targets.tolist() == labels
    # 3072 bytes per row: red plane, green plane, blue plane, each row-major 32 x 32.
    assert images[2, 0, 0, 1] == data[2, 1] and images[2, 1, 3, 5] == data[2, 1024 + 3 * 32 + 5]
    assert images[4, 2, 31, 31] == data[4, 3071]
    assert load_cifar(root, "cifar100", "test")[0].shape == (3, 3, 32, 32)
    assert cifar_class_names(root, "cifar100")[5] == "class5"


def test_cifar100_from_extracted_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, payload in _cifar100_members().items():
        (folder / name).write_bytes(payload)
    _check_cifar100(tmp_path)
    _check_cifar100(folder)  # the extracted folder itself


def test_cifar100_from_archive(tmp_path):
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name, payload in _cifar100_members().items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    _check_cifar100(tmp_path)
    assert not (tmp_path / "cifar-100-python").exists()  # read in place, nothing extracted


def test_cifar10_batches_are_concatenated(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        payload = {b"data": np.full((2, 3072), i, dtype=np.uint8), b"labels": [i, 9 - i]}
        (folder / name).write_bytes(_batch_file(payload))
    images, labels = load_cifar(tmp_path, "cifar10", "train")
    assert images.shape == (10, 3, 32, 32)
    assert labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    assert images[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    bundle = build_datasets("cifar10", tmp_path, batch_size=4, subset=6)
    assert (bundle.num_classes, bundle.input_size, bundle.num_samples) == (10, (3, 32, 32), 6)
    assert bundle.class_names is None  # no batches.meta here


def test_missing_cifar_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python\.tar\.gz.*cifar-100-python/") as info:
        load_cifar(tmp_path, "cifar100", "train")
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_cifar_refuses_foreign_objects_in_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(pickle.UnpicklingError):
        load_cifar(tmp_path, "cifar100", "test")


# ----------------------------------------------------------------------------- ImageFolder


def _image_tree(root, classes=("cat", "dog", "eel"), per_class=4):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                suffix = "png" if i % 2 else "JPEG"
                Image.fromarray(pixels).save(root / split / c / f"{i}.{suffix}")


def test_imagefolder_bundle(tmp_path):
    _image_tree(tmp_path)
    bundle = build_datasets("imagefolder", tmp_path, batch_size=5, eval_batch_size=4, workers=0, image_size=32)
    assert bundle.class_names == ("cat", "dog", "eel") and bundle.num_classes == 3
    assert bundle.input_size == (3, 32, 32) and bundle.num_samples == 12
    assert bundle.train_targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(bundle.train) == 3 and len(bundle.test) == 3
    bundle.train.set_epoch(1)
    seen = []
    for images, labels, indices in (astuple(b) for b in bundle.train):
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert torch.equal(labels, bundle.train_targets[indices])
        seen += indices.tolist()
    assert sorted(seen) == list(range(12))
    test_seen = torch.cat([b.index for b in bundle.test])
    assert test_seen.tolist() == list(range(12))  # eval order is the dataset order


def test_imagefolder_eval_transform_and_workers(tmp_path):
    _image_tree(tmp_path, classes=("a", "b"), per_class=2)
    dataset = load_image_folder(tmp_path, "val", imagenet_transforms(False, image_size=24, resize_size=28))
    loader = ImageFolderLoader(dataset, 4, train=False, num_workers=2, world_size=2, rank=1)
    batches = list(loader)
    assert len(loader) == 1 and batches[0].index.tolist() == [1, 3]  # every 2nd sample from rank 1
    assert batches[0].image.shape == (2, 3, 24, 24)


def test_imagefolder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class name>"):
        build_datasets("imagefolder", tmp_path / "nowhere")
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        load_image_folder(tmp_path, "train")


# ----------------------------------------------------------------------------- TensorLoader


def _loader(n=103, batch=10, **kwargs) -> TensorLoader:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    options = dict(shuffle=True, drop_last=False, seed=7, augment=BatchAugment(), device="cpu")
    options.update(kwargs)
    return TensorLoader(images, torch.arange(n) % 5, batch, **options)


def _epoch_indices(loader: TensorLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    out = []
    for images, labels, indices in (astuple(b) for b in loader):
        assert indices.dtype == torch.int64
        assert torch.equal(images[:, 0, 0, 0], indices.float() / 255)  # images follow their indices
        assert torch.equal(labels, indices % 5)
        out += indices.tolist()
    return out


def test_tensor_loader_covers_each_sample_once_in_a_new_order_per_epoch():
    loader = _loader()
    assert len(loader) == 11
    first, second = _epoch_indices(loader, 0), _epoch_indices(loader, 1)
    assert sorted(first) == sorted(second) == list(range(103))
    assert first != second
    assert _epoch_indices(_loader(), 1) == second  # same (seed, epoch): same order, e.g. after resume
    assert _epoch_indices(_loader(seed=8), 1) != second
    assert _epoch_indices(_loader(shuffle=False), 3) == list(range(103))
    assert sorted(_epoch_indices(loader, -1)) == list(range(103))  # e.g. a pre-training stage's epochs


def test_tensor_loader_drop_last():
    loader = _loader(drop_last=True)
    assert len(loader) == 10
    indices = _epoch_indices(loader, 0)
    assert len(indices) == 100 and len(set(indices)) == 100


def test_tensor_loader_shards_across_ranks():
    ranks = [_loader(n=100, batch=10, world_size=2, rank=r) for r in range(2)]
    assert [len(r) for r in ranks] == [10, 10]
    shards = [_epoch_indices(r, 2) for r in ranks]
    assert all(len(s) == 50 for s in shards)
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(100))
    assert all(b.image.shape[0] == 5 for b in ranks[0])  # global batch 10 -> 5 per rank
    # Uneven: padded like DistributedSampler, every rank runs the same number of batches.
    uneven = [_epoch_indices(_loader(n=101, batch=10, world_size=2, rank=r), 0) for r in range(2)]
    assert len(uneven[0]) == len(uneven[1]) == 51 and set(uneven[0]) | set(uneven[1]) == set(range(101))
    # Evaluation shards: no padding, every sample exactly once.
    eval_shards = [_epoch_indices(_loader(n=101, world_size=2, rank=r, even_shards=False), 0) for r in range(2)]
    assert sorted(eval_shards[0] + eval_shards[1]) == list(range(101))


def test_tensor_loader_augmentation_is_reproducible_per_epoch():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=_gen(9))
    make = lambda: TensorLoader(images, torch.zeros(40, dtype=torch.int64), 8, shuffle=True, drop_last=False,
                                seed=1, augment=BatchAugment(crop_padding=2, flip=True), device="cpu")
    a, b = make(), make()
    a.set_epoch(4)
    b.set_epoch(4)
    for (xa, _, ia), (xb, _, ib) in zip(map(astuple, a), map(astuple, b)):
        assert torch.equal(xa, xb) and torch.equal(ia, ib)
    first = torch.cat([b.image for b in a])
    a.set_epoch(5)
    assert not torch.equal(first, torch.cat([b.image for b in a]))


def test_balanced_subset():
    labels = torch.arange(1000) % 10
    keep = subset_indices(labels, 50, seed=0)
    assert torch.equal(labels[keep].bincount(), torch.full((10,), 5))
    assert torch.equal(keep, subset_indices(labels, 50, seed=0)) and not torch.equal(keep, subset_indices(labels, 50, seed=1))
    assert subset_indices(labels, 3, mode="first").tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_real_files_and_bundle(fashion_test_set):
    test_images, test_labels = fashion_test_set
    assert test_images.shape == (10000, 1, 28, 28) and test_labels.shape == (10000,)
    images, labels = load_fashion_mnist(split="train")
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.unique().tolist() == list(range(10))
    bundle = build_datasets("fashion_mnist", batch_size=64, subset=300, seed=3)
    assert (bundle.num_classes, bundle.input_size, bundle.num_samples) == (10, (3, 32, 32), 300)
    assert torch.equal(bundle.train_targets.bincount(), torch.full((10,), 30))
    assert len(bundle.class_names) == 10 and len(bundle.train) == 5 and len(bundle.test) == 5
    images, labels, indices = astuple(next(iter(bundle.train)))
    assert images.shape == (64, 3, 32, 32) and torch.equal(labels, bundle.train_targets[indices])
    test_images = torch.cat([b.image for b in bundle.test])
    assert test_images.shape == (300, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_loader_on_cuda_matches_cpu_order_and_eval_output():
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8, generator=_gen(10))
    labels = torch.arange(50) % 10
    augment = BatchAugment.for_dataset("fashion_mnist", crop_padding=4, flip=True, pad_to=32, channels=3)
    loaders = {
        device: TensorLoader(images, labels, 16, shuffle=True, drop_last=False, seed=2, augment=augment, device=device)
        for device in ("cpu", "cuda")
    }
    cpu, gpu = list(loaders["cpu"]), list(loaders["cuda"])
    for (xc, yc, ic), (xg, yg, ig) in zip(cpu, gpu):
        assert xg.is_cuda and yg.is_cuda and ig.is_cuda and xg.shape == (len(ic), 3, 32, 32)
        assert torch.equal(ic, ig.cpu()) and torch.equal(yc, yg.cpu())  # the order does not depend on the device
    evaluation = augment.evaluation()
    torch.testing.assert_close(evaluation(images.cuda()).cpu(), evaluation(images))


def test_label_uniform_draws_a_distinct_label_uniformly_then_one_of_its_images():
    # 0.3 appears 90 times, 0.7 ten times: a label-uniform epoch sees each about half the time
    labels = torch.cat([torch.full((90,), 0.3), torch.full((10,), 0.7)])[torch.randperm(100)]
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    loader = TensorLoader(images, labels, 10, shuffle=True, drop_last=True, seed=4, device="cpu",
                          augment=BatchAugment(train=False), label_uniform=True)
    draws = []
    for epoch in range(40):
        loader.set_epoch(epoch)
        for batch in loader:
            assert torch.equal(batch.targets, labels[batch.index])  # each image carries its own label
            draws.append(batch.index)
    drawn = torch.cat(draws)
    assert len(drawn) == 40 * 100
    share = (labels[drawn] == 0.7).double().mean().item()
    assert abs(share - 0.5) < 0.04  # the label frequency is 0.1; uniform over distinct labels gives 0.5
    rare = torch.nonzero(labels == 0.7).flatten()
    assert set(drawn[labels[drawn] == 0.7].tolist()) == set(rare.tolist())  # every member can be drawn
    loader.set_epoch(3)
    again = torch.cat([b.index for b in loader])
    assert torch.equal(again, torch.cat(draws[30:40]))  # seeded by (seed, epoch): resumable
    with pytest.raises(ValueError, match="shuffle"):
        TensorLoader(images, labels, 10, shuffle=False, drop_last=True, seed=0, device="cpu",
                     augment=BatchAugment(train=False), label_uniform=True)
