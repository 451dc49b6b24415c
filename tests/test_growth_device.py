"""Growth runs where the model is: every plain method on a model held by another device, checked on a CPU.

A CPU-only machine cannot see the bug a GPU shows at once (every growth baseline failed on CUDA: ``index_select``
of a CUDA weight with an index map on the CPU). ``tests/pretend_device.py`` gives it a second device: the model's
tensors move to a pretend device (reported as ``meta``, computing real numbers on the CPU), and every op that mixes
it with a CPU tensor of one dim or more is refused, as a CUDA kernel refuses it. The checks, per method and model:

- no op mixed the devices (also none that the code under test caught), and no tensor of two dims or more (a
  weight, an activation) was copied to the CPU: the growth step computed on the device, not on a CPU copy;
- every parameter and buffer of the grown model is on the device;
- the device contract: the grown weights are those of the same growth on the CPU with the same seed, bit for bit
  (random draws come from the seeded CPU generator and are moved to the device after), on convolutional
  networks; on the ViT the data-driven methods agree to float32 rounding only, because SDPA chooses its kernel
  by device type (the CPU's flash kernel, the math path on the pretend device; a GPU runs its own kernels too);
- the batches given in ``data=`` on the CPU are moved to the model's device by ``morph.grow``.

On main before this change, ``morph.grow`` grew a CPU copy of a device model (every weight copied to the CPU:
the second check fails), and without that copy ``plain.py`` mixed a CPU index into ``index_select`` (the first;
the WRN half) and ``morph.analyze`` traced the model on a CPU example (the CNN; ``morph.scale_width`` too).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import timm
import torch
import torch.nn as nn
from pretend_device import DeviceMix, Pretend, PretendDevice, to_cpu, to_pretend

import morph
from morph.graph import attention_width

METHODS = ["random", "net2net", "gradmax", "firefly"]


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _vit():
    return morph.scale_width(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                                               num_classes=5), 0.5, input_size=(3, 32, 32))


def _wrn_half():
    """The recipes' small model: a WRN-10-2 half that morph scaled from a recorded spec. Its layout's reference is
    the stock model, rebuilt on the CPU, so that only the grown values meet the device: where main's ``plain.py``
    failed on CUDA (``index_select``)."""
    wrn = morph.build_model("morph.recipes.models:wrn", num_classes=5, depth=10, widen_factor=2)
    return morph.scale_width(wrn, 0.5, input_size=(3, 16, 16))


def _resnet_half():
    return morph.scale_width(morph.build_model("timm/test_resnet", num_classes=5), 0.5, input_size=(3, 32, 32))


# name: (builder, input size, attention width mode, bit-identical to the CPU for every method)
MODELS = {
    "cnn": (_cnn, (3, 16, 16), None, True),
    "wrn10_2_half": (_wrn_half, (3, 16, 16), None, True),
    "test_resnet_half": (_resnet_half, (3, 32, 32), None, True),
    "vit_head_dim": (_vit, (3, 32, 32), "head_dim", False),
}

FAST = ("cnn", "wrn10_2_half")


def _grow_both(name: str, method: str, seed: int = 3):
    build, size, mode, _ = MODELS[name]
    with attention_width(mode) if mode else contextlib.nullcontext():
        torch.manual_seed(0)
        model = build().train()
        x = torch.randn(4, *size, generator=torch.Generator().manual_seed(1))
        y = torch.tensor([0, 1, 2, 3])
        data = (x, y) if method in ("gradmax", "firefly") else None
        opts = {"steps": 3} if method == "firefly" else {}
        on_cpu = morph.grow(model, method=method, data=data, seed=seed, input_size=size, **opts)
        device = PretendDevice()
        with device:
            grown = morph.grow(to_pretend(copy.deepcopy(model)), method=method, data=data, seed=seed,
                               input_size=size, **opts)
    return on_cpu, grown, device


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
@pytest.mark.parametrize("method", METHODS)
def test_growth_runs_on_the_model_device(name, method):
    on_cpu, grown, device = _grow_both(name, method)
    assert device.violations == []
    assert [s for s in device.to_cpu if len(s) >= 2] == [], "tensors of the growth step were copied to the CPU"
    tensors = dict(grown.named_parameters()) | dict(grown.named_buffers())
    assert tensors and all(isinstance(t, Pretend) for t in tensors.values()), \
        sorted(k for k, t in tensors.items() if not isinstance(t, Pretend))
    to_cpu(grown)
    a, b = on_cpu.state_dict(), grown.state_dict()
    assert a.keys() == b.keys()
    exact = MODELS[name][3] or method in ("random", "net2net")
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:  # SDPA's kernel differs by device type (module docstring): rounding, and what it reaches
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4 * float(a[k].abs().max()), msg=k)


def test_grown_model_trains_and_carries_its_optimizer_on_the_device():
    """After growth on the device: the optimizer state carried (its record's indices are on the CPU) and an SGD
    step, all on the device."""
    torch.manual_seed(0)
    model = _cnn()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    device = PretendDevice()
    with device:
        small = to_pretend(model)
        opt = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
        nn.functional.cross_entropy(small(x.to("meta")), y.to("meta")).backward()
        opt.step()
        grown = morph.grow(small, method="gradmax", data=(x, y), seed=0, input_size=(3, 16, 16))
        new_opt = morph.growth.carry_optimizer_state(opt, small, grown)
        new_opt.zero_grad()
        nn.functional.cross_entropy(grown(x.to("meta")), y.to("meta")).backward()
        new_opt.step()
        moments = [s["momentum_buffer"] for s in new_opt.state.values()]
    assert device.violations == []
    assert moments and all(isinstance(m, Pretend) for m in moments)


def test_the_pretend_device_refuses_what_a_gpu_refuses():
    """The harness itself: the old bug (a CPU index into a device weight), a CPU generator for a device draw, and
    a CPU tensor assigned to a device parameter's ``.data`` are refused; a cross-device ``copy_`` and 0-dim CPU
    scalars are allowed, as on a GPU."""
    with PretendDevice() as device:
        w = torch.randn(4, 3).to("meta")
        with pytest.raises(DeviceMix, match="index_select"):
            w.index_select(0, torch.tensor([0, 2]))
        with pytest.raises(DeviceMix, match="generator"):
            torch.randn(3, generator=torch.Generator().manual_seed(0), device="meta")
        p = nn.Parameter(w.clone())
        with pytest.raises(DeviceMix, match="data"):
            p.data = torch.zeros(4, 3)
        w.copy_(torch.ones(4, 3))
        out = w * torch.tensor(2.0)
        assert isinstance(out, Pretend) and torch.equal(out.elem, torch.full((4, 3), 2.0))
        assert torch.equal(w.index_select(0, torch.tensor([0, 2]).to(w.device)).elem, torch.ones(2, 3))
        assert w.cpu().device.type == "cpu" and device.to_cpu == [(4, 3)]
    assert len(device.violations) == 3


def test_scale_width_and_analysis_on_the_device():
    """``morph.scale_width`` of a model on the device (its tracing, and the index maps of the narrowed layers):
    no op mixes devices, and the half is the CPU's, bit for bit."""
    torch.manual_seed(0)
    model = _cnn()
    on_cpu = morph.scale_width(model, 0.5, input_size=(3, 16, 16))
    with PretendDevice() as device:
        half = morph.scale_width(to_pretend(copy.deepcopy(model)), 0.5, input_size=(3, 16, 16))
    assert device.violations == [] and [s for s in device.to_cpu if len(s) >= 2] == []
    assert all(isinstance(t, Pretend) for t in list(half.parameters()) + list(half.buffers()))
    a, b = on_cpu.state_dict(), to_cpu(half).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
