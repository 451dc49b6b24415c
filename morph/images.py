"""Image folders read as data: a corrupt image names its file, a huge one is refused before it is decoded, and a
folder whose symbolic links loop cannot hang the scan.

:func:`open_rgb` opens one image: the pixel count from the header is checked against :data:`MAX_IMAGE_PIXELS`
before anything is decoded (a 100-byte PNG can claim 30000 x 30000 pixels), and a file that is not an image, is
truncated or fails to decode raises :class:`ImageError` naming the file. :func:`image_folder` is
torchvision's ``ImageFolder`` with that loader and a scan that visits every directory once (a symbolic link
that leads back to a directory already scanned is an error naming the link, so a loop cannot hang it) and
refuses a file with an image extension that is not a regular file (a FIFO would block the reader).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from .errors import MorphError
from .text import printable

__all__ = ["IMAGE_EXTENSIONS", "ImageError", "MAX_IMAGE_PIXELS", "image_folder", "open_rgb", "scan_image_folder"]

#: The largest image (width x height) morph decodes: 8K x 8K. A bigger one is refused from its header.
MAX_IMAGE_PIXELS = 8192 * 8192

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageError(MorphError, ValueError):
    """An image file that cannot be read: not an image, truncated, corrupt, too large, or not a regular file."""


def open_rgb(path: str | os.PathLike) -> Any:
    """The image at ``path`` decoded as an RGB ``PIL.Image``.

    Raises:
        ImageError: naming the file: not a regular file, not an image, more than :data:`MAX_IMAGE_PIXELS`
            pixels, truncated or corrupt.
    """
    import warnings

    from PIL import Image

    shown = printable(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(f"{shown}: cannot read the image ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{shown}: not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{shown}: a {w}x{h} image is larger than morph decodes ({MAX_IMAGE_PIXELS:,} "
                                     "pixels); resize it")
                return im.convert("RGB")  # decodes the whole image: truncation and corruption surface here
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{shown}: refused as a decompression bomb ({printable(str(e).split('.')[0])})") from None
    except Image.DecompressionBombWarning:
        raise ImageError(f"{shown}: an image larger than morph decodes; resize it") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:  # PIL's ways of saying "not this"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{shown}: not a readable image ({printable(msg)[:200]})") from None


def scan_image_folder(directory: str | os.PathLike, class_to_idx: dict[str, int],
                      extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image under ``directory/<class>/``, in sorted order.

    Every directory is visited once: a symbolic link to a directory already visited (a loop, or two links to
    one folder) is an :class:`ImageError` naming the link. A file with an image extension that is not a
    regular file is an error too.
    """
    directory = Path(directory)
    seen: dict[tuple[int, int], str] = {}
    samples: list[tuple[str, int]] = []

    def visit(folder: Path, target: int) -> None:
        stack = [folder]
        while stack:
            d = stack.pop()
            try:
                st = os.stat(d)
            except OSError as e:
                raise ImageError(f"{printable(d)}: cannot read the folder ({e.strerror or e})") from None
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ImageError(f"{printable(d)}: leads to a folder already read ({printable(seen[key])}); a "
                                 "symbolic link loops or repeats a folder")
            seen[key] = str(d)
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError as e:
                raise ImageError(f"{printable(d)}: cannot read the folder ({e.strerror or e})") from None
            subdirs = []
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    subdirs.append(Path(entry.path))
                elif entry.name.lower().endswith(extensions):
                    if not entry.is_file(follow_symlinks=True):
                        raise ImageError(f"{printable(entry.path)}: not a regular file")
                    samples.append((entry.path, target))
            stack.extend(reversed(subdirs))

    for name in sorted(class_to_idx):
        visit(directory / name, class_to_idx[name])
    return samples


def image_folder(root: str | os.PathLike, transform: Any = None) -> Any:
    """torchvision's ``ImageFolder`` at ``root`` with :func:`open_rgb` as its loader and
    :func:`scan_image_folder` as its scan.

    Raises:
        ImageError: no class folder, no image, a looping link, an image that is not a regular file.
    """
    from torchvision.datasets import ImageFolder

    class _SafeImageFolder(ImageFolder):
        @staticmethod
        def make_dataset(directory: Any, class_to_idx: dict[str, int], extensions: Any = None,
                         is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
            samples = scan_image_folder(directory, class_to_idx)
            if not samples and not allow_empty:
                raise ImageError(f"{printable(directory)}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                                 "folders")
            return samples

    try:
        return _SafeImageFolder(str(root), transform=transform, loader=open_rgb)
    except FileNotFoundError as e:
        raise ImageError(f"{printable(root)}: not an image folder (expected <class>/<image> under it): "
                         f"{printable(str(e))}") from None
