"""The CPU growth comparison of docs/recipes.md: every row, the MixtureGrowth variants and the equal-compute
control, one ``morph train`` at a time, seed by seed, resumable.

    OMP_NUM_THREADS=1 nohup python benchmarks/cpu_compare.py --data-dir ../shared/data/cifar10 \\
        --runs runs/cmp --seeds 0 1 2 3 4 > runs/cmp.log 2>&1 &
    python benchmarks/cpu_compare.py --runs runs/cmp --collect docs/results/cifar10-wrn10-1-cpu
    morph report docs/results/cifar10-wrn10-1-cpu/*/s* -o docs/results/cifar10-wrn10-1-cpu

Every part is a run directory ``RUNS/<part>/s<seed>`` of the config ``--config`` (``cifar10-wrn10-1-cpu``) with
overrides and its own ``name`` (so that ``morph report`` keeps the variants apart and pools the seeds).
Rerunning the command resumes every part from its checkpoints; finished parts are skipped by the trainer.

Stages whose training does not depend on a variant's options are trained once and copied: the variants of
MixtureGrowth that change only what happens at and after fusion (``growth.init``, ``growth.after``) start from
the base part's net 1 and net 2 checkpoints (the same config for those stages: steps, schedule, seeds), and
the control at the larger budget from the base baselines' small model at the growth point. The trainer
checks that a copied checkpoint plans the same steps for the same stage key; the copies carry their results,
so each part's ``result.json`` lists every stage.

``--collect DIR`` copies what the report needs (``config.yaml``, ``metrics.jsonl``, ``seed*/*/result.json``
and the ``growth.json`` of baseline rows) of every finished part into ``DIR/<part>/s<seed>``: no checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "cifar10-wrn10-1-cpu"
BASELINES = "[random,net2net,gradmax,firefly]"
_SHARED = ["net1", "mixturegrowth/net2"]

# (part, overrides, copy-from part, stage keys copied), in the order they run for every seed of a round;
# the rounds are ordered by what the comparison needs most (this machine is shared and slow)
ROUNDS: list[list[tuple[str, list[str], str | None, list[str]]]] = [
    [
        ("base", ["growth.methods=[small,small-match,mixturegrowth]"], None, []),
        ("baselines", [f"growth.methods={BASELINES}"], None, []),
        ("init-zero", ["growth.methods=[mixturegrowth]", "growth.init=zero"], "base", _SHARED),
        ("init-orthogonal-official", ["growth.methods=[mixturegrowth]", "growth.init=orthogonal-official"], "base",
         _SHARED),
        ("after-official", ["growth.methods=[mixturegrowth]", "growth.after=official"], "base", _SHARED),
    ],
    [
        ("base", ["growth.methods=[mixturegrowth-nofusion,large-match,large]"], None, []),
    ],
    [
        ("budget-0.70", ["growth.methods=[small-match,random,net2net,gradmax,firefly]", "growth.budget=0.70"],
         "baselines", ["grow-from-small/train"]),
    ],
    [
        ("one-cosine", ["growth.methods=[mixturegrowth]", "optim.restart_at_growth=false"], "base", ["net1"]),
        ("init-zero-one-cosine", ["growth.methods=[mixturegrowth]", "optim.restart_at_growth=false",
                                  "growth.init=zero"], "one-cosine", _SHARED),
        ("init-zero-after-official", ["growth.methods=[mixturegrowth]", "growth.init=zero", "growth.after=official"],
         "base", _SHARED),
        ("official", ["growth.methods=[mixturegrowth]", "growth.init=orthogonal-official", "growth.after=official"],
         "base", _SHARED),
    ],
]


# parts run only when --parts names them (in round 0): for a config whose MixtureGrowth default is init=zero
# (cifar10-vit-cpu), the paper's init=orthogonal is the variant
EXTRA_PARTS: dict[str, tuple[list[str], str | None, list[str]]] = {
    "init-orthogonal": (["growth.methods=[mixturegrowth]", "growth.init=orthogonal"], "base", _SHARED),
}


def control_part(budget: float) -> str:
    """The equal-real-compute control's part name: ``budget-0.70`` for the default 0.70X."""
    return f"budget-{budget:.2f}"


def name_of(part: str, config: str = CONFIG) -> str:
    return config if part in ("base", "baselines") else f"{config}-{part}"


def run_part(runs: Path, part: str, overrides: list[str], source: str | None, keys: list[str], seed: int,
             data_dir: str, config: str = CONFIG) -> int:
    out = runs / part / f"s{seed}"
    if source is not None:
        for key in keys:
            src = runs / source / f"s{seed}" / f"seed{seed}" / key / "checkpoint.safetensors"
            dst = out / f"seed{seed}" / key / "checkpoint.safetensors"
            if not dst.exists():
                if not src.exists():
                    print(f"{part} seed {seed}: {src} is not there yet; skipped", flush=True)
                    return 1
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    cmd = [str(Path(sys.executable).parent / "morph"), "train", config, "--data-dir", data_dir, "--out-dir", str(out),
           f"run.seeds=[{seed}]", f"name={name_of(part, config)}", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def collect(runs: Path, dest: Path) -> None:
    for cfg in sorted(runs.glob("*/s*/config.yaml")):
        run = cfg.parent
        results = sorted(run.glob("seed*/*/result.json"))
        if not results:
            continue
        out = dest / run.parent.name / run.name
        out.mkdir(parents=True, exist_ok=True)
        for f in [cfg, run / "metrics.jsonl", *results, *run.glob("seed*/*/growth.json")]:
            target = out / f.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        print(f"{run} -> {out}: {len(results)} results")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=CONFIG, help=f"the recipe config every part runs (default {CONFIG}; "
                    "cifar10-wrn10-1-sat-cpu: the saturated regime)")
    ap.add_argument("--runs", type=Path, default=Path("runs/cmp"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, nargs="+", default=list(range(len(ROUNDS))),
                    help="which rounds to run (0: Small, Small Match, MixtureGrowth, the growth baselines and the "
                         "init/after variants; 1: MixtureGrowth w/o fusion, Large Match, Large; 2: the equal-compute "
                         "control at 0.70X; 3: one cosine across growth and the combined variants)")
    ap.add_argument("--parts", nargs="+", default=None,
                    help="run only these parts (e.g. base baselines init-zero); default: every part of the rounds")
    ap.add_argument("--control-budget", type=float, default=0.70,
                    help="the equal-real-compute control's budget: the config's budget plus what MixtureGrowth's "
                         "uncounted net 1 costs (0.70 for the WRN configs, 0.58 for cifar10-vit-cpu)")
    ap.add_argument("--no-control-small-match", action="store_true",
                    help="leave Small Match out of the equal-compute control (budget-0.70: the baselines only)")
    ap.add_argument("--collect", type=Path, default=None, help="copy the finished parts' summaries here and stop")
    args = ap.parse_args()
    if args.collect is not None:
        collect(args.runs, args.collect)
        return
    if args.data_dir is None:
        ap.error("--data-dir is required to train")
    extra = [(p, *EXTRA_PARTS[p]) for p in (args.parts or []) if p in EXTRA_PARTS]
    for r in args.rounds:
        for seed in args.seeds:
            for part, overrides, source, keys in ROUNDS[r] + (extra if r == 0 else []):
                if part == "budget-0.70":
                    part = control_part(args.control_budget)
                    overrides = [overrides[0], f"growth.budget={args.control_budget}"]
                    if args.no_control_small_match:
                        overrides = [f"growth.methods={BASELINES}", overrides[1]]
                if args.parts is not None and part not in args.parts:
                    continue
                rc = run_part(args.runs, part, overrides, source, keys, seed, args.data_dir, args.config)
                if rc:
                    print(f"{part} seed {seed}: exit {rc}", flush=True)


if __name__ == "__main__":
    main()
