"""The one training loop every recipe stage runs through.

:meth:`Trainer.fit` trains a model for a fixed number of optimizer steps with SGD (momentum, weight
decay except on template-mixing coefficients; or AdamW, ``optim.optimizer``), a per-step LR schedule and cross-entropy (optional
label smoothing). On GPU it uses bf16 autocast and channels-last; ``torch.compile`` is optional. Under
``torchrun`` the model is wrapped in DistributedDataParallel; only rank 0 logs and writes.

After every epoch it writes ``RUN_DIR/<stage key>/checkpoint.safetensors`` (model, optimizer, RNG
states, counters; see :mod:`recipes.checkpoint`). Calling :meth:`Trainer.fit` again for the same stage
resumes from it, and reproduces the uninterrupted run bit for bit on CPU: the data order and the
augmentation depend only on the seed and the epoch (:mod:`recipes.data`), and the LR only on the step.
A finished stage returns its saved model at once. With ``run.keep_every = N`` it also keeps the model
it starts from and that of every N-th epoch (and the last) as ``<stage key>/epochs/epoch-NNN.safetensors``,
plain ``morph.save`` files, for ``morph cka --run``.

Training FLOPs are ``3 x forward FLOPs per image x images seen`` (the backward pass costs about twice
the forward), with forward FLOPs from fvcore (one multiply-add = one flop) via ``morph.flops``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from morph.allocator import keep_freed_memory
from morph.text import markup_safe

from .checkpoint import (
    get_rng_state,
    load_checkpoint,
    load_model_tensors,
    model_tensors,
    optimizer_state,
    restore_optimizer,
    save_checkpoint,
    set_rng_state,
)
from .config import Config, OptimConfig, RunConfig
from .data import DataSplits, EpochBatches, derive_seed, make_loader, tensor_batches
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_buffers
from .errors import RecipeError
from .metrics import MetricsLog

__all__ = [
    "LRSchedule",
    "Stage",
    "StageHook",
    "StageResult",
    "Trainer",
    "build_optimizer",
    "epoch_path",
    "make_schedule",
    "optimizer_state_by_name",
    "seed_everything",
    "to_channels_last",
]

CHECKPOINT_NAME = "checkpoint.safetensors"
EPOCHS_DIR = "epochs"  # under a stage's directory: the models kept by ``run.keep_every``


def epoch_path(stage_dir: Path, epoch: int) -> Path:
    """Where ``run.keep_every`` keeps the model after ``epoch`` epochs of a stage (0: its start)."""
    return Path(stage_dir) / EPOCHS_DIR / f"epoch-{epoch:03d}.safetensors"


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a pure function of the step, so resuming needs only the step counter.

    Attributes:
        base_lr: peak learning rate.
        total_steps: length of the schedule (it may span several stages).
        offset: the step of the schedule at which this stage starts.
        kind: ``cosine`` (to 0 at ``total_steps``), ``step``, or ``cycles`` (``cycles`` cosine cycles
            of equal length from ``base_lr x cycle_decay^i`` down to ``min_lr``: the official
            MixtureGrowth code's post-growth schedule).
        milestones: step schedule: fractions of ``total_steps`` where the LR is multiplied by ``gamma``.
        gamma: step-schedule factor.
        warmup_steps: linear warmup from ``base_lr / warmup_steps`` to ``base_lr``.
        cycles: number of cosine cycles (``cycles``).
        cycle_decay: factor of each cycle's peak over the previous one (``cycles``).
        min_lr: the floor of every cycle (``cycles``).
    """

    base_lr: float
    total_steps: int
    offset: int = 0
    kind: str = "cosine"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    cycles: int = 1
    cycle_decay: float = 1.0
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        """LR at stage-local ``step`` (0-based)."""
        t = self.offset + step
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        if self.kind == "cycles":  # timm's CosineLRScheduler with cycle_limit and cycle_decay
            length = max(1, math.ceil((self.total_steps - self.warmup_steps) / self.cycles))
            i = min((t - self.warmup_steps) // length, self.cycles - 1)
            tc = min(t - self.warmup_steps - i * length, length)
            peak = self.base_lr * self.cycle_decay**i
            return self.min_lr + 0.5 * (peak - self.min_lr) * (1.0 + math.cos(math.pi * tc / length))
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (t - self.warmup_steps) / span)
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        drops = sum(t >= m * self.total_steps for m in self.milestones)
        return self.base_lr * self.gamma**drops


def make_schedule(
    cfg: OptimConfig, total_steps: int, steps_per_epoch: int, ref_epochs: int, offset: int = 0
) -> LRSchedule:
    """The configured schedule over ``total_steps``; step milestones are given in epochs of a
    ``ref_epochs``-long schedule and scale with the schedule's length."""
    return LRSchedule(
        base_lr=cfg.lr,
        total_steps=total_steps,
        offset=offset,
        kind=cfg.schedule,
        milestones=tuple(m / ref_epochs for m in cfg.milestones),
        gamma=cfg.gamma,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
    )


@dataclass(frozen=True)
class Stage:
    """One stage of a method: what to train for how long, and how to count it.

    Attributes:
        key: directory of the stage under the run dir, e.g. ``seed0/mixturegrowth/grown``.
        seed: seed of the stage (RNG, data order, augmentation).
        steps: optimizer steps to run.
        lr: the LR schedule.
        flops_per_image: forward FLOPs per image (fvcore convention).
        flops_offset: training FLOPs the method spent before this stage.
        counted: whether this stage's FLOPs count (net 1's do not, as in the paper).
        labels: ``seed``, ``method``, ``stage`` fields copied into every metrics record.
        evaluate_start: test the model before its first step (a grown model: what growth gave) and write
            a ``kind: start`` metrics record.
    """

    key: str
    seed: int
    steps: int
    lr: LRSchedule
    flops_per_image: float
    flops_offset: float = 0.0
    counted: bool = True
    labels: dict[str, Any] = field(default_factory=dict)
    evaluate_start: bool = False


@dataclass
class StageResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        model: the trained model (unwrapped, on the training device).
        top1: final test top-1 (%).
        test_loss: final test loss.
        flops: cumulative training FLOPs of the method after this stage.
        epochs: epochs run (the last may be partial).
        steps: optimizer steps run.
        wall_time: seconds spent on the stage, over all sessions.
        optimizer: the stage's optimizer at its end (its state is what growth carries over).
    """

    model: nn.Module
    top1: float
    test_loss: float
    flops: float
    epochs: int
    steps: int
    wall_time: float
    optimizer: torch.optim.Optimizer | None = None

    def summary(self) -> dict[str, Any]:
        """Everything but the model and the optimizer, as JSON-able values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "optimizer")}


@dataclass
class _Progress:
    """Counters saved in the checkpoint."""

    epoch: int = 0
    step: int = 0
    images: int = 0
    flops: float = 0.0
    wall_time: float = 0.0


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D parameter channels-last, in place.

    ``model.to(memory_format=torch.channels_last)`` refuses template banks (5-D); generated weights
    follow the input's format, so only stored 4-D weights need converting.
    """
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum (``optim.optimizer=sgd``) or AdamW (``adamw``); weight decay on every trainable
    parameter except template-mixing coefficients (names containing ``coefficients``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if "coefficients" in name else decay).append(p)
    groups = [
        {"params": params, "weight_decay": wd} for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if params
    ]
    if cfg.optimizer == "adamw":
        adam = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        try:  # one fused kernel per step where the build has it
            return torch.optim.AdamW(groups, fused=True, **adam)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, **adam)
    kw = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    try:  # one fused kernel per step (CPU and CUDA): about half the memory passes of the foreach update
        return torch.optim.SGD(groups, fused=True, **kw)
    except (RuntimeError, TypeError):  # a device or torch build without the fused SGD kernel
        return torch.optim.SGD(groups, **kw)


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, Any]]:
    """``optimizer``'s per-parameter state keyed by ``model``'s parameter names."""
    return {name: dict(optimizer.state[p]) for name, p in model.named_parameters() if p in optimizer.state}


def _set_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, dict[str, Any]], device: torch.device
) -> None:
    """Start ``optimizer`` from ``state`` (by parameter name); tensors follow each parameter's device and layout.

    A parameter without carried state (one the growth created) gets zeros for every per-entry slot the
    others have (the fused SGD kernel wants a momentum buffer for every parameter or for none), and a zero of
    every scalar slot (Adam's ``step``: the new parameter's moments start as a fresh Adam's, bias correction
    included; Adam refuses a state with moments and no step).
    """
    slots: set[str] = set()
    scalars: dict[str, Any] = {}
    for name, p in model.named_parameters():
        st = state.get(name)
        if not st:
            continue
        optimizer.state[p] = {
            k: (v.to(device=p.device, dtype=p.dtype).reshape(p.shape).contiguous(memory_format=_layout(p))
                if isinstance(v, torch.Tensor) and v.shape == p.shape else v)
            for k, v in st.items()
        }
        slots |= {k for k, v in st.items() if isinstance(v, torch.Tensor) and v.shape == p.shape}
        scalars |= {k: v for k, v in st.items() if not (isinstance(v, torch.Tensor) and v.shape == p.shape)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not slots - set(st):
                continue
            for k in slots - set(st):
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for k, v in scalars.items():
                if k not in st:
                    st[k] = torch.zeros_like(v) if isinstance(v, torch.Tensor) else type(v)(0)


def _layout(p: torch.Tensor) -> torch.memory_format:
    if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class StageHook:
    """Changes a model between the epochs of a stage (the base class changes nothing).

    :meth:`after_epoch` may add parameters to the model (SuperWeights' coefficient untying); the trainer
    then rebuilds the optimizer (:func:`build_optimizer`, every parameter once) carrying each old
    parameter's state by identity. :meth:`state` is JSON written into the stage's checkpoint;
    :meth:`restore` gives a freshly built model that structure again before the checkpoint's tensors
    are loaded, so a resumed stage continues bit for bit.
    """

    def after_epoch(self, trainer: Trainer, model: nn.Module, optimizer: torch.optim.Optimizer, stage: Stage,
                    epoch: int) -> bool:
        """Called after epoch ``epoch`` (1-based count of finished epochs); ``True`` if parameters changed."""
        return False

    def state(self, model: nn.Module) -> Any:
        return None

    def restore(self, model: nn.Module, state: Any, where: str) -> None:
        """Raises :class:`morph.errors.CheckpointError` (one line naming ``where``) for a state that does not fit."""


def _rebuilt_optimizer(model: nn.Module, old: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.Optimizer:
    """A new optimizer over ``model``'s parameters (:func:`build_optimizer`), with ``old``'s per-parameter state
    (momentum) carried by identity: the order a resumed stage rebuilds."""
    new = build_optimizer(model, cfg)
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]
    return new


class Trainer:
    """Trains stages on one dataset, in one process group, writing into one run directory.

    Args:
        cfg: the recipe config (``optim`` and ``run`` sections are used here).
        data: training and test sets.
        dist: this process's rank and device.
        run_dir: where checkpoints and ``metrics.jsonl`` go.
        flops_unit: training FLOPs of the target trained from scratch (1X), for ``flops_norm``.

    Raises:
        RecipeError: the batch size does not split over the ranks, or exceeds the training set.
    """

    def __init__(
        self, cfg: Config, data: DataSplits, dist: DistInfo, run_dir: Path, flops_unit: float | None = None
    ) -> None:
        self.cfg, self.data, self.dist, self.run_dir = cfg, data, dist, Path(run_dir)
        self.flops_unit = flops_unit
        self.batch_size = cfg.optim.batch_size
        if self.batch_size % dist.world_size:
            raise RecipeError(
                f"optim.batch_size={self.batch_size} does not split evenly over {dist.world_size} processes"
            )
        if self.batch_size > len(data.train):
            raise RecipeError(f"optim.batch_size={self.batch_size} exceeds the {len(data.train)} training images")
        self.steps_per_epoch = len(data.train) // self.batch_size
        self.device = dist.device
        # the tensor path keeps both splits whole on the training device (CIFAR-10: 180 MiB of uint8)
        self.tensors = data.tensors
        if self.tensors is not None:
            self._train_images = self.tensors.train.to(self.device)
            self._test_images = self.tensors.test.to(self.device)
        on_gpu = self.device.type == "cuda"
        self.amp = cfg.run.amp and on_gpu
        self.channels_last = cfg.run.channels_last and on_gpu
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=dist.is_main)
        self.console = Console(stderr=True, quiet=not dist.is_main, soft_wrap=True)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        if on_gpu:
            torch.backends.cudnn.benchmark = True
        else:
            self._cpu_setup(cfg.run)

    def _cpu_setup(self, run: RunConfig) -> None:
        """What a CPU run asked for in ``run``: process-wide settings are the user's choice, never a default."""
        if run.native_kernels:
            from morph import native

            try:
                native.build(announce=self.console.print)
            except native.NativeBuildError as e:
                self.console.print(f"[yellow]{markup_safe(e)}[/]")
        if run.keep_freed_memory:  # no page faults on every step's tensors (morph/allocator.py)
            keep_freed_memory()

    # ------------------------------------------------------------------------------------------

    def checkpoint_path(self, key: str) -> Path:
        """The checkpoint of stage ``key`` (it may not exist)."""
        return self.run_dir / key / CHECKPOINT_NAME

    def fit(
        self,
        model: nn.Module,
        stage: Stage,
        optimizer_state: dict[str, dict[str, Any]] | None = None,
        hook: StageHook | None = None,
    ) -> StageResult:
        """Train ``model`` for ``stage.steps`` steps, resuming from the stage's checkpoint if any.

        Args:
            model: the model to train (moved to the device in place).
            stage: what to train and how to count it.
            optimizer_state: per parameter name, the optimizer state to start from (momentum buffers
                carried across growth, :func:`morph.growth.carry_optimizer_state`); a checkpoint, when
                there is one, wins.
            hook: changes the model between epochs (SuperWeights' coefficient untying,
                :class:`StageHook`); its state goes into the checkpoint and is restored before the
                checkpoint's tensors are loaded.

        Returns:
            The trained model, its optimizer and its final test metrics.
        """
        path = self.checkpoint_path(stage.key)
        model = model.to(self.device)
        if self.channels_last:
            to_channels_last(model)
        self._stacked = bool(getattr(model, "stacked_logits", False))
        optimizer = build_optimizer(model, self.cfg.optim)
        state = _Progress(flops=stage.flops_offset)
        if path.exists():
            groups, meta = load_checkpoint(path)
            if meta["steps"] != stage.steps or meta["stage"] != stage.key:
                raise RecipeError(
                    f"checkpoint {path} plans {meta['steps']} steps but this run plans {stage.steps}; "
                    "the config changed: use a new --out-dir"
                )
            if hook is not None:  # the model's structure as the checkpoint left it (untied coefficients)
                hook.restore(model, meta.get("hook"), str(path))
                optimizer = build_optimizer(model, self.cfg.optim)
            load_model_tensors(model, groups["model"], str(path))
            restore_optimizer(optimizer, groups.get("optim", {}), meta["optim"], str(path))
            if meta["done"]:
                self.console.print(f"[dim]{markup_safe(stage.key)}: done, loaded {markup_safe(path)}[/dim]")
                return StageResult(model=model, optimizer=optimizer, **meta["result"])
            self._restore_rng(groups.get("rng", {}), meta, stage)
            state = _Progress(**meta["progress"])
            self.console.print(f"[dim]{stage.key}: resuming at epoch {state.epoch}, step {state.step}[/dim]")
        else:
            if optimizer_state:
                _set_optimizer_state(optimizer, model, optimizer_state, self.device)
            seed_everything(derive_seed(stage.seed, "rank", self.dist.rank))
            self._keep_epoch(model, stage, state)
            if stage.evaluate_start:  # the model as growth left it (evaluation draws no random numbers)
                self.metrics.truncate(stage.key, -1)  # a start record of a run that crashed before its checkpoint
                ev = self.evaluate(model, model)
                rec = {"kind": "start", **stage.labels, "stage_key": stage.key, "step": 0,
                       "test_loss": ev["loss"], "test_top1": ev["top1"], "flops": state.flops}
                bn = ""
                n_bn = self.cfg.run.bn_batches
                if n_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                    ev_bn = self.evaluate(self.reestimate_bn(model, derive_seed(stage.seed, "bn-batches"), n_bn))
                    rec.update(test_loss_bn=ev_bn["loss"], test_top1_bn=ev_bn["top1"], bn_batches=n_bn)
                    bn = f" ({ev_bn['top1']:.2f}% with BatchNorm statistics re-estimated on {n_bn} training batches)"
                self.metrics.write(rec)
                self.console.print(f"{stage.key}: test top-1 {ev['top1']:.2f}% before its first step{bn}")
        # records of work lost in a crash (after the checkpoint, or before the first one) are redone
        self.metrics.truncate(stage.key, state.step)

        compiled = torch.compile(model) if self.cfg.run.compile else model
        net: nn.Module = compiled
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.dist.distributed:
            net = DDP(compiled, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        last_eval: dict[str, float] | None = None
        with self._progress_bar() as bar:
            task = bar.add_task(stage.key, total=max(stage.steps, 1), completed=state.step, info="")
            while state.step < stage.steps:
                t0 = time.perf_counter()
                n = min(self.steps_per_epoch, stage.steps - state.step)
                record = self._train_epoch(net, optimizer, stage, state, n, bar, task)
                state.epoch += 1
                final = state.step >= stage.steps
                last_eval = None
                if final or state.epoch % self.cfg.run.eval_every == 0:
                    last_eval = self.evaluate(model, compiled)
                    record.update(test_loss=last_eval["loss"], test_top1=last_eval["top1"])
                state.wall_time += time.perf_counter() - t0
                record["wall_time"] = state.wall_time
                self.metrics.write(record)
                self._print_epoch(stage, record)
                keep = self.cfg.run.keep_every
                if keep and (final or state.epoch % keep == 0):
                    self._keep_epoch(model, stage, state)
                if hook is not None and not final and hook.after_epoch(self, model, optimizer, stage, state.epoch):
                    optimizer = _rebuilt_optimizer(model, optimizer, self.cfg.optim)
                    compiled = torch.compile(model) if self.cfg.run.compile else model
                    net = compiled
                    if self.dist.distributed:
                        net = DDP(compiled, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                if not final:  # the final state is saved once, with the result, below
                    self._save(path, model, optimizer, stage, state, done=False, hook=hook)
        if last_eval is None:  # a zero-step stage, or resumed after its last epoch
            last_eval = self.evaluate(model, compiled)
        result = StageResult(
            model=model,
            top1=last_eval["top1"],
            test_loss=last_eval["loss"],
            flops=state.flops,
            epochs=state.epoch,
            steps=state.step,
            wall_time=state.wall_time,
            optimizer=optimizer,
        )
        self._save(path, model, optimizer, stage, state, done=True, result=result.summary(), hook=hook)
        return result

    # ------------------------------------------------------------------------------------------

    def _train_epoch(
        self,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        stage: Stage,
        state: _Progress,
        n: int,
        bar: Progress,
        task: Any,
    ) -> dict[str, Any]:
        """Run ``n`` steps of epoch ``state.epoch``; return the epoch's metrics record."""
        net.train()
        batches = EpochBatches(
            len(self.data.train),
            self.batch_size,
            self.dist.rank,
            self.dist.world_size,
            epoch=state.epoch,
            seed=stage.seed,
            shuffle=True,
            drop_last=True,
            stop=n,
        )
        loader = self.batches(batches)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, correct, n
        log_every = self.cfg.run.log_every
        t0, images0 = time.perf_counter(), state.images
        lr = stage.lr(state.step)
        for x, y in loader:
            lr = stage.lr(state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, correct = self._step(net, optimizer, x, y)
            sums[0] += loss.detach().double() * len(y)
            sums[1] += correct
            sums[2] += len(y)
            state.step += 1
            state.images += self.batch_size
            if stage.counted:
                state.flops += 3.0 * stage.flops_per_image * self.batch_size
            bar.update(task, advance=1)
            if log_every and state.step % log_every == 0:
                step_stats = (
                    all_reduce_sum(torch.stack([loss.detach().double(), correct.double() / len(y)]))
                    / self.dist.world_size
                )
                rec = self._record(
                    stage, state, lr, float(step_stats[0]), 100.0 * float(step_stats[1]), t0, images0, kind="step"
                )
                self.metrics.write(rec)
                bar.update(task, info=f"loss {rec['loss']:.3f} lr {lr:.4g}")
        all_reduce_sum(sums)
        loss_avg = float(sums[0] / sums[2])
        top1 = 100.0 * float(sums[1] / sums[2])
        return self._record(stage, state, lr, loss_avg, top1, t0, images0, kind="epoch")

    def batches(self, batches: EpochBatches) -> Any:
        """``(inputs, targets)`` of this rank for every batch of ``batches`` (training batches when
        ``batches.shuffle``): from the tensors on the device, or from a DataLoader (``stream``)."""
        if self.tensors is not None:
            data = self._train_images if batches.shuffle else self._test_images
            return tensor_batches(data, batches, self.tensors.augment, self.device)
        dataset = self.data.train if batches.shuffle else self.data.test
        return make_loader(dataset, batches, self.cfg.data.num_workers, self.device.type == "cuda")

    def growth_batches(self, seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` whole global training batches (augmented as in training), on the CPU and the same on
        every rank: the data a growth method reads (GradMax's gradients, Firefly's steps). They come
        from the first batches of an epoch ordered by ``seed``, which no training stage uses."""
        batches = EpochBatches(len(self.data.train), self.batch_size, epoch=0, seed=seed, stop=n)
        cpu = torch.device("cpu")
        if self.tensors is not None:
            return list(tensor_batches(self.tensors.train, batches, self.tensors.augment, cpu))
        return [(x, y) for x, y in make_loader(self.data.train, batches, 0, False)]

    def _batch_to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _step(
        self, net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._batch_to_device(x, y)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = net(x)
            loss = self.loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, (self.predicted(out) == y).sum()

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss: cross-entropy, or, for an ensemble's stacked logits ``[members, batch,
        classes]`` (a model with ``stacked_logits = True``), the sum of the members' cross-entropies."""
        if getattr(self, "_stacked", False):
            return sum(self.criterion(o, y) for o in out)
        return self.criterion(out, y)

    def predicted(self, out: torch.Tensor) -> torch.Tensor:
        """Predicted classes: the argmax of the logits, or of the mean of the members' softmaxes."""
        if getattr(self, "_stacked", False):
            return out.float().softmax(-1).mean(0).argmax(1)
        return out.argmax(1)

    def _record(
        self, stage: Stage, state: _Progress, lr: float, loss: float, top1: float, t0: float, images0: int, kind: str
    ) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = max(time.perf_counter() - t0, 1e-9)
        return {
            "kind": kind,
            **stage.labels,
            "stage_key": stage.key,
            "epoch": state.epoch + 1,  # 1-based number of the epoch being trained
            "step": state.step,
            "loss": loss,
            "top1": top1,
            "lr": lr,
            "flops": state.flops,
            "flops_norm": state.flops / self.flops_unit if self.flops_unit else None,
            "images_per_s": (state.images - images0) / dt,
            "wall_time": state.wall_time + dt,
        }

    @torch.no_grad()
    def reestimate_bn(self, model: nn.Module, seed: int, n: int) -> nn.Module:
        """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``n`` training
        batches (augmented as in training, from an epoch order seeded by ``seed`` that no stage uses).

        Every BatchNorm's statistics are reset and averaged over the batches with equal weight
        (``momentum=None``), in train mode and without gradients; the weights are unchanged and
        ``model`` itself is not touched. Every rank sees the same batches (``growth_batches``).
        """
        import copy

        net = copy.deepcopy(model)
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m, m.momentum) for m in norms]
        for m in norms:
            if m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches
        net.train()
        for x, y in self.growth_batches(seed, n):
            x, _ = self._batch_to_device(x, y)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                net(x)
        for m, momentum in saved:
            m.momentum = momentum
        return net.eval()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, net: nn.Module | None = None) -> dict[str, float]:
        """Test loss and top-1 (%) of ``model`` over the whole test set, sharded over ranks.

        Args:
            model: the unwrapped model (its buffers are synchronized from rank 0 first).
            net: what to run, if not ``model`` itself (its ``torch.compile`` wrapper).
        """
        broadcast_buffers(model)
        net = net if net is not None else model
        was_training = net.training
        net.eval()
        batches = EpochBatches(
            len(self.data.test), self.batch_size, self.dist.rank, self.dist.world_size, shuffle=False, drop_last=False
        )
        loader = self.batches(batches)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        criterion = nn.CrossEntropyLoss(reduction="sum")
        stacked = bool(getattr(model, "stacked_logits", False))
        for x, y in loader:
            x, y = self._batch_to_device(x, y)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = net(x)
            if stacked:  # an ensemble: NLL and top-1 of the mean of the members' softmaxes
                mean = out.float().softmax(-1).mean(0)
                sums[0] += nn.functional.nll_loss(mean.clamp_min(1e-38).log(), y, reduction="sum").double()
                sums[1] += (mean.argmax(1) == y).sum().double()
            else:
                sums[0] += criterion(out.float(), y).double()
                sums[1] += (out.argmax(1) == y).sum().double()
            sums[2] += len(y)
        all_reduce_sum(sums)
        net.train(was_training)
        return {"loss": float(sums[0] / sums[2]), "top1": 100.0 * float(sums[1] / sums[2])}

    # ------------------------------------------------------------------------------------------

    def _save(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        stage: Stage,
        state: _Progress,
        done: bool,
        result: dict[str, Any] | None = None,
        hook: StageHook | None = None,
    ) -> None:
        """Write the stage checkpoint (rank 0), with every rank's RNG state."""
        rng = all_gather_objects(get_rng_state(self.device))
        if self.dist.is_main:
            opt_tensors, opt_meta = optimizer_state(optimizer)
            rng_tensors = {f"{r}.{k}": t for r, (tensors, _) in enumerate(rng) for k, t in tensors.items()}
            meta = {
                "stage": stage.key,
                "steps": stage.steps,
                "done": done,
                "progress": asdict(state),
                "world_size": self.dist.world_size,
                "optim": opt_meta,
                "rng": [m for _, m in rng],
                "result": result,
                "torch": torch.__version__,
            }
            if hook is not None:
                meta["hook"] = hook.state(model)
            save_checkpoint(path, {"model": model_tensors(model), "optim": opt_tensors, "rng": rng_tensors}, meta)
        barrier()

    def _keep_epoch(self, model: nn.Module, stage: Stage, state: _Progress) -> None:
        """Keep the model as it is after ``state.epoch`` epochs (``run.keep_every``; rank 0)."""
        if not self.cfg.run.keep_every or not self.dist.is_main:
            return
        import copy

        import morph

        path = epoch_path(self.run_dir / stage.key, state.epoch)
        if state.epoch == 0 and path.exists():  # a rerun of a stage that had not saved its first epoch
            return
        plain = self.device.type == "cpu" and not self.channels_last
        # safetensors wants contiguous CPU tensors: copy a model trained on GPU or channels-last
        keep = model if plain else copy.deepcopy(model).to(device="cpu", memory_format=torch.contiguous_format)
        meta = {"stage": stage.key, "epoch": str(state.epoch), "step": str(state.step)}
        morph.save(keep, path, metadata=meta)

    def _restore_rng(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], stage: Stage) -> None:
        rank = self.dist.rank
        if meta["world_size"] == self.dist.world_size:
            mine = {k.split(".", 1)[1]: t for k, t in tensors.items() if k.split(".", 1)[0] == str(rank)}
            set_rng_state(mine, meta["rng"][rank], self.device)
        else:
            # Data order and augmentation do not depend on the world size; only RNG draws inside
            # the model (dropout) do, and those cannot be replayed on another number of ranks.
            self.console.print(
                f"[yellow]{stage.key}: checkpoint written by {meta['world_size']} processes, resuming on "
                f"{self.dist.world_size}: not bit-exact[/yellow]"
            )
            seed_everything(derive_seed(stage.seed, "resume", meta["progress"]["epoch"], rank))

    def _progress_bar(self) -> contextlib.AbstractContextManager[Progress]:
        show = self.dist.is_main and self.cfg.run.progress
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=not show,
            transient=False,
        )

    def _print_epoch(self, stage: Stage, r: dict[str, Any]) -> None:
        test = f" test {r['test_top1']:.2f}%" if "test_top1" in r else ""
        norm = f" {r['flops_norm']:.3f}X" if r.get("flops_norm") is not None else ""
        self.console.print(
            f"{stage.key} epoch {r['epoch']} step {r['step']}/{stage.steps}: loss {r['loss']:.4f} "
            f"top1 {r['top1']:.2f}%{test} lr {r['lr']:.4g}{norm} {r['images_per_s']:.0f} img/s"
        )
