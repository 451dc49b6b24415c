"""Datasets, augmentation and the deterministic, rank-sharded batch order.

Two data paths (``data.loader``):

- ``tensor`` (CIFAR's default): the data set is decoded once into a ``uint8`` tensor cache (one
  safetensors file per split, see :func:`load_cached_split`), kept whole on the training device, and
  augmented a batch at a time with tensor ops there (:class:`BatchAugment`: pad-crop and flip as one
  gather, then normalization and cutout), as fast CIFAR trainers do (airbench's ``CifarLoader``).
- ``stream`` (ImageNet's): per-image decoding and torchvision transforms in DataLoader workers.

Determinism does not depend on worker processes, ranks or restarts, on either path:

- the order of an epoch is a permutation drawn from a generator seeded with ``(seed, epoch)``;
- global batch ``i`` is ``perm[i*B:(i+1)*B]``; rank ``r`` of ``W`` takes every ``W``-th image of it,
  so one process with batch B and W processes with B/W each see the same global batches;
- ``stream``: each image's augmentation draws from the torch RNG seeded with ``(seed, epoch, index)``;
  ``tensor``: the augmentation parameters of every image of an epoch (crop offsets, flip, cutout
  centre) are drawn at once from a generator seeded with ``(seed, epoch)`` and indexed by image.

A resumed run therefore needs only the epoch number to replay the data exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from morph.images import ImageError, image_folder, open_rgb
from morph.paths import write_file
from morph.text import printable

from .config import DataConfig
from .errors import RecipeError, RecipePathError

__all__ = [
    "BatchAugment",
    "Cutout",
    "DataSplits",
    "EpochBatches",
    "SeededDataset",
    "SyntheticImages",
    "TensorImages",
    "TensorSplits",
    "balanced_prefix",
    "build_data",
    "data_cache_dir",
    "data_loader_kind",
    "derive_seed",
    "load_cached_split",
    "make_loader",
    "tensor_batches",
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

    def indices(self) -> Iterator[torch.Tensor]:
        """This rank's image indices of each global batch (the order :meth:`__iter__` yields, without
        the per-image seeds the tensor path does not need)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        for i in range(self.start, self.stop):
            shard = order[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world]
            if len(shard):  # the last evaluation batch may leave a rank nothing
                yield shard

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for shard in self.indices():
            yield [(idx, derive_seed(self.seed, self.epoch, idx) if self.shuffle else 0) for idx in shard.tolist()]


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


# ----------------------------------------------------------------------------------------------
# The tensor path: a decoded uint8 cache, batched augmentation on the training device


@dataclass(frozen=True)
class TensorImages:
    """A whole split as tensors.

    Attributes:
        images: ``uint8`` ``N x C x H x W``.
        targets: ``int64`` ``N``.
    """

    images: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def to(self, device: torch.device | str) -> TensorImages:
        return TensorImages(self.images.to(device), self.targets.to(device))


class BatchAugment:
    """CIFAR augmentation of whole batches with tensor ops: random crop of ``size`` from the image
    zero-padded by ``padding`` and horizontal flip (one gather on the ``uint8`` batch), then
    normalization and cutout (DeVries & Taylor: a ``cutout`` square at a uniform centre, clipped at the
    border, set to 0 after normalization). The same augmentation as the ``stream`` path's
    ``RandomCrop(size, padding) / RandomHorizontalFlip / Normalize / Cutout``, with the random draws
    made per epoch instead of per image (:meth:`draw`).

    Args:
        mean: per-channel mean (of ``[0, 1]`` pixels).
        std: per-channel std.
        size: output side.
        padding: zero padding before the crop.
        cutout: side of the cutout square (0: off).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int, padding: int = 4, cutout: int = 0) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.size, self.padding, self.cutout = size, padding, cutout
        self._consts: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def draw(self, n: int, raw: tuple[int, int], seed: int, epoch: int) -> torch.Tensor:
        """The augmentation of every image of one epoch: ``int64 n x 5`` (crop row, crop column, flip,
        cutout centre row, cutout centre column), from a CPU generator seeded with ``(seed, epoch)``, so
        every rank and every rerun draws the same values; rows are indexed by image."""
        g = torch.Generator().manual_seed(derive_seed(seed, epoch, "augment"))
        h, w = raw
        span_y, span_x = h + 2 * self.padding - self.size + 1, w + 2 * self.padding - self.size + 1
        if span_y < 1 or span_x < 1:
            raise RecipeError(f"cannot crop {self.size}x{self.size} from {h}x{w} images padded by {self.padding}")
        return torch.stack(
            [
                torch.randint(span_y, (n,), generator=g),
                torch.randint(span_x, (n,), generator=g),
                torch.randint(2, (n,), generator=g),
                torch.randint(self.size, (n,), generator=g),
                torch.randint(self.size, (n,), generator=g),
            ],
            dim=1,
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8`` -> normalized ``float32``."""
        key = (x.device, torch.float32)
        if key not in self._consts:
            mean = torch.tensor(self.mean, dtype=torch.float64).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float64).view(1, -1, 1, 1)
            # (v / 255 - mean) / std as one multiply and one subtract
            self._consts[key] = ((1.0 / (255.0 * std)).float().to(x.device), (mean / std).float().to(x.device))
        scale, shift = self._consts[key]
        return x.float().mul_(scale).sub_(shift)

    def __call__(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Augment the ``uint8`` batch ``x`` (``B x C x H x W``, on any device) with ``params`` (rows of
        :meth:`draw`); returns normalized ``float32`` ``B x C x size x size``."""
        b, c = x.shape[:2]
        dev, s, p = x.device, self.size, self.padding
        params = params.to(dev)
        if p:
            x = torch.nn.functional.pad(x, (p, p, p, p))
        ar = torch.arange(s, device=dev)
        rows = params[:, 0:1] + ar  # B x s
        flip = params[:, 2:3].bool()
        cols = params[:, 1:2] + torch.where(flip, s - 1 - ar, ar)  # the flip folded into the gather
        bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
        ci = torch.arange(c, device=dev).view(1, c, 1, 1)
        out = self.normalize(x[bi, ci, rows.view(b, 1, s, 1), cols.view(b, 1, 1, s)])
        if self.cutout > 0:
            half = self.cutout // 2
            cy, cx = params[:, 3:4], params[:, 4:5]
            in_y = (ar >= cy - half) & (ar < cy + half)  # B x s; the square may leave the image
            in_x = (ar >= cx - half) & (ar < cx + half)
            keep = ~(in_y.view(b, 1, s, 1) & in_x.view(b, 1, 1, s))
            out = out.mul_(keep)  # a multiply is faster than masked_fill on CPU
        return out


@dataclass(frozen=True)
class TensorSplits:
    """The tensor path's data: both splits as ``uint8`` tensors and the batch augmentation.

    Attributes:
        train: training split.
        test: test split.
        augment: the training augmentation (the test split is only normalized).
        cache: the cache files the splits came from (none for synthetic data).
    """

    train: TensorImages
    test: TensorImages
    augment: BatchAugment
    cache: tuple[Path, ...] = ()


def tensor_batches(
    data: TensorImages, batches: EpochBatches, augment: BatchAugment | None, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``(inputs, targets)`` of every batch of ``batches``, on ``device``.

    ``data`` should already live on ``device`` (then nothing is copied but the indices). Training
    batches (``batches.shuffle``) are augmented with the epoch's draws of ``augment``; evaluation
    batches are only normalized.
    """
    params = None
    if batches.shuffle and augment is not None:
        params = augment.draw(len(data), tuple(data.images.shape[-2:]), batches.seed, batches.epoch)
    norm = augment.normalize if augment is not None else (lambda t: t.float().div_(255.0))
    on_cpu = data.images.device.type == "cpu"
    for idx in batches.indices():
        dev_idx = idx.to(data.images.device)
        # On CPU, one batch's augmentation is a few small ops: one thread does them fastest, and
        # several threads spin against each other on a busy machine (measured: 10-50x slower).
        threads = torch.get_num_threads()
        if on_cpu:
            torch.set_num_threads(1)
        try:
            x = data.images.index_select(0, dev_idx)
            x = augment(x, params.index_select(0, idx)) if params is not None else norm(x)
            y = data.targets.index_select(0, dev_idx)
        finally:
            if on_cpu:
                torch.set_num_threads(threads)
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def data_cache_dir(cfg: DataConfig) -> Path:
    """Where decoded splits are cached: ``data.cache_dir``, else ``$MORPH_DATA_CACHE``, else
    ``~/.cache/morph/data``."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("MORPH_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "morph" / "data"


def _source_files(raw: Any) -> list[Path]:
    """The files a raw split is read from (their sizes and times fingerprint the cache)."""
    if hasattr(raw, "samples"):  # ImageFolder
        return [Path(p) for p, _ in raw.samples]
    root = Path(raw.root) / raw.base_folder  # torchvision CIFAR
    return [root / name for name, _ in (raw.train_list if raw.train else raw.test_list)]


def _fingerprint(raw: Any, files: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(list(getattr(raw, "classes", []))).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode(raw: Any, label: str, say: Any) -> TensorImages:
    """Every image of ``raw`` as one ``uint8`` tensor."""
    import numpy as np

    if isinstance(getattr(raw, "data", None), np.ndarray):  # torchvision CIFAR: already decoded, N x H x W x C
        images = torch.from_numpy(np.ascontiguousarray(raw.data)).permute(0, 3, 1, 2).contiguous()
        return TensorImages(images, torch.as_tensor(list(raw.targets), dtype=torch.int64))
    n, t0 = len(raw.samples), time.perf_counter()
    first = None
    out: torch.Tensor | None = None
    for i, (path, _) in enumerate(raw.samples):
        a = np.array(open_rgb(path))  # a writable copy; a corrupt, truncated or huge image names its file
        if out is None:
            first = a.shape
            out = torch.empty((n, a.shape[2], a.shape[0], a.shape[1]), dtype=torch.uint8)
        if a.shape != first:
            raise RecipeError(
                f"{printable(path)}: {a.shape[1]}x{a.shape[0]} image among {first[1]}x{first[0]} ones; the tensor data path "
                "needs one image size: resize the data set or use data.loader=stream"
            )
        out[i] = torch.from_numpy(a).permute(2, 0, 1)
        if say is not None and (i + 1) % 10000 == 0:
            say(f"  decoded {i + 1:,}/{n:,} {label} images ({time.perf_counter() - t0:.0f} s)")
    if out is None:
        raise RecipeError(f"no images in the {label} split")
    return TensorImages(out, torch.as_tensor(list(raw.targets), dtype=torch.int64))


def load_cached_split(raw: Any, cfg: DataConfig, split: str, say: Any = print) -> tuple[TensorImages, Path]:
    """A raw split (``ImageFolder`` or torchvision CIFAR) decoded into ``uint8`` tensors, through the cache.

    The cache file is ``<data_cache_dir>/<dataset>-<split>-<hash of the source path>.safetensors``. It
    records a fingerprint of the source (every file's path, size and modification time, and the
    class names); a cache whose fingerprint differs is rebuilt. Files are written to a temporary name
    and moved into place, so a crash never leaves a half-written cache, and concurrent writers are
    harmless. Under ``torchrun``, rank 0 builds it while the others wait.

    Args:
        raw: the dataset as :func:`build_data` reads it (a subset is taken after the cache).
        cfg: data config (``cache_dir``).
        split: ``train`` or ``test``.
        say: prints the cache's location and what was done (``None``: silent).

    Returns:
        The tensors and the cache file.
    """
    import torch.distributed as tdist
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    files = _source_files(raw)
    source = str(Path(files[0]).parent.parent.resolve()) if hasattr(raw, "samples") else str(Path(raw.root).resolve())
    key = hashlib.blake2b(f"{source}\0{split}".encode(), digest_size=6).hexdigest()
    path = data_cache_dir(cfg) / f"{cfg.dataset}-{split}-{key}.safetensors"
    fp = _fingerprint(raw, files)
    dist_on = tdist.is_available() and tdist.is_initialized()
    rank = tdist.get_rank() if dist_on else 0

    want = torch.as_tensor(list(raw.targets), dtype=torch.int64)  # a cache with other labels is stale

    def read() -> TensorImages | None:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != fp or set(f.keys()) != {"images", "targets"}:
                    return None
                shape = tuple(f.get_slice("images").get_shape())
                if len(shape) != 4 or shape[1] != 3 or tuple(f.get_slice("targets").get_shape()) != shape[:1]:
                    return None  # not what this code writes: rebuilt
                images, targets = f.get_tensor("images"), f.get_tensor("targets")
                if images.dtype != torch.uint8 or targets.dtype != torch.int64 or not torch.equal(targets, want):
                    return None
                return TensorImages(images, targets)
        except (OSError, SafetensorError):
            return None

    out = read() if path.exists() else None
    if out is None and rank == 0:
        t0 = time.perf_counter()
        reason = "source changed" if path.exists() else "first use"
        if say:
            say(f"data cache: decoding {len(files) if hasattr(raw, 'samples') else len(raw):,} {split} images of {printable(source)} ({reason})")
        out = _decode(raw, split, say)
        meta = {"fingerprint": fp, "source": source, "split": split, "format": "morph-data-cache/1"}
        tensors = {"images": out.images.contiguous(), "targets": out.targets}
        write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), option="data cache")
        if say:
            say(f"data cache: wrote {printable(path)} ({out.images.numel() / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f} s)")
    elif say and out is not None:
        say(f"data cache: {printable(path)} ({len(out):,} {split} images)")
    if dist_on:
        tdist.barrier()
    if out is None:  # another rank wrote it
        out = read()
        if out is None:
            raise RecipeError(f"data cache {printable(path)} is missing or stale after rank 0 built it (a shared cache dir?)")
    if len(out) != len(raw):
        raise RecipeError(f"data cache {printable(path)} holds {len(out)} images, the source {len(raw)}; delete it and rerun")
    return out, path


@dataclass(frozen=True)
class DataSplits:
    """Training and test data of a recipe.

    Attributes:
        train: training set, indexed by ``(index, sample_seed)`` (the ``stream`` path).
        test: test set, indexed the same way (its transform draws nothing).
        num_classes: classifier outputs.
        input_size: ``(C, H, W)`` the model sees.
        tensors: the same splits as ``uint8`` tensors with batched augmentation (the ``tensor`` path;
            ``None`` on the ``stream`` path). Its images are in the same order as ``train``/``test``.
    """

    train: SeededDataset
    test: SeededDataset
    num_classes: int
    input_size: tuple[int, int, int]
    tensors: TensorSplits | None = None


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
        f"no {' or '.join(names)} folder in data root {printable(root)} (expected ImageFolder layout ROOT/{names[0]}/<class>/*)"
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
        raise RecipePathError(f"data root {printable(root)} does not exist (from --data-dir or data.root)")
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
                f"no {cfg.dataset} in torchvision format under {printable(root)} (expected {printable(root / _cifar_torchvision_dir(cfg))}): {printable(e)}"
            ) from e
    train = image_folder(_imagefolder_split(root, ("train",)))
    test = image_folder(_imagefolder_split(root, ("test", "val")))
    if train.classes != test.classes:
        raise RecipeError(
            f"train and test folders under {printable(root)} have different classes ({len(train.classes)} vs {len(test.classes)})"
        )
    return train, test


def data_loader_kind(cfg: DataConfig) -> str:
    """``tensor`` or ``stream``: what ``data.loader`` resolves to (``auto``: tensor for CIFAR, stream for ImageNet)."""
    if cfg.loader == "auto":
        return "stream" if cfg.dataset == "imagenet" else "tensor"
    if cfg.loader == "tensor" and cfg.dataset == "imagenet":
        raise RecipeError("data.loader=tensor is for CIFAR-sized data; ImageNet streams (data.loader=stream or auto)")
    return cfg.loader


def build_data(cfg: DataConfig, say: Any = print) -> DataSplits:
    """Build the training and test sets of ``cfg`` (synthetic data always has the same seed).

    Args:
        cfg: data config.
        say: where the tensor path prints its cache's location (``None``: silent).

    Raises:
        RecipePathError: missing data root or split folder.
        RecipeError: inconsistent data.
    """
    default_size = 224 if cfg.dataset == "imagenet" else 32
    size = cfg.image_size or default_size
    kind = data_loader_kind(cfg)
    train_idx = test_idx = None
    if cfg.synthetic:
        num_classes = _NUM_CLASSES[cfg.dataset]
        raw = round(size * 256 / 224) if cfg.dataset == "imagenet" else size
        train_raw: Any = SyntheticImages(cfg.train_subset or 1024, num_classes, raw, "train")
        test_raw: Any = SyntheticImages(cfg.test_subset or 256, num_classes, raw, "test")
        from_pil = False
        full_train, full_test = train_raw, test_raw
    else:
        train_raw, test_raw = _load_real(cfg)
        full_train, full_test = train_raw, test_raw
        from_pil = True
        num_classes = len(getattr(train_raw, "classes", [])) or _NUM_CLASSES[cfg.dataset]
        if cfg.train_subset is not None:
            train_idx = balanced_prefix(train_raw.targets, cfg.train_subset)
            train_raw = _Subset(train_raw, train_idx)
        if cfg.test_subset is not None:
            test_idx = balanced_prefix(test_raw.targets, cfg.test_subset)
            test_raw = _Subset(test_raw, test_idx)
    train_tf, test_tf = _transforms(cfg, size, from_pil)
    tensors = None
    if kind == "tensor":
        mean, std = _STATS[cfg.dataset]
        augment = BatchAugment(mean, std, size, padding=4, cutout=cfg.cutout)
        if cfg.synthetic:
            tr = TensorImages(full_train.images, torch.as_tensor(full_train.targets, dtype=torch.int64))
            te = TensorImages(full_test.images, torch.as_tensor(full_test.targets, dtype=torch.int64))
            files: tuple[Path, ...] = ()
        else:
            tr, p_tr = load_cached_split(full_train, cfg, "train", say)
            te, p_te = load_cached_split(full_test, cfg, "test", say)
            files = (p_tr, p_te)
        if train_idx is not None:
            tr = TensorImages(tr.images[train_idx], tr.targets[train_idx])
        if test_idx is not None:
            te = TensorImages(te.images[test_idx], te.targets[test_idx])
        tensors = TensorSplits(train=tr, test=te, augment=augment, cache=files)
    return DataSplits(
        train=SeededDataset(train_raw, train_tf),
        test=SeededDataset(test_raw, test_tf),
        num_classes=num_classes,
        input_size=(3, size, size),
        tensors=tensors,
    )


class _Loader:
    """A DataLoader whose image errors stay one line: an :class:`~morph.images.ImageError` raised in a worker
    process comes back with the worker's traceback in its message; this gives back the error's own line."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.loader
        except ImageError as e:
            text = str(e)
            if "Traceback" not in text:
                raise
            last = [line for line in text.splitlines() if line.strip()][-1]
            raise ImageError(last.split(": ", 1)[1] if ": " in last else last) from None


def make_loader(dataset: Dataset, batches: EpochBatches, num_workers: int, pin_memory: bool) -> Any:
    """A DataLoader over ``batches`` (a fresh one per epoch: the batch order is the epoch's)."""
    return _Loader(DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory))
