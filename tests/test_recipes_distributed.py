"""The trainer in separate processes: resume after SIGKILL, and torchrun (gloo) against one process.

Both run a small script (written to a temp dir) that trains a BatchNorm-free convnet on synthetic
data with :class:`recipes.trainer.Trainer`. The model has no BatchNorm because BatchNorm statistics
are per rank without SyncBatchNorm (which needs a GPU), so only a BN-free model can match exactly.

Tolerance for 2 processes vs 1 (same global batch 16 = 2 x 8): max |difference| of every weight after
12 steps <= 1e-5 (observed ~1e-8: gloo's all-reduce sums in another order); epoch losses within 1e-5.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from morph.recipes.checkpoint import load_checkpoint
from morph.recipes.metrics import read_metrics
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from pathlib import Path

import pytest

import torch
import torch.nn as nn
from safetensors.torch import save_file

from morph.recipes.checkpoint import model_tensors
from morph.recipes.config import Config, DataConfig, OptimConfig, RunConfig
from morph.recipes.data import build_data
from morph.recipes.distributed import setup, teardown
from morph.recipes.trainer import Stage, Trainer, make_schedule

torch.set_num_threads(1)
run_dir, out, steps, eval_every = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = Config(
    data=DataConfig(synthetic=True, train_subset=64, test_subset=32, image_size=16, num_workers=0),
    optim=OptimConfig(batch_size=16, lr=0.05, weight_decay=5e-4),
    run=RunConfig(device="cpu", progress=False, log_every=0, eval_every=eval_every),
).validate()
dist = setup("cpu")
trainer = Trainer(cfg, build_data(cfg.data), dist, run_dir)
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
)
lr = make_schedule(cfg.optim, steps, trainer.steps_per_epoch, ref_epochs=10)
stage = Stage(key="s/train", seed=3, steps=steps, lr=lr, flops_per_image=1e5, labels={"stage": "train"})
result = trainer.fit(model, stage)
if dist.is_main:
    save_file({k: v.contiguous() for k, v in model_tensors(result.model).items()}, out)
teardown()
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    return env


def _script(tmp: Path) -> Path:
    path = tmp / "train_tiny.py"
    path.write_text(SCRIPT)
    return path


def _run(tmp: Path, name: str, steps: int, eval_every: int = 1, nproc: int = 1) -> dict[str, torch.Tensor]:
    script, out = _script(tmp), tmp / f"{name}.safetensors"
    args = [str(script), str(tmp / name), str(out), str(steps), str(eval_every)]
    if nproc > 1:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out))


def _epoch_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    one = _run(tmp_path, "one", steps=12)
    two = _run(tmp_path, "two", steps=12, nproc=2)
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"max |2-process - 1-process| = {worst:.2e}")
    assert worst <= 1e-5, worst
    l1, l2 = _epoch_losses(tmp_path / "one"), _epoch_losses(tmp_path / "two")
    assert len(l1) == len(l2) == 3
    assert all(abs(a - b) <= 1e-5 for a, b in zip(l1, l2, strict=True)), (l1, l2)
    # only rank 0 wrote: one metrics record per epoch
    assert len([r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "epoch"]) == 3


@pytest.mark.slow
def test_rerun_after_sigkill_resumes_bit_exact(tmp_path):
    steps = 160  # 40 epochs of 4 steps: long enough to be killed in the middle
    reference = _run(tmp_path, "ref", steps=steps, eval_every=50)

    script, out = _script(tmp_path), tmp_path / "run.safetensors"
    args = [sys.executable, str(script), str(tmp_path / "run"), str(out), str(steps), "50"]
    ckpt = tmp_path / "run" / "s/train" / "checkpoint.safetensors"
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            epoch = load_checkpoint(ckpt)[1]["progress"]["epoch"]
            if epoch >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = epoch
                break
        time.sleep(0.01)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert killed_at is not None, "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    meta = load_checkpoint(ckpt)[1]
    assert not meta["done"] and meta["progress"]["epoch"] < 40

    resumed = _run(tmp_path, "run", steps=steps, eval_every=50)  # the same command again
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert _epoch_losses(tmp_path / "run") == _epoch_losses(tmp_path / "ref")  # no epoch lost or repeated


@pytest.mark.slow
def test_smoke_schedule_under_torchrun(tmp_path):
    """The whole schedule (template models, fusion, BatchNorm) on 2 gloo processes: every rank takes
    part in every collective, and only rank 0 writes."""
    script = tmp_path / "smoke.py"
    out = tmp_path / "run"
    methods = ["large", "large-match", "small", "small-match", "net2net", "mixturegrowth-nofusion", "mixturegrowth"]
    overrides = ["data.image_size=16", "data.train_subset=128", "data.test_subset=64",
                 f"growth.methods=[{','.join(methods)}]"]
    script.write_text(
        f"from morph.recipes.run import main\nmain('cifar10-smoke', out_dir={str(out)!r}, overrides={overrides!r})\n"
    )
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(p.parent.name for p in out.glob("seed0/*/result.json"))
    assert results == sorted(methods)
    epochs = [(r["stage_key"], r["epoch"]) for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == len(set(epochs))  # one writer
