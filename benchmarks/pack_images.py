"""Pack an ImageFolder tree of small image files into one file, and unpack it: how CIFAR-10 travels to a lent GPU
machine, which takes a working tree of at most 64 MiB (tar pads every file to 512 bytes and zip adds about 120
bytes a file; CIFAR-10's 60,000 JPEGs average 920 bytes).

    python benchmarks/pack_images.py pack data/cifar10 .gpudata/cifar10.pack --train-per-class 4500
    python benchmarks/pack_images.py unpack .gpudata/cifar10.pack /tmp/cifar10

The file: 8 bytes (little-endian length of the index), the index as JSON (``[[split, class, name, size], ...]``),
then the files' bytes in index order. ``unpack`` checks every name (one path component of letters, digits, ``._-``,
no leading dot) and that the sizes add up to the file's length before it writes anything.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def pack(src: Path, dst: Path, train_per_class: int | None, test_per_class: int | None) -> tuple[int, int]:
    index, blobs = [], []
    for split, limit in (("train", train_per_class), ("test", test_per_class)):
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            files = sorted(p for p in cls.iterdir() if p.is_file())
            for f in files[:limit] if limit is not None else files:
                data = f.read_bytes()
                index.append([split, cls.name, f.name, len(data)])
                blobs.append(data)
    head = json.dumps(index, separators=(",", ":")).encode()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for b in blobs:
            fh.write(b)
    return len(index), dst.stat().st_size


def unpack(src: Path, dst: Path) -> int:
    raw = src.read_bytes()
    if len(raw) < 8:
        raise SystemExit(f"error: {src}: not a pack file (shorter than its header)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise SystemExit(f"error: {src}: index length {n} exceeds the file")
    index = json.loads(raw[8:8 + n])
    if not isinstance(index, list):
        raise SystemExit(f"error: {src}: the index is not a list")
    for i, e in enumerate(index):
        ok = (isinstance(e, list) and len(e) == 4 and e[0] in ("train", "test") and all(isinstance(s, str) and
              _NAME.fullmatch(s) for s in e[1:3]) and isinstance(e[3], int) and e[3] >= 0)
        if not ok:
            raise SystemExit(f"error: {src}: index entry {i} is malformed")
    if 8 + n + sum(e[3] for e in index) != len(raw):
        raise SystemExit(f"error: {src}: the sizes in the index do not add up to the file's length")
    pos = 8 + n
    for split, cls, name, size in index:
        d = dst / split / cls
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(raw[pos:pos + size])
        pos += size
    return len(index)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--train-per-class", type=int, default=None, help="first N files of each class (sorted names)")
    p.add_argument("--test-per-class", type=int, default=None)
    u = sub.add_parser("unpack")
    u.add_argument("src", type=Path)
    u.add_argument("dst", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        count, size = pack(args.src, args.dst, args.train_per_class, args.test_per_class)
        print(f"{args.dst}: {count} files, {size / 2**20:.1f} MiB")
    else:
        print(f"{args.dst}: {unpack(args.src, args.dst)} files", file=sys.stderr)


if __name__ == "__main__":
    main()
