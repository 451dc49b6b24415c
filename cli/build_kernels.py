"""``morph build-kernels``: the one command that compiles something (the optional native CPU kernels)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from .common import err, out, print_json


def build_kernels(
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the compiler's output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the library path and build time as JSON.")] = False,
) -> None:
    """Build morph's optional native CPU kernels for template mixing (once per machine, about 40 s).

    They make a template-mixing training step on CPU about 10% faster at small inputs (docs/benchmarks.md);
    results are the same without them. Needs a C++ compiler and ninja (pip install 'morph[native]'). Once
    built, every morph process loads them on its own; MORPH_NATIVE=0 turns them off.
    """
    from morph import native

    t = time.perf_counter()
    built = native.is_built()
    path = native.build(verbose=verbose, announce=lambda msg: err.print(msg, highlight=False, soft_wrap=True))
    seconds = time.perf_counter() - t
    if json_out:
        print_json({"library": str(path), "built_now": not built, "seconds": round(seconds, 1)})
    elif built:
        out.print(f"already built: {path}", highlight=False, soft_wrap=True)
    else:
        out.print(f"built {path} in {seconds:.0f} s", highlight=False, soft_wrap=True)
