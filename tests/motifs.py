"""Tiny models, one per channel motif, for exact CPU tests."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Residual(nn.Module):
    def __init__(self, c=8, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, 2 * c, 1, stride=2)
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        x = self.down(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Concat(nn.Module):
    """DenseNet/Inception-style concatenation, then chunk and a channel slice by x.size(1)."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.mix = nn.Conv2d(24, 16, 1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.a(x), self.b(x)], dim=1)
        x = self.mix(F.relu(self.bn(x)))
        p, q = x.chunk(2, dim=1)
        x = p * torch.sigmoid(q)
        return self.fc(x.mean((2, 3)))


class DepthwiseSE(nn.Module):
    """MobileNet/EfficientNet block: expand, depthwise, squeeze-excitation gate, project, residual."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=False)
        self.bn4 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.silu(self.bn0(self.stem(x)))
        y = F.silu(self.bn1(self.expand(x)))
        y = F.silu(self.bn2(self.dw(y)))
        s = F.adaptive_avg_pool2d(y, 1)
        y = y * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(s))))
        x = x + self.bn3(self.project(y))
        x = F.relu(self.bn4(self.grouped(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class FlattenSpatial(nn.Module):
    """VGG/AlexNet head: the flattened C x 2 x 2 map feeds a Linear (its input scales in blocks)."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(8 * 4, 12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class Norms(nn.Module):
    """GroupNorm (groups scale) and a channels-last LayerNorm over channels, with a layer scale."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.ln = nn.LayerNorm(16)
        self.gamma = nn.Parameter(torch.full((16,), 0.5))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.gelu(self.gn(self.stem(x)))
        y = self.ln(self.conv(x).permute(0, 2, 3, 1)) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


class HardCodedView(nn.Module):
    """A forward that hard-codes its channel count in a reshape."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        return self.fc(x.reshape(-1, 16))


class Shuffle(nn.Module):
    """ShuffleNet-v2 style unit: split, branch, concatenate, channel shuffle."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 1)
        self.branch2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, num_classes)

    @staticmethod
    def shuffle(x):
        n, c, h, w = x.size()
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)

    def forward(self, x):
        x = self.stem(x)
        for conv in (self.branch, self.branch2):
            a, b = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat([a, F.relu(conv(b))], 1))
        return self.fc(x.mean((2, 3)))


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.fft.fft2(self.conv(x)).real
        return self.fc(x.mean((2, 3)))


class StarBlock(nn.Module):
    """StarNet's block: depthwise conv-BN, two 1x1 convs whose outputs multiply (``relu6(f1) * f2``), 1x1 conv-BN."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.dwbn = nn.BatchNorm2d(c)
        self.f1 = nn.Conv2d(c, 3 * c, 1)
        self.f2 = nn.Conv2d(c, 3 * c, 1)
        self.g = nn.Conv2d(3 * c, c, 1, bias=False)
        self.gbn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.dwbn(self.dw(x))
        y = F.relu6(self.f1(y)) * self.f2(y)
        return x + self.gbn(self.g(y))


class StarGate(nn.Module):
    """A product of two grown branches (StarNet), two blocks deep."""

    def __init__(self, c=8, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(StarBlock(c), StarBlock(c))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu6(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class RepBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv-BN + 1x1 conv-BN + an identity BatchNorm, then ReLU."""

    def __init__(self, c):
        super().__init__()
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.identity(x))


class RepBranches(nn.Module):
    """Multi-branch BatchNorm sums in series (RepVGG, MobileOne): six RepBlocks."""

    def __init__(self, c=8, num_classes=5, depth=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[RepBlock(c) for _ in range(depth)])
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class ShuffleBN(nn.Module):
    """ShuffleNet v2 units with BatchNorm: a two-branch unit, then units that split, run one half through a 1x1
    conv-BN-ReLU, concatenate and shuffle the channels."""

    def __init__(self, c=8, num_classes=5, units=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.left = nn.Conv2d(c, c, 1, bias=False)
        self.lbn = nn.BatchNorm2d(c)
        self.right = nn.Conv2d(c, c, 1, bias=False)
        self.rbn = nn.BatchNorm2d(c)
        self.branch = nn.ModuleList([nn.Conv2d(c, c, 1, bias=False) for _ in range(units)])
        self.bbn = nn.ModuleList([nn.BatchNorm2d(c) for _ in range(units)])
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = Shuffle.shuffle(torch.cat([F.relu(self.lbn(self.left(x))), F.relu(self.rbn(self.right(x)))], 1))
        for conv, bn in zip(self.branch, self.bbn, strict=True):
            a, b = x.chunk(2, dim=1)
            x = Shuffle.shuffle(torch.cat([a, F.relu(bn(conv(b)))], 1))
        return self.fc(x.mean((2, 3)))


class StarReLU(nn.Module):
    """timm's StarReLU (MetaFormer v2): ``s * relu(x) ** 2 + b``: derivative 0 at 0, and ``f(0) = b``."""

    def __init__(self, scale=0.8, bias=-0.3):
        super().__init__()
        self.relu = nn.ReLU()
        self.scale = nn.Parameter(torch.full((1,), scale))
        self.bias = nn.Parameter(torch.full((1,), bias))

    def forward(self, x):
        return self.scale * self.relu(x) ** 2 + self.bias


class StarMlp(nn.Module):
    """PoolFormer v2's MLP blocks: conv-BN stem, then ``x + fc2(starrelu(fc1(x)))`` twice, with a 3x3 fc2 in the
    second block (zero padding: a constant new channel reaches the borders through fewer taps)."""

    def __init__(self, c=8, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.ModuleList([nn.Conv2d(c, 2 * c, 1, bias=False) for _ in range(2)])
        self.act = nn.ModuleList([StarReLU(), StarReLU(1.1, 0.4)])
        self.fc2 = nn.ModuleList([nn.Conv2d(2 * c, c, 1, bias=False), nn.Conv2d(2 * c, c, 3, padding=1, bias=False)])
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.bn(self.stem(x))
        for f1, act, f2 in zip(self.fc1, self.act, self.fc2, strict=True):
            x = x + f2(act(f1(x)))
        return self.fc(x.mean((2, 3)))


class GatedSplit(nn.Module):
    """MambaOut's gated conv block, channels last: ``g, i, c = split(fc1(x))``, ``x + fc2(gelu(g) * cat(i,
    dwconv(c)))``, twice: a product of two slices of one layer's output."""

    def __init__(self, c=8, num_classes=5, hidden=12, conv=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.fc1 = nn.ModuleList([nn.Linear(c, 2 * hidden) for _ in range(2)])
        self.conv = nn.ModuleList([nn.Conv2d(conv, conv, 3, padding=1, groups=conv) for _ in range(2)])
        self.fc2 = nn.ModuleList([nn.Linear(hidden, c) for _ in range(2)])
        self.sizes = (hidden, hidden - conv, conv)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        for f1, conv, f2 in zip(self.fc1, self.conv, self.fc2, strict=True):
            g, i, c = torch.split(f1(x), self.sizes, dim=-1)
            c = conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            x = x + f2(F.gelu(g) * torch.cat((i, c), dim=-1))
        return self.fc(x.mean((1, 2)))


class StdConvNet(nn.Module):
    """NF-ResNet-like: timm's weight-standardized ``ScaledStdConv2d`` (``gain x gamma / sqrt(fan_in) x (w - mean) /
    sqrt(var + eps)`` per filter) in a residual bottleneck, gains away from their init."""

    def __init__(self, c=8, num_classes=5):
        super().__init__()
        from timm.layers import ScaledStdConv2d

        self.stem = ScaledStdConv2d(3, c, 3, padding=1)
        self.conv1 = ScaledStdConv2d(c, 2 * c, 1)
        self.conv2 = ScaledStdConv2d(2 * c, 2 * c, 3, padding=1)
        self.conv3 = ScaledStdConv2d(2 * c, c, 1)
        self.fc = nn.Linear(c, num_classes)
        with torch.no_grad():
            for m in (self.stem, self.conv1, self.conv2, self.conv3):
                m.gain.uniform_(0.5, 1.5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


MOTIFS = {
    "residual": Residual,
    "concat": Concat,
    "depthwise_se": DepthwiseSE,
    "flatten_spatial": FlattenSpatial,
    "norms": Norms,
    "hardcoded_view": HardCodedView,
    "shuffle": Shuffle,
}
# motifs whose channel ops compose block-wise, so a zero-init fusion is exactly the ensemble
BLOCKWISE = ["residual", "concat", "depthwise_se", "flatten_spatial", "hardcoded_view"]


def residual(num_classes=5):
    return Residual(num_classes=num_classes)


def concat(num_classes=5):
    return Concat(num_classes=num_classes)
