"""Recipe configuration: typed dataclasses, YAML loading, ``key=value`` overrides.

A config is a YAML file with the sections ``data``, ``model``, ``optim``, ``growth``, ``run`` and
``superweights`` (see :class:`Config`). ``CONFIG`` on the command line is either a path to such a file or the name of
one shipped in ``recipes/configs`` (``cifar10-smoke``, ``cifar10-wrn28-10`` ...). Overrides use dotted
keys and YAML values: ``optim.lr=0.05``, ``growth.methods=[large,mixturegrowth]``, ``data.root=null``.
The resolved config is written into the run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import morph.growth as _growth
from morph.inputs import InputError, load_yaml, read_text
from morph.paths import check_name
from morph.text import printable

from .errors import RecipeError

__all__ = [
    "AFTER_GROWTH",
    "CONFIG_DIR",
    "GROWTH_BASELINES",
    "METHODS",
    "Config",
    "DataConfig",
    "GrowthConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SW_ROWS",
    "SuperWeightsConfig",
    "apply_overrides",
    "config_from_dict",
    "list_configs",
    "load_config",
    "resolve_config_path",
    "save_config",
]

CONFIG_DIR = Path(__file__).parent / "configs"

#: Method keys (as typed in ``growth.methods``) and their names in the paper's Table 1, in its order.
METHODS: dict[str, str] = {
    "large": "Large",
    "large-match": "Large Match",
    "small": "Small",
    "small-match": "Small Match",
    **{m: _growth.get_growth_method(m).label for m in _growth.baseline_methods()},  # the registry's baselines
    "mixturegrowth-nofusion": "MixtureGrowth w/o fusion",
    "mixturegrowth": "MixtureGrowth",
}

#: The rows that grow the plain small model with a ``morph.grow`` method (growth-methods issue).
GROWTH_BASELINES = tuple(_growth.baseline_methods())

#: Post-growth training (``growth.after``).
AFTER_GROWTH = ("paper", "official")

DATASETS = ("cifar10", "cifar100", "imagenet")

# Sizes past these are refused with the key named, before anything is allocated.
MAX_BATCH = 1 << 16
MAX_EPOCHS = 100_000
MAX_TEMPLATES = 64
MAX_IMAGES = 100_000_000
MAX_IMAGE_SIDE = 2048
MAX_BATCH_ELEMENTS = 1 << 31  # input values of one batch: 8 GiB of float32
MAX_SYNTHETIC_ELEMENTS = 1 << 31
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class DataConfig:
    """Dataset and augmentation.

    Attributes:
        dataset: ``cifar10``, ``cifar100`` or ``imagenet``.
        format: ``auto``, ``torchvision`` (``torchvision.datasets.CIFAR10/100``, never downloaded) or
            ``imagefolder`` (``ROOT/train/<class>/*`` and ``ROOT/test`` or ``ROOT/val``).
        root: dataset directory; ``--data-dir`` sets it.
        train_subset: keep the first N training images (class-interleaved order, deterministic).
        test_subset: keep the first N test images (same order).
        synthetic: replace the data with seeded random images of the dataset's shape and classes;
            ``train_subset``/``test_subset`` then give the sizes (default 1024/256).
        image_size: training crop size; ``None`` means 32 for CIFAR and 224 for ImageNet.
        cutout: side of the cutout square on CIFAR (0 turns it off).
        num_workers: DataLoader worker processes per rank (``stream`` path).
        loader: ``tensor`` (decode once into a ``uint8`` tensor cache, keep it on the training device,
            augment whole batches there), ``stream`` (per-image decoding and transforms in DataLoader
            workers) or ``auto`` (tensor for CIFAR, stream for ImageNet).
        cache_dir: where the tensor path caches decoded splits; ``None``: ``$MORPH_DATA_CACHE`` or
            ``~/.cache/morph/data``.
    """

    dataset: str = "cifar10"
    format: str = "auto"
    root: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    synthetic: bool = False
    image_size: int | None = None
    cutout: int = 16
    num_workers: int = 4
    loader: str = "auto"
    cache_dir: str | None = None


@dataclass
class ModelConfig:
    """The target (full-width) model.

    Attributes:
        arch: ``wrn`` (:class:`recipes.models.WideResNet`), ``vit`` (timm's ``VisionTransformer``,
            :func:`recipes.models.vit`) or a ``morph.zoo`` spec such as ``torchvision/resnet50``,
            ``timm/resnet50`` or ``package.module:callable``.
        depth: WRN depth ``d`` (6n+4), or the ViT's number of blocks.
        widen_factor: WRN width ``k``.
        norm: WRN BatchNorm placement: ``block`` (only before each block, as in the MixtureGrowth
            paper) or ``preact`` (standard pre-activation WRN).
        embed_dim: ViT (``arch: vit``, timm's ``VisionTransformer``) width of the target; ``depth``
            is its number of blocks.
        num_heads: ViT attention heads of the target.
        mlp_ratio: ViT MLP hidden width over ``embed_dim``.
        patch_size: ViT patch side (the image size comes from the data).
        drop_path_rate: ViT stochastic depth (timm's ``DropPath``), the last block's rate.
        attention: how attention grows (``morph.graph.attention_width``): ``heads`` (the number of heads
            scales, each keeps its head size: the half of a 4-head ViT has 2 heads) or ``head_dim`` (the
            heads stay, their size scales). Every pass of the run (scale_width, convert, fuse, grow)
            runs in this mode.
    """

    arch: str = "wrn"
    depth: int = 28
    widen_factor: float = 10
    norm: str = "block"
    embed_dim: int = 128
    num_heads: int = 4
    mlp_ratio: float = 2.0
    patch_size: int = 4
    drop_path_rate: float = 0.0
    attention: str = "heads"


@dataclass
class OptimConfig:
    """The optimizer and the learning-rate schedule, shared by every stage and every method.

    Attributes:
        optimizer: ``sgd`` (momentum, the CNN recipes) or ``adamw`` (decoupled weight decay, the ViT
            recipes; ``betas``, ``eps``).
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: applied to every parameter except template-mixing coefficients (names
            containing ``coefficients``).
        batch_size: global batch size (split evenly across ranks).
        schedule: ``cosine`` (to 0) or ``step`` (``gamma`` at ``milestones``).
        milestones: step-schedule epochs, in epochs of the from-scratch schedule (``growth.epochs``);
            a stage of another length scales them proportionally.
        gamma: step-schedule decay factor.
        warmup_epochs: linear warmup at the start of every schedule.
        restart_at_growth: ``true``: each stage has its own schedule; ``false``: one schedule spans
            all budgeted stages of a method (net 2 and the grown model). Net 1 always has its own.
        label_smoothing: cross-entropy label smoothing.
        betas: AdamW's ``(beta1, beta2)``.
        eps: AdamW's epsilon.
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [30.0, 60.0, 80.0])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    restart_at_growth: bool = True
    label_smoothing: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class GrowthConfig:
    """What to run: the MixtureGrowth schedule and the paper's reference rows.

    Attributes:
        methods: keys of :data:`METHODS` to run, in order.
        epochs: E, the from-scratch schedule length; FLOPs are normalized to the target trained
            this long (``Large`` = 1X).
        net1_epochs: epochs of small network 1 (not counted in the budget, as in the paper).
        net2_epochs: epochs of small network 2, the growth point ``e``.
        budget: training-FLOPs budget as a fraction of the target trained from scratch (0.45 = 0.45X).
        width: width of the small networks relative to the target.
        templates: templates per layer of the template-mixing networks.
        share: template sharing across layers (``morph.convert``: ``none`` or ``consecutive``).
        train_edge_coefficients: train the mixing coefficients of the first conv and the classifier
            (the supplementary fixes them; the official CIFAR code trains them).
        growth: ``vertical`` or ``horizontal`` tiling at fusion (``morph.fuse``).
        init: initialization of the new mixing coefficients (``morph.fuse``: ``orthogonal``,
            ``orthogonal-official``, ``random``, ``random-uniform``, ``copy``, ``zero``).
        after: training after growth, for every growing method: ``paper`` (cosine from ``optim.lr``
            to 0 over the grown stage, a fresh schedule; MG-supp §1.1) or ``official`` (the official
            MixtureGrowth code: ``lr_growing``, ``cycles`` cosine cycles with each peak halved, down
            to ``lr_min``).
        carry_optimizer: keep the optimizer state across growth (momentum buffers of old weights
            copied, zero for new ones: ``morph.growth.carry_optimizer_state``); ``None``: ``true`` for
            ``after=official`` (what the official code does), ``false`` for ``paper``.
        lr_growing: peak learning rate after growth with ``after=official`` (official: 1e-4).
        lr_min: floor of the post-growth cycles with ``after=official`` (official: 3e-5).
        cycles: cosine cycles after growth with ``after=official`` (official: 4).
        growth_batches: training batches (of ``optim.batch_size``) that ``gradmax`` and ``firefly``
            read at the growth step (GradMax: one batch of 128).
        firefly_steps: Adam steps of Firefly-Opt on its batch (growneuron: 100).
        device: where the growth baselines' growth step runs: ``train`` (the training device: on a GPU,
            GradMax's gradients and Firefly's Adam steps run there) or ``cpu`` (the small model is moved to
            the CPU first). ``morph.grow`` grows a model on the device it is on, with the same seeded draws
            on every device (docs/growth.md, "Devices"); ``growth.json`` records the device. MixtureGrowth's
            fusion (copies and new coefficients, no data) always runs on the CPU.
    """

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    epochs: int = 200
    net1_epochs: int = 200
    net2_epochs: int = 200
    budget: float = 0.45
    width: float = 0.5
    templates: int = 2
    share: str = "none"
    train_edge_coefficients: bool = False
    growth: str = "vertical"
    init: str = "orthogonal"
    after: str = "paper"
    carry_optimizer: bool | None = None
    lr_growing: float = 1e-4
    lr_min: float = 3e-5
    cycles: int = 4
    growth_batches: int = 1
    firefly_steps: int = 100
    device: str = "train"

    @property
    def carries_optimizer(self) -> bool:
        """Whether the optimizer state crosses growth (``carry_optimizer``, else by ``after``)."""
        return self.after == "official" if self.carry_optimizer is None else self.carry_optimizer


#: Rows of a SuperWeights recipe (``superweights.rows``); the sharing rows run once per budget.
SW_ROWS = ("stock", "learned", "shape", "none", "sw-ensemble", "deep-ensemble")
#: Clusters of a SuperWeight ensemble (``superweights.ensemble_share``).
SW_ENSEMBLE_SHARES = ("learned", "layer", "bins", "shape")


@dataclass
class SuperWeightsConfig:
    """SuperWeights rows (``docs/superweights.md``): one network under template-parameter budgets with learned
    sharing (NPAS), one bank per weight shape, or no sharing; SuperWeight ensembles against deep ensembles.

    Attributes:
        rows: what to run, from ``stock`` (the plain model), ``learned``, ``shape``, ``none`` (each once per
            budget), ``sw-ensemble`` and ``deep-ensemble``; empty: none (a growth recipe).
        budgets: template parameters of the single-network rows (what the paper's budget counts).
        epochs: training epochs of every row (the main model; a learned row's warm-up comes on top).
        bins: initial depth bins per kernel shape (official 4).
        templates: templates per bank of the warm-up model (no budget).
        warmup_epochs: learned sharing: epochs of the warm-up model (tied coefficients, constant ``optim.lr``).
        grad_batches: learned sharing: training batches whose weight gradients are summed for the clusters.
        tau: learned sharing: cluster similarity threshold, lowered by ``tau_step`` until the budget fits.
        tau_step: the decrement of ``tau``.
        tie: learned sharing: the main model starts with one coefficient vector per bank.
        beta: coefficient untying threshold (cosine of summed coefficient gradients).
        untie_epoch: untie after this many epochs of the main model (0: never).
        untie_batches: training batches whose coefficient gradients are summed for untying.
        members: widths of the ensemble members relative to the model, deepest first (a WRN member is
            WRN-d-(k x width), any width; other models' members are the model scaled to a width <= 1).
        member_depths: WRN depths of the members (``null``: the model's depth for all).
        ensemble_share: clusters of the SuperWeight ensemble: ``learned`` (from member 0's gradients, the others
            attach), ``layer`` (layer i of every member: one SuperWeight per layer, homogeneous ensembles),
            ``bins``, ``shape``.
        ensemble_budget: template parameters of the SuperWeight ensemble (``null``: member 0's template-layer
            weights, the parameter count of one member).
    """

    rows: list[str] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    epochs: int = 200
    bins: int = 4
    templates: int = 2
    warmup_epochs: int = 20
    grad_batches: int = 100
    tau: float = 0.1
    tau_step: float = 0.05
    tie: bool = True
    beta: float = 0.5
    untie_epoch: int = 10
    untie_batches: int = 100
    members: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    member_depths: list[int] | None = None
    ensemble_share: str = "layer"
    ensemble_budget: int | None = None

    def check(self) -> None:
        """Values types alone do not check; raises :class:`RecipeError` naming the key."""
        for r in self.rows:
            _choice("superweights.rows", r, SW_ROWS)
        if len(set(self.rows)) != len(self.rows):
            raise RecipeError(f"superweights.rows lists a row twice: {self.rows}")
        _choice("superweights.ensemble_share", self.ensemble_share, SW_ENSEMBLE_SHARES)
        if any(r in self.rows for r in ("learned", "shape", "none")) and not self.budgets:
            raise RecipeError("superweights.budgets is empty; the learned, shape and none rows run once per budget")
        if len(set(self.budgets)) != len(self.budgets):
            raise RecipeError(f"superweights.budgets lists a budget twice: {self.budgets}")
        for i, b in enumerate(self.budgets):
            if not 0 < b <= 1 << 40:
                raise RecipeError(f"superweights.budgets[{i}]={_shown(b)} must be in [1, 2^40]")
        if self.ensemble_budget is not None and not 0 < self.ensemble_budget <= 1 << 40:
            raise RecipeError(f"superweights.ensemble_budget={_shown(self.ensemble_budget)} must be in [1, 2^40]")
        for key, value, lo, hi in (("epochs", self.epochs, 1, MAX_EPOCHS), ("bins", self.bins, 1, 1000),
                                   ("templates", self.templates, 1, 8),
                                   ("warmup_epochs", self.warmup_epochs, 0, MAX_EPOCHS),
                                   ("grad_batches", self.grad_batches, 1, 100_000),
                                   ("untie_epoch", self.untie_epoch, 0, MAX_EPOCHS),
                                   ("untie_batches", self.untie_batches, 1, 100_000)):
            if not lo <= value <= hi:
                raise RecipeError(f"superweights.{key}={_shown(value)} must be in [{lo}, {hi:,}]")
        for key, value in (("tau", self.tau), ("beta", self.beta)):
            if not -1.0 <= value <= 1.0:
                raise RecipeError(f"superweights.{key}={_shown(value)} is a cosine threshold: in [-1, 1]")
        if not 0.0 < self.tau_step <= 2.0:
            raise RecipeError(f"superweights.tau_step={_shown(self.tau_step)} must be in (0, 2]")
        from morph.superweights.ensemble import MAX_MEMBERS

        if not 1 <= len(self.members) <= MAX_MEMBERS:
            raise RecipeError(f"superweights.members: 1 to {MAX_MEMBERS} member widths, got {len(self.members)}")
        for i, w in enumerate(self.members):
            if not 0.0 < w <= 64.0:
                raise RecipeError(f"superweights.members[{i}]={_shown(w)}: a width relative to the model, in (0, 64]")
        if self.member_depths is not None:
            if len(self.member_depths) != len(self.members):
                raise RecipeError(f"superweights.member_depths: {len(self.member_depths)} depths for "
                                  f"{len(self.members)} members")
            for i, d in enumerate(self.member_depths):
                if not (10 <= d <= 1000 and (d - 4) % 6 == 0):
                    raise RecipeError(f"superweights.member_depths[{i}]={_shown(d)} is not a WRN depth (6n+4, >= 10)")


@dataclass
class RunConfig:
    """Execution: seeds, device and logging.

    Attributes:
        seeds: one full run of every method per seed; the report gives mean and std over seeds.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        amp: bf16 autocast on GPU (ignored on CPU).
        channels_last: channels-last memory format on GPU (ignored on CPU).
        compile: wrap the model in ``torch.compile``.
        eval_every: evaluate every N epochs (the last epoch of a stage always is).
        log_every: write a step record to ``metrics.jsonl`` every N steps (0: epochs only).
        progress: show a rich progress bar (rank 0).
        keep_every: also keep the model of every N-th epoch of each stage, and the model it starts
            from (epoch 0), as ``RUN_DIR/<stage key>/epochs/epoch-NNN.safetensors`` (``morph.load``
            reads them; ``morph cka --run`` compares them); 0 keeps none.
        bn_batches: a grown model is tested before its first step twice: as growth left it (the
            BatchNorm running statistics of its sources, stale for new channels) and with every
            BatchNorm's running statistics re-estimated on this many training batches (a copy of the
            model; training is unchanged); 0 skips the second test.
        native_kernels: on CPU, build morph's native template-mixing kernels at the start of the run if
            they are not built yet (once per machine, about 40 s, with a message; ``morph build-kernels``
            does the same): about 10% off a template-mixing step at small inputs (docs/benchmarks.md).
            Where they cannot be built, the run says so in one line and uses the PyTorch implementation.
        keep_freed_memory: on CPU with glibc, keep freed memory in the process
            (:func:`morph.allocator.keep_freed_memory`, a process-wide ``mallopt``): no page faults on
            every step's tensors. Off by default, as it changes the allocator of the whole process;
            ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647``
            in the environment does the same without it.
    """

    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    eval_every: int = 1
    log_every: int = 50
    progress: bool = True
    keep_every: int = 0
    native_kernels: bool = False
    keep_freed_memory: bool = False
    bn_batches: int = 8


@dataclass
class Config:
    """A whole recipe. ``name`` is the config's file stem (the default run directory name)."""

    name: str = "recipe"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    run: RunConfig = field(default_factory=RunConfig)
    superweights: SuperWeightsConfig = field(default_factory=SuperWeightsConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serializable)."""
        return asdict(self)

    def validate(self) -> Config:
        """Check values that types alone do not; return ``self``.

        Raises:
            RecipeError: naming the offending key and the accepted values.
        """
        _choice("data.dataset", self.data.dataset, DATASETS)
        _choice("data.format", self.data.format, ("auto", "torchvision", "imagefolder"))
        _choice("data.loader", self.data.loader, ("auto", "tensor", "stream"))
        _choice("model.norm", self.model.norm, ("block", "preact"))
        _choice("model.attention", self.model.attention, ("heads", "head_dim"))
        _choice("optim.optimizer", self.optim.optimizer, ("sgd", "adamw"))
        _choice("optim.schedule", self.optim.schedule, ("cosine", "step"))
        from morph.convert import SHARE_MODES
        from morph.fuse import GROWTH_MODES, INIT_MODES

        _choice("growth.growth", self.growth.growth, GROWTH_MODES)
        _choice("growth.init", self.growth.init, INIT_MODES)
        _choice("growth.share", self.growth.share, SHARE_MODES)
        _choice("run.device", self.run.device, ("auto", "cpu", "cuda"))
        _choice("growth.after", self.growth.after, AFTER_GROWTH)
        _choice("growth.device", self.growth.device, ("train", "cpu"))
        for m in self.growth.methods:
            _choice("growth.methods", m, tuple(METHODS))
        if not self.growth.methods and not self.superweights.rows:
            raise RecipeError(f"growth.methods is empty; choose from {', '.join(METHODS)}")
        self.superweights.check()
        if self.superweights.member_depths is not None and self.model.arch != "wrn":
            raise RecipeError("superweights.member_depths needs model.arch: wrn (other models keep their depth)")
        if self.model.arch != "wrn":  # members are the model scaled down (a WRN member is WRN-d-(k x width))
            for i, w in enumerate(self.superweights.members):
                if w > 1.0:
                    raise RecipeError(f"superweights.members[{i}]={_shown(w)}: members of a {self.model.arch} are "
                                      "the model at a width in (0, 1]")
        if len(set(self.growth.methods)) != len(self.growth.methods):
            raise RecipeError(f"growth.methods lists a method twice: {self.growth.methods}")
        if not self.run.seeds or len(set(self.run.seeds)) != len(self.run.seeds):
            raise RecipeError(f"run.seeds must be a non-empty list of distinct ints, got {self.run.seeds}")
        positive = {
            "optim.lr": self.optim.lr,
            "optim.batch_size": self.optim.batch_size,
            "growth.epochs": self.growth.epochs,
            "growth.budget": self.growth.budget,
            "growth.templates": self.growth.templates,
            "growth.lr_growing": self.growth.lr_growing,
            "growth.cycles": self.growth.cycles,
            "growth.growth_batches": self.growth.growth_batches,
            "run.eval_every": self.run.eval_every,
        }
        for key, value in positive.items():
            if value <= 0:
                raise RecipeError(f"{key} must be > 0, got {value}")
        non_negative = {
            "optim.weight_decay": self.optim.weight_decay,
            "optim.momentum": self.optim.momentum,
            "optim.warmup_epochs": self.optim.warmup_epochs,
            "growth.net1_epochs": self.growth.net1_epochs,
            "growth.net2_epochs": self.growth.net2_epochs,
            "growth.lr_min": self.growth.lr_min,
            "growth.firefly_steps": self.growth.firefly_steps,
            "data.cutout": self.data.cutout,
            "data.num_workers": self.data.num_workers,
            "run.log_every": self.run.log_every,
            "run.keep_every": self.run.keep_every,
            "run.bn_batches": self.run.bn_batches,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise RecipeError(f"{key} must be >= 0, got {value}")
        for key, value in (("data.train_subset", self.data.train_subset), ("data.test_subset", self.data.test_subset)):
            if value is not None and value <= 0:
                raise RecipeError(f"{key} must be > 0 or null, got {value}")
        if not 0.0 < self.growth.width < 1.0:
            raise RecipeError(f"growth.width must be in (0, 1), got {self.growth.width}")
        if not 0.0 <= self.optim.label_smoothing < 1.0:
            raise RecipeError(f"optim.label_smoothing must be in [0, 1), got {self.optim.label_smoothing}")
        if self.model.arch == "wrn" and (self.model.depth - 4) % 6 != 0:
            raise RecipeError(f"model.depth must be 6n+4 for a WRN (16, 22, 28, 40 ...), got {self.model.depth}")
        if self.model.arch == "vit":
            self._check_vit()
        if len(self.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise RecipeError(f"optim.betas must be two numbers in [0, 1), got {_shown(self.optim.betas)}")
        if self.optim.eps <= 0:
            raise RecipeError(f"optim.eps must be > 0, got {self.optim.eps}")
        self._check_sizes()
        return self

    def _check_vit(self) -> None:
        """A ViT's sizes: positive, heads that split the width, patches that tile the image."""
        m = self.model
        for key, value, limit in (("model.embed_dim", m.embed_dim, 1 << 16), ("model.num_heads", m.num_heads, 4096),
                                  ("model.patch_size", m.patch_size, MAX_IMAGE_SIDE),
                                  ("model.mlp_ratio", m.mlp_ratio, 64)):
            if not 0 < value <= limit:
                raise RecipeError(f"model.{key.split('.')[1]} must be in (0, {limit}], got {_shown(value)}")
        if m.embed_dim % m.num_heads:
            raise RecipeError(f"model.embed_dim={m.embed_dim} does not split into model.num_heads={m.num_heads} heads")
        if not 0.0 <= m.drop_path_rate < 1.0:
            raise RecipeError(f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
        side = self.data.image_size or (224 if self.data.dataset == "imagenet" else 32)
        if side % m.patch_size:
            raise RecipeError(f"model.patch_size={m.patch_size} does not tile {side}x{side} images")

    def _check_sizes(self) -> None:
        """Refuse absurd sizes (each naming its key) before anything is built or allocated."""
        check_name(self.name, "name")
        for key, value in (("data.root", self.data.root), ("data.cache_dir", self.data.cache_dir),
                           ("model.arch", self.model.arch)):
            if value is not None and ("\0" in value or len(value) > 4096):
                raise RecipeError(f"{key} is not a path or a name: {_shown(value)}")
        if not self.model.arch or len(self.model.arch) > 200:
            raise RecipeError(f"model.arch must name a model, got {_shown(self.model.arch)}")
        at_most = {
            "optim.batch_size": (self.optim.batch_size, MAX_BATCH),
            "growth.epochs": (self.growth.epochs, MAX_EPOCHS),
            "growth.net1_epochs": (self.growth.net1_epochs, MAX_EPOCHS),
            "growth.net2_epochs": (self.growth.net2_epochs, MAX_EPOCHS),
            "optim.warmup_epochs": (self.optim.warmup_epochs, MAX_EPOCHS),
            "growth.budget": (self.growth.budget, 100),
            "growth.templates": (self.growth.templates, MAX_TEMPLATES),
            "growth.cycles": (self.growth.cycles, 10_000),
            "growth.growth_batches": (self.growth.growth_batches, 10_000),
            "growth.firefly_steps": (self.growth.firefly_steps, 1_000_000),
            "data.train_subset": (self.data.train_subset or 0, MAX_IMAGES),
            "data.test_subset": (self.data.test_subset or 0, MAX_IMAGES),
            "data.image_size": (self.data.image_size or 0, MAX_IMAGE_SIDE),
            "data.cutout": (self.data.cutout, MAX_IMAGE_SIDE),
            "data.num_workers": (self.data.num_workers, 256),
            "model.depth": (self.model.depth, 1000),
            "model.widen_factor": (self.model.widen_factor, 64),
            "run.eval_every": (self.run.eval_every, 1 << 31),
            "run.log_every": (self.run.log_every, 1 << 31),
            "run.keep_every": (self.run.keep_every, 1 << 31),
            "run.seeds (length)": (len(self.run.seeds), 1000),
            "optim.milestones (length)": (len(self.optim.milestones), 1000),
            "growth.methods (length)": (len(self.growth.methods), len(METHODS)),
        }
        for key, (value, limit) in at_most.items():
            if value > limit:
                raise RecipeError(f"{key}={_shown(value)} is absurd: at most {limit:,}")
        if self.data.image_size is not None and self.data.image_size <= 0:
            raise RecipeError(f"data.image_size must be > 0 or null, got {self.data.image_size}")
        for key, value in (("model.depth", self.model.depth), ("model.widen_factor", self.model.widen_factor)):
            if value <= 0:
                raise RecipeError(f"{key} must be > 0, got {_shown(value)}")
        for i, seed in enumerate(self.run.seeds):
            if not 0 <= seed < 1 << 63:
                raise RecipeError(f"run.seeds[{i}]={_shown(seed)} must be in [0, 2^63)")
        for i, m in enumerate(self.optim.milestones):
            if m < 0:
                raise RecipeError(f"optim.milestones[{i}] must be >= 0, got {m}")
        side = self.data.image_size or (224 if self.data.dataset == "imagenet" else 32)
        if self.optim.batch_size * 3 * side * side > MAX_BATCH_ELEMENTS:
            raise RecipeError(f"optim.batch_size={self.optim.batch_size} of {side}x{side} images is absurd: "
                              f"{self.optim.batch_size * 3 * side * side:,} input values per batch (at most "
                              f"{MAX_BATCH_ELEMENTS:,})")
        if self.data.synthetic:
            raw = round(side * 256 / 224) if self.data.dataset == "imagenet" else side
            n = max(self.data.train_subset or 1024, self.data.test_subset or 256)
            if n * 3 * raw * raw > MAX_SYNTHETIC_ELEMENTS:
                raise RecipeError(f"data.train_subset/test_subset: {n:,} synthetic {raw}x{raw} images is absurd "
                                  f"(at most {MAX_SYNTHETIC_ELEMENTS:,} pixel values)")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RecipeError(f"{key}={_shown(value)} is not one of: {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks


def _shown(value: Any) -> str:
    """A config value in an error line: printable, and short."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {len(str(value)) if value.bit_length() < 10000 else 'thousands of'} digits"
    text = printable(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Return ``value`` converted to type ``tp``; raise :class:`RecipeError` naming ``key`` if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, inner[0], value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list such as [a, b], got {_shown(value)}")
        (item,) = typing.get_args(tp)
        return [_check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected true or false, got {_shown(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{key}: expected an integer, got {_shown(value)}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise RecipeError(f"{key}: {_shown(value)} is too large") from None
        elif isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise RecipeError(f"{key}: expected a number, got {_shown(value)}")
        if not math.isfinite(number):
            raise RecipeError(f"{key}: expected a finite number, got {_shown(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{key}: expected a string, got {_shown(value)}")
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`RecipeError`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(printable(k)[:60] for k in set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise RecipeError(
            f"unknown config key {prefix}{unknown[0]}; valid keys{' under ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value if value is not None else {}, key)
        else:
            kwargs[name] = _check_value(key, tp, value)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Public API


def list_configs() -> list[str]:
    """Names of the configs shipped in ``recipes/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(config: str | Path) -> Path:
    """A config argument as a file path: an existing path, or a shipped config's name.

    Raises:
        RecipeError: neither a file nor a shipped name.
    """
    path = Path(config)
    if "\0" not in str(config):
        if os.path.lexists(path) and not path.is_dir():
            return path  # a file, or something that is not one (a FIFO, a device): refused when it is read
        shipped = CONFIG_DIR / f"{config}.yaml"
        if "/" not in str(config) and shipped.is_file():
            return shipped
        if path.is_dir():
            raise RecipeError(f"config {printable(config)[:200]!r} is a folder; name a YAML file")
    raise RecipeError(
        f"unknown config {printable(config)[:200]!r}: no such file and no shipped config of that name; "
        f"shipped configs: {', '.join(list_configs())}"
    )


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to a nested config dict, in place.

    Raises:
        RecipeError: an override without ``=``, with an unknown section, or whose value is not YAML.
    """
    sections = {f.name for f in dataclasses.fields(Config)}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"bad override {printable(item)[:80]!r}: expected key=value, e.g. optim.lr=0.05")
        try:
            value = load_yaml(raw, "the value", max_depth=8) if raw.strip() else None
        except InputError as e:
            raise RecipeError(f"bad override {printable(item)[:80]!r}: {e}") from None
        parts = key.split(".")
        if parts[0] not in sections:
            raise RecipeError(f"unknown config key {printable(key)[:80]!r}; keys start with one of: "
                              f"{', '.join(sorted(sections))}")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"bad override {printable(item)[:80]!r}: {printable(part)!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(config: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a config by path or shipped name, apply overrides and validate it.

    Args:
        config: path to a YAML file, or the name of one in ``recipes/configs``.
        overrides: ``key=value`` strings applied after the file.

    Raises:
        RecipeError: unknown config, malformed YAML, unknown key, wrong type or invalid value.
    """
    path = resolve_config_path(config)
    try:
        data = load_yaml(read_text(path, limit=MAX_CONFIG_BYTES, what="config"), printable(path)) or {}
    except InputError as e:
        raise RecipeError(str(e)) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{printable(path)}: expected a mapping of sections (data, model, optim, growth, run)")
    data.setdefault("name", path.stem)
    apply_overrides(data, overrides or [])
    try:
        cfg = _from_dict(Config, data, "")
        return cfg.validate()
    except ValueError as e:
        raise RecipeError(f"{printable(path.name)}: {e}") from None


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    import yaml

    from .checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict (as written by :func:`save_config`)."""
    return _from_dict(Config, data, "").validate()
