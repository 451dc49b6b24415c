"""benchmarks/pack_images.py: an ImageFolder tree in one file and back, byte for byte; a pack file whose index
names a path outside the target or whose sizes do not add up is refused before anything is written."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import pack_images  # noqa: E402


def _tree(root: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i:04d}.jpg").write_bytes(bytes([i, len(cls), len(split)]) * (i + 1))


def test_pack_unpack_round_trip_and_per_class_limit(tmp_path):
    _tree(tmp_path / "src")
    count, size = pack_images.pack(tmp_path / "src", tmp_path / "a.pack", train_per_class=2, test_per_class=None)
    assert count == 2 * 2 + 2 * 2 and size == (tmp_path / "a.pack").stat().st_size
    assert pack_images.unpack(tmp_path / "a.pack", tmp_path / "out") == 8
    got = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.jpg"))
    want = sorted(p.relative_to(tmp_path / "src") for p in (tmp_path / "src").rglob("*.jpg")
                  if not (p.parts[-3] == "train" and p.name == "0002.jpg"))
    assert got == want
    for rel in got:
        assert (tmp_path / "out" / rel).read_bytes() == (tmp_path / "src" / rel).read_bytes()


def _pack(path: Path, index: list, payload: bytes) -> None:
    head = json.dumps(index).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + payload)


@pytest.mark.parametrize("index, payload", [
    ([["train", "..", "x.jpg", 1]], b"a"),                 # a name that climbs out of the target
    ([["train", "cat", "../../x.jpg", 1]], b"a"),
    ([["elsewhere", "cat", "x.jpg", 1]], b"a"),            # not a split
    ([["train", "cat", "x.jpg", 5]], b"a"),                # sizes beyond the file
    ([["train", "cat", "x.jpg", -1]], b""),
])
def test_hostile_pack_is_refused_before_writing(tmp_path, index, payload):
    _pack(tmp_path / "bad.pack", index, payload)
    with pytest.raises(SystemExit, match="error:"):
        pack_images.unpack(tmp_path / "bad.pack", tmp_path / "out")
    assert not (tmp_path / "out").exists()
