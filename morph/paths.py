"""Where morph writes, and what a name may be: the one output rule.

Every file morph writes (checkpoints, heatmaps, reports, a training run's files) goes through
:func:`write_file` or :class:`Outputs`:

- **No symlink is followed.** The final path may not be a symbolic link (refused, even with ``--force``), and
  the temporary file is created with ``O_EXCL`` under a fresh random name next to it (``mkstemp``), so a link
  planted at a predictable temporary name cannot redirect the write.
- **No overwrite without ``--force``.** :func:`check_output` refuses an existing output unless asked to
  replace it; a folder, a FIFO or a device is never an output.
- **Atomic.** The data goes to the temporary file, is flushed and fsynced, and is moved into place with
  ``os.replace``: a crash leaves the old file or the new one.
- **A failed command leaves nothing**: its temporary files are removed, and so are the folders it created for
  its outputs (when they are still empty). :class:`Outputs` writes several files all or nothing.

:func:`check_name` is the rule for a name that becomes part of a path (a config's ``name``, a run name): a
name, never a path.
"""

from __future__ import annotations

import os
import stat
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from .errors import MorphError
from .text import printable

__all__ = ["MAX_NAME_CHARS", "BadNameError", "OutputError", "Outputs", "check_name", "check_output", "write_bytes",
           "write_file", "write_text"]

MAX_NAME_CHARS = 128


class OutputError(MorphError):
    """An output path that morph refuses to write: a symlink, a folder, an existing file without ``--force``."""


class BadNameError(MorphError, ValueError):
    """A name (config ``name``, run name) that is not a plain name: empty, a path, or with control characters."""


def check_name(value: object, field: str) -> str:
    """``value`` if it is a plain name that can be one path component; else one line naming ``field``.

    Refused: a non-string, the empty name, ``.`` and ``..``, a path separator (``/`` or ``\\``), an absolute
    name, control or format characters (newlines, escapes, bidi overrides), leading or trailing spaces, and
    names longer than :data:`MAX_NAME_CHARS`.
    """
    if not isinstance(value, str):
        raise BadNameError(f"{field} must be a name (a string), got {type(value).__name__}")
    shown = printable(value[:MAX_NAME_CHARS])
    why = None
    if not value:
        why = "is empty"
    elif value in (".", ".."):
        why = "is a path, not a name"
    elif "/" in value or "\\" in value or os.sep in value or (os.altsep and os.altsep in value):
        why = "holds a path separator; a name is one path component, not a path"
    elif os.path.isabs(value):
        why = "is an absolute path, not a name"
    elif any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn") for ch in value):
        why = "holds control or format characters"
    elif value != value.strip():
        why = "starts or ends with a space"
    elif len(value) > MAX_NAME_CHARS:
        why = f"is longer than {MAX_NAME_CHARS} characters"
    if why:
        raise BadNameError(f"{field} {shown!r} {why}")
    return value


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise OutputError(f"{printable(path)}: a part of the path is a file, not a folder") from None


def check_output(path: str | os.PathLike, *, force: bool = False, suffix: str | tuple[str, ...] | None = None,
                 option: str = "'-o' / '--output'") -> Path:
    """Refuse an output path before any work is done: a wrong suffix, a symbolic link, a folder, something
    that is not a regular file, or an existing file without ``force``.

    Raises:
        OutputError: one line naming the path and, where it helps, the option.
    """
    path = Path(path)
    shown = printable(path)
    at = f"{option}: " if option else ""
    if suffix is not None:
        suffixes = (suffix,) if isinstance(suffix, str) else suffix
        if path.suffix.lower() not in suffixes:
            raise OutputError(f"{at}{shown} must end in {' or '.join(suffixes)}")
    st = _lstat(path)
    if st is None:
        parent = path.parent
        pst = _lstat(parent) if str(parent) not in ("", ".") else None
        if pst is not None and not stat.S_ISDIR(os.stat(parent).st_mode):
            raise OutputError(f"{at}{printable(parent)} is not a folder")
        return path
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{at}{shown} is a symbolic link; morph never writes through one (remove it or "
                          "name another file)")
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{at}{shown} is a folder; name a file")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{at}{shown} exists and is not a regular file")
    if not force:
        raise OutputError(f"{at}{shown} exists; pass --force to overwrite it")
    return path


class Outputs:
    """Write several files all or nothing, each atomically and without following symlinks.

    ``with Outputs(force=False) as out: out.write(path, fn)`` calls ``fn(tmp)`` to write each file under a
    temporary name next to ``path``; on a clean exit every file is moved into place, on an exception every
    temporary file and every folder created for them (if still empty) is removed, and nothing is replaced.

    Args:
        force: replace existing files (a symbolic link, a folder or a special file is never replaced).
        option: how the CLI names the output option, for the error lines.
    """

    def __init__(self, *, force: bool = False, option: str = "output") -> None:
        self.force, self.option = force, option
        self._staged: list[tuple[Path, Path]] = []
        self._created: list[Path] = []

    def _mkdirs(self, folder: Path) -> None:
        missing = []
        p = folder
        while _lstat(p) is None:
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            self._created.append(d)
        if not folder.is_dir():
            raise OutputError(f"{self.option}: {printable(folder)} is not a folder")

    def write(self, path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
        """Stage ``path``: ``write(tmp)`` fills a fresh temporary file (which ends in the same suffix)."""
        path = Path(path)
        check_output(path, force=self.force, option=self.option)
        folder = path.parent if str(path.parent) else Path(".")
        self._mkdirs(folder)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=folder)
        os.close(fd)
        tmp = Path(name)
        self._staged.append((tmp, path))
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> Path:
        """Stage ``data`` as the content of ``path``."""
        def fill(tmp: Path) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "wb") as f:
                f.write(data)

        return self.write(path, fill)

    def commit(self) -> list[Path]:
        """Move every staged file into place (checked once more: still no symlink, no folder)."""
        for _, path in self._staged:
            check_output(path, force=True, option=self.option)
            if not self.force and _lstat(path) is not None:
                raise OutputError(f"{self.option}: {printable(path)} appeared while morph wrote it; pass --force "
                                  "to overwrite it")
        done = []
        for tmp, path in self._staged:
            os.replace(tmp, path)
            done.append(path)
        self._staged = []
        return done

    def discard(self) -> None:
        """Remove every staged temporary file and the folders created for them (if empty)."""
        for tmp, _ in self._staged:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._staged = []
        for d in reversed(self._created):
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()


def write_file(path: str | os.PathLike, write: Callable[[Path], None], *, force: bool = True,
               option: str = "output") -> Path:
    """Write one file by ``write(tmp)``, atomically, never through a symlink (see :class:`Outputs`).

    ``force`` defaults to true here: a library call that replaces its own file (a training checkpoint); the
    CLI passes the user's ``--force``.
    """
    with Outputs(force=force, option=option) as out:
        out.write(path, write)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = True, option: str = "output") -> Path:
    """Write ``data`` to ``path`` atomically, never through a symlink."""
    with Outputs(force=force, option=option) as out:
        out.write_bytes(path, data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, force: bool = True, option: str = "output") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, never through a symlink."""
    return write_bytes(path, text.encode(), force=force, option=option)
