"""Datasets, augmentation and the deterministic, rank-sharded batch order.

Determinism does not depend on worker processes, ranks or restarts:

- the order of an epoch is a permutation drawn from a generator seeded with ``(seed, epoch)``;
- global batch ``i`` is ``perm[i*B:(i+1)*B]``; rank ``r`` of ``W`` takes every ``W``-th image of it,
  so one process with batch B and W processes with B/W each see the same global batches;
- each image's augmentation draws from the torch RNG seeded with ``(seed, epoch, index)``.

A resumed run therefore needs only the epoch number to replay the data exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig
from .errors import RecipeError, RecipePathError

__all__ = [
    "Cutout",
    "DataSplits",
    "EpochBatches",
    "SeededDataset",
    "SyntheticImages",
    "balanced_prefix",
    "build_data",
    "derive_seed",
    "make_loader",
]

# Per-channel statistics of the training sets.
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (the same in every process and run)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Cutout:
    """Zero a ``size`` x ``size`` square at a uniformly random centre (DeVries & Taylor 2017).

    The square may extend past the border, as in the official implementation. Applied to a
    normalized ``C x H x W`` tensor; draws from the torch RNG.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy = int(torch.randint(h, (1,)))
        cx = int(torch.randint(w, (1,)))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size // 2)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0.0
        return img

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"


class SyntheticImages(Dataset):
    """Seeded random ``uint8`` images with learnable labels: each class blends a fixed coarse (4x4
    blocks) random pattern with uniform noise, so a model beats chance within a few steps, crops and
    flips included. For tests and dry runs.

    Args:
        n: number of images.
        num_classes: number of classes (labels cycle through them).
        size: image side.
        split: ``train`` or ``test``: the class patterns are shared, the noise is not.
    """

    def __init__(self, n: int, num_classes: int, size: int, split: str) -> None:
        g = torch.Generator().manual_seed(derive_seed("synthetic", "patterns"))
        coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
        protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
        self.targets = [i % num_classes for i in range(n)]
        g = torch.Generator().manual_seed(derive_seed("synthetic", split))
        noise = torch.rand(n, 3, size, size, generator=g)
        labels = torch.tensor(self.targets)
        self.images = ((0.5 * protos[labels] + 0.5 * noise) * 255).round().to(torch.uint8)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.images[idx], self.targets[idx]


class SeededDataset(Dataset):
    """Applies ``transform`` with the torch RNG seeded per sample.

    Indexed by ``(index, sample_seed)`` pairs, as :class:`EpochBatches` yields them, so the
    augmentation of an image depends only on the sampler, never on the worker or rank that loads it.
    """

    def __init__(self, base: Any, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        idx, sample_seed = key
        img, label = self.base[idx]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue seeds for every accelerator
            torch.default_generator.manual_seed(sample_seed)
            return self.transform(img), label


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """This rank's share of each global batch of one epoch, as ``(index, sample_seed)`` pairs.

    The sample seed is derived from ``(seed, epoch, index)`` when shuffling (training) and is 0 for
    evaluation, whose transforms draw nothing.

    Args:
        n: dataset size.
        batch_size: global batch size.
        rank: this rank.
        world_size: number of ranks.
        epoch: epoch number (seeds the permutation and the augmentation).
        seed: data-order and augmentation seed.
        shuffle: permute (training) or keep the dataset order (evaluation).
        drop_last: drop the last incomplete global batch (training).
        start: first global batch to yield (0 for a whole epoch).
        stop: global batch to stop before (``None``: the end of the epoch).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.epoch, self.seed, self.shuffle, self.drop_last = epoch, seed, shuffle, drop_last
        total = n // batch_size if drop_last else math.ceil(n / batch_size)
        self.start, self.stop = start, total if stop is None else min(stop, total)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for i in range(self.start, self.stop):
            shard = order[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world]
            if shard:  # the last evaluation batch may leave a rank nothing
                yield [(idx, derive_seed(self.seed, self.epoch, idx) if self.shuffle else 0) for idx in shard]


def balanced_prefix(targets: Sequence[int], n: int) -> list[int]:
    """Indices of the first ``n`` images in class-interleaved order.

    The order takes the first image of every class, then the second of every class, and so on, so a
    prefix of a class-sorted folder still covers all classes. Deterministic.
    """
    seen: dict[int, int] = {}
    rank_in_class = []
    for t in targets:
        rank_in_class.append(seen.get(int(t), 0))
        seen[int(t)] = rank_in_class[-1] + 1
    order = sorted(range(len(targets)), key=lambda i: (rank_in_class[i], int(targets[i]), i))
    return sorted(order[:n])


class _Subset(Dataset):
    def __init__(self, base: Any, indices: list[int]) -> None:
        self.base, self.indices = base, indices
        targets = base.targets
        self.targets = [targets[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> Any:
        return self.base[self.indices[idx]]


@dataclass(frozen=True)
class DataSplits:
    """Training and test data of a recipe.

    Attributes:
        train: training set, indexed by ``(index, sample_seed)``.
        test: test set, indexed the same way (its transform draws nothing).
        num_classes: classifier outputs.
        input_size: ``(C, H, W)`` the model sees.
    """

    train: SeededDataset
    test: SeededDataset
    num_classes: int
    input_size: tuple[int, int, int]


def _transforms(cfg: DataConfig, size: int, from_pil: bool) -> tuple[Any, Any]:
    import torchvision.transforms as T

    mean, std = _STATS[cfg.dataset]
    to_float = [T.ToTensor()] if from_pil else [T.ConvertImageDtype(torch.float32)]
    norm = T.Normalize(mean, std)
    if cfg.dataset == "imagenet":
        resize = round(size * 256 / 224)
        train = [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), *to_float, norm]
        test = [T.Resize(resize, antialias=True), T.CenterCrop(size), *to_float, norm]
    else:
        train = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), *to_float, norm]
        if cfg.cutout > 0:
            train.append(Cutout(cfg.cutout))
        test = [*to_float, norm]
    return T.Compose(train), T.Compose(test)


def _imagefolder_split(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise RecipePathError(
        f"no {' or '.join(names)} folder in data root {root} (expected ImageFolder layout ROOT/{names[0]}/<class>/*)"
    )


def _cifar_torchvision_dir(cfg: DataConfig) -> str:
    return "cifar-10-batches-py" if cfg.dataset == "cifar10" else "cifar-100-python"


def _load_real(cfg: DataConfig) -> tuple[Any, Any]:
    """The raw train and test datasets (PIL images) from ``cfg.root``."""
    import torchvision.datasets as D

    if cfg.root is None:
        raise RecipePathError(
            f"no data root for {cfg.dataset}: pass --data-dir DIR or set data.root (or data.synthetic=true)"
        )
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise RecipePathError(f"data root {root} does not exist (from --data-dir or data.root)")
    fmt = cfg.format
    if fmt == "auto":
        fmt = (
            "torchvision"
            if cfg.dataset != "imagenet" and (root / _cifar_torchvision_dir(cfg)).is_dir()
            else "imagefolder"
        )
    if fmt == "torchvision":
        if cfg.dataset == "imagenet":
            raise RecipeError("data.format=torchvision is for CIFAR; ImageNet uses data.format=imagefolder")
        cls = D.CIFAR10 if cfg.dataset == "cifar10" else D.CIFAR100
        try:
            return cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
        except RuntimeError as e:
            raise RecipePathError(
                f"no {cfg.dataset} in torchvision format under {root} (expected {root / _cifar_torchvision_dir(cfg)}): {e}"
            ) from e
    train = D.ImageFolder(str(_imagefolder_split(root, ("train",))))
    test = D.ImageFolder(str(_imagefolder_split(root, ("test", "val"))))
    if train.classes != test.classes:
        raise RecipeError(
            f"train and test folders under {root} have different classes ({len(train.classes)} vs {len(test.classes)})"
        )
    return train, test


def build_data(cfg: DataConfig) -> DataSplits:
    """Build the training and test sets of ``cfg`` (synthetic data always has the same seed).

    Args:
        cfg: data config.

    Raises:
        RecipePathError: missing data root or split folder.
        RecipeError: inconsistent data.
    """
    default_size = 224 if cfg.dataset == "imagenet" else 32
    size = cfg.image_size or default_size
    if cfg.synthetic:
        num_classes = _NUM_CLASSES[cfg.dataset]
        raw = round(size * 256 / 224) if cfg.dataset == "imagenet" else size
        train_raw: Any = SyntheticImages(cfg.train_subset or 1024, num_classes, raw, "train")
        test_raw: Any = SyntheticImages(cfg.test_subset or 256, num_classes, raw, "test")
        from_pil = False
    else:
        train_raw, test_raw = _load_real(cfg)
        from_pil = True
        num_classes = len(getattr(train_raw, "classes", [])) or _NUM_CLASSES[cfg.dataset]
        if cfg.train_subset is not None:
            train_raw = _Subset(train_raw, balanced_prefix(train_raw.targets, cfg.train_subset))
        if cfg.test_subset is not None:
            test_raw = _Subset(test_raw, balanced_prefix(test_raw.targets, cfg.test_subset))
    train_tf, test_tf = _transforms(cfg, size, from_pil)
    return DataSplits(
        train=SeededDataset(train_raw, train_tf),
        test=SeededDataset(test_raw, test_tf),
        num_classes=num_classes,
        input_size=(3, size, size),
    )


def make_loader(dataset: Dataset, batches: EpochBatches, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over ``batches`` (a fresh one per epoch: the batch order is the epoch's)."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory)
