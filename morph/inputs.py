"""Files morph reads that are not checkpoints (configs, a run directory's files, report inputs): the one input rule.

- **Bounded.** A file is read only if it is a regular file (not a folder, FIFO or device) no larger than a
  limit that the caller sets for what it expects; files found *inside* a directory (a run's ``config.yaml``,
  ``result.json``) are opened without following a symbolic link.
- **YAML without aliases.** :func:`load_yaml` refuses every anchor and alias (a 700-byte "billion laughs"
  file would otherwise expand to gigabytes), any tag outside YAML's safe ones (``!!python/...``), and
  nesting deeper than a limit.
- **JSON without surprises.** :func:`load_json` refuses ``NaN``, ``Infinity`` and numbers that overflow to
  them, and nesting deeper than a limit.

Every refusal is one line, an :class:`InputError` naming the file (and the line for YAML).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import MorphError
from .text import printable

__all__ = ["InputError", "MAX_DEPTH", "MAX_TEXT_BYTES", "check_depth", "load_json", "load_yaml", "open_regular",
           "read_bytes",
           "read_json", "read_text", "read_yaml"]

MAX_TEXT_BYTES = 4 << 20  # a config, a result: a few KiB; 4 MiB is generous
MAX_DEPTH = 32


class InputError(MorphError, ValueError):
    """A file morph reads that is missing, too large, not a regular file, or not valid JSON/YAML."""


def _open(path: Path, follow: bool, label: str) -> int:
    shown = printable(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"{shown}{label}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{shown}{label}: is a symbolic link; morph reads the file itself here, not a link"
                             ) from None
        raise InputError(f"{shown}{label}: cannot read it ({e.strerror or e})") from None


def _check_regular(fd: int, path: Path, limit: int, label: str) -> None:
    shown = printable(path)
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{shown}{label}: is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{shown}{label}: is not a regular file")
    if st.st_size > limit:
        raise InputError(f"{shown}{label}: {st.st_size:,} bytes is too large (at most {limit:,})")


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, *, limit: int = MAX_TEXT_BYTES, follow: bool = True,
                 what: str = "") -> Iterator[BinaryIO]:
    """A regular file of at most ``limit`` bytes opened for reading in binary (for streaming a large one);
    refused as :func:`read_bytes` refuses."""
    path = Path(path)
    label = f" ({what})" if what else ""
    fd = _open(path, follow, label)
    try:
        _check_regular(fd, path, limit, label)
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_bytes(path: str | os.PathLike, *, limit: int = MAX_TEXT_BYTES, follow: bool = True, what: str = "") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Args:
        follow: follow a symbolic link at ``path`` (a path the user named); ``False`` for files found inside a
            directory, which must be the files themselves.
        what: what the file is, for the error line (``"result"``).

    Raises:
        InputError: missing, a symbolic link (``follow=False``), a folder, a FIFO or device, too large.
    """
    path = Path(path)
    shown = printable(path)
    label = f" ({what})" if what else ""
    fd = _open(path, follow, label)
    try:
        _check_regular(fd, path, limit, label)
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise InputError(f"{shown}{label}: larger than {limit:,} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise InputError(f"{shown}{label}: cannot read it ({e.strerror or e})") from None
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike, *, limit: int = MAX_TEXT_BYTES, follow: bool = True, what: str = "") -> str:
    """:func:`read_bytes` decoded as UTF-8 (refused if it is not)."""
    data = read_bytes(path, limit=limit, follow=follow, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{printable(path)}{f' ({what})' if what else ''}: not UTF-8 text (byte {e.start})") from None


def check_depth(value: Any, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """``value`` if its lists and mappings nest at most ``max_depth`` deep (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = list(v.values())
        elif isinstance(v, list):
            children = v
        else:
            continue
        if d > max_depth:
            raise InputError(f"{where} is nested more than {max_depth} levels deep")
        stack.extend((c, d + 1) for c in children)
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number morph accepts")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text[:40]} overflows to infinity")
    return v


def load_json(text: str, where: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text: ``NaN``/``Infinity`` refused, numbers that overflow refused, nesting bounded.

    Raises:
        InputError: ``{where}: not valid JSON (...)``, one line.
    """
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise InputError(f"{where} is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, int digits limit, refused constants
        raise InputError(f"{where} is not valid JSON ({printable(str(e).splitlines()[0] if str(e) else e)})") from None
    return check_depth(value, where, max_depth)


def read_json(path: str | os.PathLike, *, limit: int = MAX_TEXT_BYTES, follow: bool = True, what: str = "",
              max_depth: int = MAX_DEPTH) -> Any:
    """A JSON file through :func:`read_text` and :func:`load_json`."""
    return load_json(read_text(path, limit=limit, follow=follow, what=what), printable(path), max_depth=max_depth)


def _safe_loader() -> type:
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses anchors and aliases and bounds nesting."""

        depth = 0
        max_depth = MAX_DEPTH

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                what = f"an alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"an anchor &{event.anchor}"
                raise yaml.YAMLError(f"{what} at line {line}: morph reads YAML "
                                     "without anchors and aliases; write the value out")
            self.depth += 1
            try:
                if self.depth > self.max_depth:
                    line = event.start_mark.line + 1 if event.start_mark else "?"
                    raise yaml.YAMLError(f"nested more than {self.max_depth} levels deep at line {line}")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return NoAliasLoader


_LOADER: type | None = None


def load_yaml(text: str, where: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one YAML document with the safe loader, refusing anchors, aliases and deep nesting.

    Raises:
        InputError: ``{where}: not valid YAML (...)``, one line naming the line.
    """
    import yaml

    global _LOADER
    if _LOADER is None:
        _LOADER = _safe_loader()
    loader = _LOADER(text)
    loader.max_depth = max_depth
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        problem = getattr(e, "problem", None)
        msg = f"{problem}{at}" if problem else f"{first}{at if 'line' not in first else ''}"
        raise InputError(f"{where} is not valid YAML: {printable(msg)}") from None
    except RecursionError:
        raise InputError(f"{where} is not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike, *, limit: int = MAX_TEXT_BYTES, follow: bool = True, what: str = "",
              max_depth: int = MAX_DEPTH) -> Any:
    """A YAML file through :func:`read_text` and :func:`load_yaml`."""
    return load_yaml(read_text(path, limit=limit, follow=follow, what=what), printable(path), max_depth=max_depth)
