"""``morph train`` and ``morph report``: the recipes (training schedules and their reports).

The recipes raise :class:`morph.MorphError` subclasses (``morph.recipes.errors``) for every user mistake
(config, override, data path, run directory, checkpoint), which the ``morph`` group prints as one line;
any other exception is a bug and keeps its traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from morph.text import markup_safe, printable

from .common import Force, out, print_json


def train(
    config: Annotated[str, typer.Argument(help="A config path, or the name of one in recipes/configs (e.g. cifar10-smoke).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. run.seeds=[0,1] optim.lr=0.05.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Dataset root (overrides data.root).")] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Run directory (default runs/<config name>); rerun to resume.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run directory as JSON when done.")] = False,
) -> None:
    """Run a training recipe: MixtureGrowth and its reference rows under one FLOPs budget.

    Works under `python` and `torchrun` (DDP when RANK is set); rerunning the same command resumes.
    """
    from morph.recipes.run import main

    run_dir = main(config, data_dir=data_dir, out_dir=out_dir, overrides=list(overrides or []))
    if json_out:
        print_json({"run_dir": str(run_dir)})
    else:
        out.print(f"[green]done[/]: {markup_safe(run_dir)}", highlight=False)


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories written by morph train.")],
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Where report.md, report.json and the plots go.")] = Path("report"),
    base: Annotated[str | None, typer.Option(help="Config whose MixtureGrowth and Small Match rows every row is paired with (default: the first run directory's).")] = None,
    force: Force = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the statistics (report.json) and the written file paths as JSON.")] = False,
) -> None:
    """Write a Table-1-style markdown report (top-1 per seed, mean ± std, FLOPs, paired differences from
    MixtureGrowth and Small Match with 95% t-intervals), report.json and the plots; SuperWeights rows get their
    table (top-1, NLL, ECE, parameters, FLOPs, paired differences) and top1_vs_params.png.

    The run directories' files are read as data: names in them are printed as text, never as markup.
    """
    from morph.recipes.report import main

    files = main(run_dirs, out_dir, base=base, force=force)
    if json_out:
        print_json({"markdown": str(files.markdown), "plot": str(files.plot), "json": str(files.json), **files.data})
    else:
        out.print(files.text, markup=False, highlight=False, emoji=False, soft_wrap=True)
        more = f", {printable(files.params_plot)}" if files.params_plot and files.params_plot != files.plot else ""
        out.print(f"wrote {printable(files.markdown)}, {printable(files.json)}{more} and {printable(files.plot)}",
                  markup=False, highlight=False)
