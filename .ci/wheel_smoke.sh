#!/usr/bin/env bash
# morph installed the way users install it, not editable: build the sdist and, from it, the wheel; install the
# wheel with its dependencies into a fresh virtual environment; then, from a temporary folder outside the source
# tree, import every subpackage, run the README's command 1 (its morph part) and every CLI command once on a
# tiny model and tiny generated images. Last, `pip install git+file://` of this repository (what `pip install
# git+URL` does) into the same environment, and the imports again. Every command must exit 0.
#
# Usage: bash .ci/wheel_smoke.sh   (python3 3.11+; pip reaches PyPI for `build`, setuptools and the dependencies)
# The git-URL install takes the repository's HEAD commit; the sdist and wheel are built from the work tree.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/morph-wheel-smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PIP_DISABLE_PIP_VERSION_CHECK=1
START=$SECONDS
step() { printf '\n== wheel smoke [%ss]: %s\n' "$((SECONDS - START))" "$*"; }

step "copy the work tree (no caches, no build outputs)"
mkdir "$WORK/src"
( cd "$ROOT" && tar --exclude=.git --exclude=.venv --exclude=build --exclude=dist --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude='*.safetensors' --exclude=runs \
    -cf - pyproject.toml setup.py MANIFEST.in README.md morph cli recipes tests docs benchmarks .ci ) \
  | tar -xf - -C "$WORK/src"

step "build the sdist, then the wheel from the sdist (python -m build)"
python3 -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q build
"$WORK/tools/bin/python" -m build --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/morph-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/morph-*.whl)
LISTING=$(tar -tzf "$SDIST")
for f in recipes/configs/cifar10-smoke.yaml morph/csrc/grid.cpp morph/py.typed morph/growth/__init__.py setup.py; do
  grep -qx "morph-[^/]*/$f" <<<"$LISTING" || { echo "the sdist has no $f" >&2; exit 1; }
done

step "install the wheel with its dependencies into a fresh venv"
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
MORPH="$WORK/venv/bin/morph"
# --no-compile: no .pyc for torch's thousands of files (minutes on 2 cores); Python compiles what it imports
"$WORK/venv/bin/pip" install --no-compile "$WHEEL" >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; exit 1; }
grep -E "^Successfully installed" "$WORK/install.log"
"$WORK/venv/bin/pip" check

mkdir "$WORK/run"
cd "$WORK/run"   # outside the source tree: nothing can be imported from the checkout

check_imports() {
  "$PY" - "$ROOT" <<'PY'
import importlib, pkgutil, sys
from importlib import resources
from pathlib import Path

import morph

root = Path(sys.argv[1]).resolve()
where = Path(morph.__file__).resolve()
assert root not in where.parents, f"morph was imported from the source tree: {where}"
assert "site-packages" in where.parts, where
names = [m.name for m in pkgutil.walk_packages(morph.__path__, "morph.", onerror=lambda n: sys.exit(f"cannot import {n}"))]
for name in names:
    if not name.endswith(".__main__"):  # importing it runs the command line (checked below: python -m morph.cli)
        importlib.import_module(name)
packages = sorted(n for n in names if n in sys.modules and hasattr(sys.modules[n], "__path__"))
for need in ("morph.cli", "morph.graph", "morph.growth", "morph.recipes"):
    assert need in packages, (need, packages)
data = resources.files("morph")
assert (data / "py.typed").is_file() and (data / "csrc" / "grid.cpp").is_file()
assert (resources.files("morph.recipes") / "configs" / "cifar10-smoke.yaml").is_file()
print(f"imported morph {morph.__version__} from {where.parent}: {len(names)} modules, packages {', '.join(packages)}")
PY
}

step "import every subpackage from the installed wheel"
check_imports

step "README command 1: morph convert resnet50 --half --force && morph inspect resnet50-half.safetensors"
"$MORPH" convert resnet50 --half --force
"$MORPH" inspect resnet50-half.safetensors >/dev/null

step "every command on a tiny model (timm test_resnet, 374K parameters, at 3x32x32, 10 classes)"
"$PY" - <<'PY'
# a tiny ImageFolder: train/ and test/, 2 classes x 8 random 32x32 PNGs
import os
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for split in ("train", "test"):
    for c in ("a", "b"):
        os.makedirs(f"imgs/{split}/{c}", exist_ok=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f"imgs/{split}/{c}/{i}.png")
PY
T="--input-size 3,32,32 --num-classes 10"
"$MORPH" convert test_resnet --half $T --seed 1
"$MORPH" convert test_resnet --half $T --seed 2
"$MORPH" inspect test_resnet-half-seed1.safetensors --batch-size 8 >/dev/null
"$MORPH" fuse test_resnet-half-seed1.safetensors test_resnet-half-seed2.safetensors -o fused.safetensors --seed 0
"$MORPH" bake fused.safetensors -o fused-plain.safetensors
"$MORPH" grow test_resnet-half-seed1.safetensors -o grown-mixturegrowth.safetensors --seed 0
"$MORPH" convert test_resnet --half --plain $T
for m in random net2net gradmax firefly; do
  "$MORPH" grow test_resnet-half-plain.safetensors -o "grown-$m.safetensors" --method "$m" --data imgs --batch-size 8 --seed 0
done
"$MORPH" cka test_resnet-half-seed1.safetensors fused.safetensors --data imgs --batches 1 --batch-size 8 -o cka.png >/dev/null
"$MORPH" inspect fused-plain.safetensors --json --no-flops >/dev/null
ls fused.safetensors fused-plain.safetensors grown-*.safetensors cka.png >/dev/null

step "morph train cifar10-smoke (synthetic data), report, cka --run"
"$MORPH" train cifar10-smoke --out-dir smoke-run run.keep_every=1 >/dev/null
"$MORPH" report smoke-run -o report
test -s report/report.md && test -s report/top1_vs_flops.png
"$MORPH" cka --run smoke-run --data imgs --batches 1 --batch-size 8 -o epochs.png >/dev/null
"$MORPH" build-kernels --help >/dev/null
"$MORPH" --help >/dev/null
"$PY" -m morph.cli --help >/dev/null

step "pip install git+file:// of the repository (HEAD), into the same venv"
"$WORK/venv/bin/pip" install --force-reinstall --no-deps "git+file://$ROOT" >"$WORK/git.log" 2>&1 || { cat "$WORK/git.log"; exit 1; }
grep -E "^Successfully installed" "$WORK/git.log"
"$WORK/venv/bin/pip" check
check_imports
"$MORPH" inspect test_resnet-half-seed1.safetensors --no-flops >/dev/null

step "passed"
