"""Optional native (C++) kernels for template mixing on CPU, built only by an explicit step.

``morph/csrc/grid.cpp`` generates a tiled template-mixed weight, and its gradients, in one memory
pass each. It registers the ops ``morph::grid`` (its autograd node in C++) and ``morph::grid_backward``
through ``torch.library``, so the profiler and ``torch.compile`` see one op per weight.

Nothing in morph compiles on its own: :func:`build` does, and is called only by ``morph build-kernels``
and by a training run that asks for it (``run.native_kernels: true``), each with a visible message.
The build needs a C++ compiler and ``ninja`` (``pip install "morph[native]"``) and lands in a cache folder
keyed by the source, the CPU, and the torch and Python versions (``$MORPH_CACHE``, default
``~/.cache/morph``). Once built, every later process loads the library on its first CPU weight
generation (well under a second).

Where the kernels are not built, template mixing silently uses the PyTorch implementation in
:mod:`morph.templates`, with the same results to rounding: the kernels are a speed-up for CPU
training at small inputs (docs/benchmarks.md), never a requirement. ``MORPH_NATIVE=0`` (or
:func:`disabled`) turns them off where they are built. CUDA tensors and dtypes other than
float32/float64 always use the PyTorch implementation.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

from .errors import MorphError

__all__ = ["NativeBuildError", "build", "is_built", "loaded", "cache_dir", "enabled", "set_enabled", "disabled"]

_enabled = os.environ.get("MORPH_NATIVE", "1") != "0"

SOURCE = Path(__file__).parent / "csrc" / "grid.cpp"
NAME = "morph_native"
# -march=native, as torch.compile's C++ code generation does: the library is built for (and cached
# per) the CPU it runs on; -ffp-contract=off keeps multiply-adds unfused, so results do not depend on it.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


class NativeBuildError(MorphError):
    """The native kernels could not be built (no C++ compiler or ninja, an unwritable cache folder)."""


def enabled() -> bool:
    """Whether template mixing uses the native kernels where they are built (``MORPH_NATIVE=0``: never)."""
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def disabled():
    """Use the PyTorch implementation inside the block (tests and benchmarks compare the two)."""
    before = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)


def _cpu_tag() -> str:
    """The CPU the kernels are built for: its model and instruction-set flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.machine() + platform.processor()


@functools.cache
def cache_dir() -> Path:
    """Where the kernels are built: one folder per source, CPU, torch and Python version."""
    root = Path(os.environ.get("MORPH_CACHE", Path.home() / ".cache" / "morph"))
    key = SOURCE.read_bytes() + " ".join(CFLAGS).encode() + _cpu_tag().encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '_')}-{digest}"
    return root / "native" / tag


def _library() -> Path:
    return cache_dir() / f"{NAME}.so"


def is_built() -> bool:
    """Whether the kernels for this source, CPU, torch and Python are in the cache folder."""
    return _library().is_file()


_loaded: bool | None = None  # None: not looked for yet in this process
_lock = threading.Lock()


def loaded() -> bool:
    """Whether ``torch.ops.morph.grid`` can be called. The first call loads a built library (silently);
    where there is none it returns False, builds nothing, and does not look again until :func:`build`.
    :mod:`morph.templates` calls it for every CPU weight, so it is a flag check after the first."""
    if _loaded is None:
        _load(_library() if is_built() else None)
    return bool(_loaded)


def _load(path: Path | None) -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        if path is None:
            _loaded = False
            return
        if not hasattr(torch.ops.morph, "grid"):
            torch.ops.load_library(str(path))
        _register_fake()
        _loaded = True


def _register_fake() -> None:
    """Shape-only implementations of the two ops, for ``torch.compile`` (FakeTensor tracing)."""

    @torch.library.register_fake("morph::grid")
    def _grid_fake(coefficients, banks, rows, cols, tile_banks):
        shape = list(banks[0].shape[1:])
        shape[0] *= rows
        shape[1] *= cols
        return banks[0].new_empty(shape)

    @torch.library.register_fake("morph::grid_backward")
    def _grid_backward_fake(grad, coefficients, banks, rows, cols, tile_banks, need_coefficients, need_banks):
        out = [coefficients.new_empty(coefficients.shape if need_coefficients else (0,))]
        out += [b.new_empty(b.shape if need else (0,)) for b, need in zip(banks, need_banks, strict=True)]
        return out


def build(*, verbose: bool = False, announce=print) -> Path:
    """Build the native kernels (if they are not built yet) and load them; return the library's path.

    This is the one place morph runs a compiler (about 30-45 s). ``announce`` gets one line before a
    build starts (``None``: quiet).

    Raises:
        NativeBuildError: no C++ compiler, no ninja, or an unwritable cache folder; the message says which.
    """
    path = _library()
    if not path.is_file():
        if announce is not None:
            announce(f"morph: building the native template-mixing kernels (once) in {path.parent} ...")
        log = logging.getLogger("torch.utils.cpp_extension")  # silence its "No CUDA runtime" notice on CPU
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load

            path.parent.mkdir(parents=True, exist_ok=True)
            load(name=NAME, sources=[str(SOURCE)], build_directory=str(path.parent), extra_cflags=CFLAGS,
                 extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)
        except Exception as e:  # compiler, ninja or file system: one line that says which
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]
            raise NativeBuildError(
                f"cannot build morph's native kernels ({type(e).__name__}: {first}); they need a C++ compiler "
                "($CXX or c++) and ninja (pip install 'morph[native]'). morph works without them."
            ) from e
        finally:
            log.setLevel(level)
    _load(path)
    return path
