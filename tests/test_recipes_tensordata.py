"""The tensor data path: a decoded uint8 cache and batched augmentation (tiny ImageFolders in temp dirs).

- the cache is written once, reused, rebuilt when a source file changes, and its location printed;
- batched augmentation is the stream path's augmentation (pad-crop, flip, cutout) done with tensor ops;
- batches are bit-identical in a second run, in a resumed epoch, and as the union of a 2-process
  gloo run's shards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from morph.recipes.config import DataConfig
from morph.recipes.data import BatchAugment, EpochBatches, build_data, tensor_batches
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _image_folder(root: Path, split: str, classes: list[str], per_class: int, size: int = 32, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    _image_folder(data, "train", ["a", "b", "c"], 8)
    _image_folder(data, "test", ["a", "b", "c"], 3, seed=1)
    return data


def _cfg(folder: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(root=str(folder), format="imagefolder", cache_dir=str(cache), num_workers=0, **kw)


def _epoch(data, epoch: int, batch: int, rank: int = 0, world: int = 1, seed: int = 7, start: int = 0):
    b = EpochBatches(len(data.train), batch, rank, world, epoch=epoch, seed=seed, start=start)
    return list(tensor_batches(data.tensors.train, b, data.tensors.augment, torch.device("cpu")))


def test_cache_written_once_reused_and_rebuilt_when_the_source_changes(folder, tmp_path):
    cache = tmp_path / "cache"
    said: list[str] = []
    data = build_data(_cfg(folder, cache), say=said.append)
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2 and sorted(data.tensors.cache) == files  # train and test
    assert any(str(files[0]) in s or str(files[1]) in s for s in said)  # the location is printed
    assert [f.name for f in cache.iterdir() if f.name.startswith(".")] == []  # no temporary left behind
    # the decoded tensor is the stream path's image, pixel for pixel (PNG: lossless)
    raw = np.array(Image.open(data.train.base.samples[5][0]).convert("RGB"))
    assert torch.equal(data.tensors.train.images[5], torch.from_numpy(raw).permute(2, 0, 1))
    assert data.tensors.train.targets.tolist() == data.train.base.targets

    stamps = {f: f.stat().st_mtime_ns for f in files}
    said.clear()
    again = build_data(_cfg(folder, cache), say=said.append)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # reused, not rewritten
    assert not any("decoding" in s for s in said) and any("data cache:" in s for s in said)
    assert torch.equal(again.tensors.train.images, data.tensors.train.images)

    # change one training image: the train cache is rebuilt, the test cache is not
    target = Path(data.train.base.samples[0][0])
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(target)
    os.utime(target, ns=(1, 1))
    said.clear()
    rebuilt = build_data(_cfg(folder, cache), say=said.append)
    assert any("source changed" in s for s in said)
    assert int(rebuilt.tensors.train.images[0].sum()) == 0
    assert torch.equal(rebuilt.tensors.test.images, data.tensors.test.images)
    test_file = [f for f in files if "-test-" in f.name][0]
    assert test_file.stat().st_mtime_ns == stamps[test_file]


def test_subset_and_loader_choice(folder, tmp_path):
    data = build_data(_cfg(folder, tmp_path / "c", train_subset=6), say=None)
    assert len(data.tensors.train) == len(data.train) == 6
    assert sorted(data.tensors.train.targets.tolist()) == [0, 0, 1, 1, 2, 2]
    assert build_data(_cfg(folder, tmp_path / "c", loader="stream"), say=None).tensors is None
    assert not (tmp_path / "c2").exists()
    with pytest.raises(Exception, match="ImageNet streams"):
        build_data(DataConfig(dataset="imagenet", synthetic=True, loader="tensor", image_size=16), say=None)


def test_batched_augmentation_is_pad_crop_flip_normalize_cutout():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    aug = BatchAugment(mean, std, size=8, padding=2, cutout=4)
    params = torch.tensor([[2, 2, 0, -10, -10], [0, 4, 1, -10, -10], [3, 1, 1, 4, 4], [2, 2, 0, 0, 7]])
    out = aug(x, params)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    ref = (torch.nn.functional.pad(x, (2, 2, 2, 2)).float() / 255 - m) / s
    crops = []
    for i, (dy, dx, flip, cy, cx) in enumerate(params.tolist()):
        c = ref[i, :, dy : dy + 8, dx : dx + 8]
        c = c.flip(-1) if flip else c
        c = c.clone()
        c[:, max(0, cy - 2) : max(0, cy + 2), max(0, cx - 2) : max(0, cx + 2)] = 0  # the square may leave the image
        crops.append(c)
    torch.testing.assert_close(out, torch.stack(crops), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0], (x[0].float() / 255 - m[0]) / s[0])  # centre crop, no flip: the image
    # draws cover every offset, both flips and every cutout centre
    d = aug.draw(4000, (8, 8), seed=1, epoch=0)
    assert d[:, 0].unique().tolist() == list(range(5)) and d[:, 2].unique().tolist() == [0, 1]
    assert d[:, 3].unique().tolist() == list(range(8))
    assert torch.equal(d, aug.draw(4000, (8, 8), seed=1, epoch=0)) and not torch.equal(d, aug.draw(4000, (8, 8), 1, 1))


def test_batches_identical_in_a_second_run_and_in_a_resumed_epoch(folder, tmp_path):
    a = build_data(_cfg(folder, tmp_path / "c"), say=None)
    b = build_data(_cfg(folder, tmp_path / "c"), say=None)
    for epoch in (0, 1):
        ea, eb = _epoch(a, epoch, 6), _epoch(b, epoch, 6)
        assert len(ea) == 4
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(ea, eb, strict=True))
        resumed = _epoch(b, epoch, 6, start=2)  # a run resumed after two batches of this epoch
        assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(ea[2:], resumed, strict=True))
    assert not torch.equal(_epoch(a, 0, 6)[0][0], _epoch(a, 1, 6)[0][0])  # a new epoch, new order and draws


SCRIPT = """
import sys
import torch
from morph.recipes.config import DataConfig
from morph.recipes.data import EpochBatches, build_data, tensor_batches
from morph.recipes.distributed import setup, teardown

root, cache, out = sys.argv[1:4]
dist = setup("cpu")
cfg = DataConfig(root=root, format="imagefolder", cache_dir=cache, num_workers=0)
data = build_data(cfg, say=None)
xs, ys = [], []
for epoch in (0, 1):
    b = EpochBatches(len(data.train), 6, dist.rank, dist.world_size, epoch=epoch, seed=7)
    for x, y in tensor_batches(data.tensors.train, b, data.tensors.augment, torch.device("cpu")):
        xs.append(x)
        ys.append(y)
torch.save({"x": xs, "y": ys}, f"{out}.{dist.rank}.pt")
teardown()
"""


@pytest.mark.slow
def test_two_gloo_processes_see_the_shards_of_the_same_global_batches(folder, tmp_path):
    script = tmp_path / "batches.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    args = [str(script), str(folder), str(tmp_path / "cache2"), str(tmp_path / "two")]  # rank 0 builds the cache
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = build_data(_cfg(folder, tmp_path / "cache1"), say=None)
    ref = _epoch(one, 0, 6) + _epoch(one, 1, 6)
    shards = [torch.load(tmp_path / f"two.{r}.pt", weights_only=True) for r in range(2)]
    assert len(shards[0]["x"]) == len(shards[1]["x"]) == len(ref) == 8
    for i, (x, y) in enumerate(ref):
        union = torch.empty_like(x)
        union[0::2], union[1::2] = shards[0]["x"][i], shards[1]["x"][i]  # rank r holds images r, r + W, ...
        labels = torch.empty_like(y)
        labels[0::2], labels[1::2] = shards[0]["y"][i], shards[1]["y"][i]
        assert torch.equal(union, x) and torch.equal(labels, y)
