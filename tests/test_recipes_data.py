"""Datasets and the deterministic, rank-sharded batch order (tiny data made in temp dirs)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from morph.recipes.config import DataConfig
from morph.recipes.data import Cutout, EpochBatches, balanced_prefix, build_data, make_loader
from PIL import Image


@pytest.fixture(autouse=True)
def _data_cache_in_tmp(tmp_path, monkeypatch):
    """The tensor path's decoded-data cache goes to the test's temp dir, not ~/.cache."""
    monkeypatch.setenv("MORPH_DATA_CACHE", str(tmp_path / "data-cache"))


def test_ranks_split_each_global_batch_and_order_depends_only_on_seed_and_epoch():
    one = list(EpochBatches(50, 8, epoch=3, seed=1))
    two = [list(EpochBatches(50, 8, rank=r, world_size=2, epoch=3, seed=1)) for r in range(2)]
    assert len(one) == 6 and all(len(b) == 8 for b in one)  # drop_last: 6 full batches of 50
    for i, batch in enumerate(one):
        assert sorted(two[0][i] + two[1][i]) == sorted(batch)  # the same global batch, split
        assert len(two[0][i]) == len(two[1][i]) == 4
    assert one == list(EpochBatches(50, 8, epoch=3, seed=1))
    assert [i for i, _ in one[0]] != [i for i, _ in next(iter(EpochBatches(50, 8, epoch=4, seed=1)))]
    seeds = {s for b in one for _, s in b}
    assert len(seeds) == 48  # a distinct augmentation seed per image
    part = list(EpochBatches(50, 8, epoch=3, seed=1, stop=2))
    assert part == one[:2]


def test_evaluation_batches_cover_everything_once():
    shards = [list(EpochBatches(10, 4, rank=r, world_size=3, shuffle=False, drop_last=False)) for r in range(3)]
    seen = sorted(i for s in shards for b in s for i, seed in b if seed == 0)
    assert seen == list(range(10))
    assert all(b for s in shards for b in s)  # an empty shard is skipped, not yielded


def test_balanced_prefix_covers_every_class_of_a_sorted_folder():
    targets = [0] * 5 + [1] * 5 + [2] * 5
    idx = balanced_prefix(targets, 6)
    assert sorted(targets[i] for i in idx) == [0, 0, 1, 1, 2, 2]
    assert idx == balanced_prefix(targets, 6) and idx[:2] == [0, 1]


def test_augmentation_depends_on_the_sample_seed_only():
    cfg = DataConfig(synthetic=True, train_subset=8, test_subset=4, image_size=16, num_workers=0)
    data = build_data(cfg)
    torch.manual_seed(0)
    a = data.train[(3, 12345)][0]
    torch.manual_seed(99)
    b = data.train[(3, 12345)][0]
    c = data.train[(3, 54321)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(data.test[(1, 0)][0], data.test[(1, 0)][0])
    assert data.num_classes == 10 and data.input_size == (3, 16, 16)


def test_cutout_zeroes_one_square():
    torch.manual_seed(0)
    out = Cutout(4)(torch.ones(3, 16, 16))
    zeros = (out == 0).all(0)
    assert 1 <= int(zeros.sum()) <= 16
    rows, cols = zeros.nonzero(as_tuple=True)
    assert int(rows.max() - rows.min()) < 4 and int(cols.max() - cols.min()) < 4


def _image_folder(root, split, classes, per_class, size=32):
    rng = np.random.default_rng(0)
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")


def test_imagefolder_layout_with_subset(tmp_path):
    _image_folder(tmp_path, "train", ["cat", "dog", "emu"], 4)
    _image_folder(tmp_path, "test", ["cat", "dog", "emu"], 2)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), train_subset=6, num_workers=0)
    data = build_data(cfg)
    assert len(data.train) == 6 and len(data.test) == 6 and data.num_classes == 3
    assert sorted(data.train.base.targets) == [0, 0, 1, 1, 2, 2]  # the subset keeps every class
    x, y = data.train[(0, 7)]
    assert x.shape == (3, 32, 32) and y == 0
    assert data.input_size == (3, 32, 32)


def test_imagenet_transforms(tmp_path):
    _image_folder(tmp_path, "train", ["a", "b"], 2, size=40)
    _image_folder(tmp_path, "val", ["a", "b"], 1, size=40)
    data = build_data(DataConfig(dataset="imagenet", root=str(tmp_path), image_size=24, num_workers=0))
    assert data.train[(0, 1)][0].shape == (3, 24, 24)  # RandomResizedCrop
    assert data.test[(0, 0)][0].shape == (3, 24, 24)  # resize 24*256/224, centre crop
    assert data.num_classes == 2


def test_cifar_in_torchvision_format(tmp_path, monkeypatch):
    import torchvision.datasets as D

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}

    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (base / name).write_bytes(pickle.dumps(batch(4)))
    (base / "test_batch").write_bytes(pickle.dumps(batch(5)))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: True)  # not the real files' md5
    data = build_data(DataConfig(dataset="cifar10", root=str(tmp_path), num_workers=0))  # format auto
    assert isinstance(data.train.base, D.CIFAR10)
    assert len(data.train) == 20 and len(data.test) == 5 and data.num_classes == 10
    assert data.train[(0, 3)][0].shape == (3, 32, 32)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --data-dir DIR or set data.root"):
        build_data(DataConfig(root=None))
    with pytest.raises(FileNotFoundError, match=f"data root {tmp_path / 'nope'} does not exist"):
        build_data(DataConfig(root=str(tmp_path / "nope")))
    _image_folder(tmp_path, "train", ["a"], 1)
    with pytest.raises(FileNotFoundError, match="no test or val folder in data root"):
        build_data(DataConfig(root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no cifar100 in torchvision format"):
        build_data(DataConfig(dataset="cifar100", format="torchvision", root=str(tmp_path)))


def test_worker_processes_load_the_same_batches():
    data = build_data(DataConfig(synthetic=True, train_subset=12, test_subset=4, image_size=8, num_workers=0))

    def epoch(workers):
        loader = make_loader(data.train, EpochBatches(12, 4, epoch=1, seed=5), workers, pin_memory=False)
        return [(x, y) for x, y in loader]

    for (x0, y0), (x2, y2) in zip(epoch(0), epoch(2), strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
