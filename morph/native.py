"""The native (C++) kernels of template mixing, compiled on first use.

``morph/csrc/grid.cpp`` generates a tiled template-mixed weight, and its gradients, in one memory
pass each, with the autograd node in C++. It is built with ``torch.utils.cpp_extension`` (a C++
compiler and ``ninja`` are needed) the first time a CPU model generates a weight, into a cache
folder keyed by the source, the CPU, and the torch and Python versions (``$MORPH_CACHE``, default
``~/.cache/morph``); later processes load the built library in well under a second.

Where the kernels cannot be built, morph warns once and uses the PyTorch implementation in
:mod:`morph.templates` (``_Grid``), which gives the same results (to rounding) and is the reference
the tests check the kernels against; ``MORPH_NATIVE=0`` (or :func:`disabled`) selects it silently.
CUDA tensors and dtypes other than float32/float64 always use it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["available", "kernels", "cache_dir", "enabled", "set_enabled", "disabled"]

_enabled = os.environ.get("MORPH_NATIVE", "1") != "0"


def enabled() -> bool:
    """Whether template mixing uses the native kernels where it can (``MORPH_NATIVE=0`` turns them off)."""
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

SOURCE = Path(__file__).parent / "csrc" / "grid.cpp"
# -march=native, as torch.compile's C++ code generation does: the library is built for (and cached
# per) the CPU it runs on; -ffp-contract=off keeps multiply-adds unfused, so results do not depend on it.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


def _cpu_tag() -> str:
    """The CPU the kernels are built for: its model and instruction-set flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.machine() + platform.processor()


def cache_dir() -> Path:
    """Where the kernels are built: one folder per source, torch and Python version."""
    root = Path(os.environ.get("MORPH_CACHE", Path.home() / ".cache" / "morph"))
    key = SOURCE.read_bytes() + " ".join(CFLAGS).encode() + _cpu_tag().encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '_')}-{digest}"
    return root / "native" / tag


def kernels() -> ModuleType | None:
    """The compiled module, or None where it is turned off or cannot be built (then after one warning)."""
    return _build() if _enabled else None


@functools.cache
def _build() -> ModuleType | None:
    log = logging.getLogger("torch.utils.cpp_extension")  # silence its "No CUDA runtime" notice on CPU machines
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        build = cache_dir()
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("morph_native*.so")):
            print(f"morph: building the native template-mixing kernels (once) in {build} ...", file=sys.stderr)
        return load(name="morph_native", sources=[str(SOURCE)], build_directory=str(build),
                    extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a read-only home: fall back, loudly
        first = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"morph: native kernels unavailable ({type(e).__name__}: {first}); using the slower "
                      "PyTorch implementation. Install a C++ compiler and ninja, or set MORPH_NATIVE=0 to "
                      "silence this.", RuntimeWarning, stacklevel=2)
        return None
    finally:
        log.setLevel(level)


def available() -> bool:
    """Whether the kernels are built (building them if needed), whatever :func:`enabled` says."""
    return _build() is not None
