"""The model zoo morph is checked on (``tests/test_zoo.py``, ``benchmarks/coverage.py``): test data, not part
of the installed package.

- :data:`TORCHVISION_MODELS`: the cheapest model of each torchvision classification family, run in CI;
  the coverage table runs every torchvision classification CNN (:func:`torchvision_all`).
- :data:`TIMM_MODELS`: one model per timm CNN family (family -> model), the smallest variant of the
  family that morph can fuse back into the stock architecture (see the comments where that is not
  the smallest of all). :data:`TIMM_CI` is the subset CI runs; the coverage table runs all of them
  plus :data:`TIMM_EXTRA` (variants that show a documented limitation).

Everything is built with ``pretrained=False`` / ``weights=None``: nothing is downloaded.
"""

from __future__ import annotations

__all__ = [
    "TORCHVISION_MODELS", "TIMM_MODELS", "TIMM_CI", "TIMM_EXTRA", "TIMM_REFUSED", "TIMM_NOT_CNN", "NOT_CNN", "INPUT_SIZE", "FLOPS_INPUT_SIZE", "NOT_BLOCKWISE",
    "FLOPS_DEVIATIONS", "TIMM_TRANSFORMERS", "TIMM_TRANSFORMERS_REFUSED", "TORCHVISION_TRANSFORMERS",
    "TORCHVISION_TRANSFORMERS_REFUSED",
    "ATTENTION_WIDTH", "transformer_specs",
    "spec_input_size", "flops_input_size", "ci_specs", "all_specs", "torchvision_all",
]

# torchvision: the cheapest representative of each family the issue names
TORCHVISION_MODELS = [
    "alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "googlenet",
    "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_1",
    "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
]

# timm: family -> smallest variant (parameter count, timm 1.0; ``test_*`` debug models excluded). Where the
# smallest cannot be fused back into its stock architecture, the smallest that can (the other is in TIMM_EXTRA).
TIMM_MODELS = {
    "resnet": "resnet10t",
    "resnetv2": "resnetv2_18",
    "resnest": "resnest14d",
    "senet": "legacy_seresnet18",
    "sknet": "skresnet18",
    "res2net": "res2next50",
    "tresnet": "tresnet_m",
    "regnet": "regnetx_002",
    "regnetz": "regnetz_005",
    "efficientnet": "efficientnet_lite0",
    "efficientnetv2": "tf_efficientnetv2_b0",
    "mobilenetv2": "mobilenetv2_035",
    "mnasnet": "mnasnet_small",
    "fbnet": "fbnetc_100",
    "tinynet": "tinynet_b",  # tinynet_c/d/e: a 2-channel SE bottleneck halves to 1 channel, which cannot grow back
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv4": "mobilenetv4_conv_small_035",
    "lcnet": "lcnet_035",
    "lcnetv2": "lcnetv2_small",
    "hardcorenas": "hardcorenas_b",
    "ghostnet": "ghostnet_050",
    "repghost": "repghostnet_050",
    "rexnet": "rexnetr_100",  # rexnet_100 (4.8M): odd widths (27, 47 ... channels) that two halves cannot tile
    "densenet": "densenet121",
    "dpn": "dpn48b",
    "dla": "dla46x_c",
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "vovnet": "ese_vovnet19b_slim_dw",
    "hrnet": "hrnet_w18_small",
    "selecsls": "selecsls42",
    "hgnet": "hgnetv2_b0",
    "repvgg": "repvgg_a0",
    "mobileone": "mobileone_s1",
    "gernet": "gernet_m",  # gernet_s (8.2M): a 13-channel stem
    "repvit": "repvit_m1",
    "fastvit": "fastvit_t8",  # the T variants are convolutional (RepMixer); SA variants have attention
    "convnext": "convnext_zepto_rms",
    "convmixer": "convmixer_768_32",
    "mambaout": "mambaout_femto",
    "vgg": "vgg11",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_next": "inception_next_atto",
    "xception": "legacy_xception",
    "xception_aligned": "xception41p",
    "nasnet": "nasnetalarge",
    "pnasnet": "pnasnet5large",
    "fasternet": "fasternet_t0",
    "starnet": "starnet_s050",
    "metaformer": "poolformerv2_s12",
    "rdnet": "rdnet_tiny",
    "nfnet": "nf_regnet_b0",
    "convnextv2": "convnextv2_atto",  # global response norm
    "mixnet": "mixnet_s",  # mixed kernel sizes: channel splits into differently sized depthwise convs
    "spnasnet": "spnasnet_100",
    "byobnet": "resnet32ts",  # timm's generic block builder (gernet, repvgg, mobileone are its own families)
    "ghostnetv2": "ghostnetv2_100",
    "efficientnet_condconv": "efficientnet_cc_b0_4e",  # refused, with the reason: TIMM_REFUSED
}

# timm CNN families morph refuses at analysis, with the one-line reason the error gives
TIMM_REFUSED: dict[str, str] = {
    "timm/efficientnet_cc_b0_4e": "CondConv2d",
}

# timm families that are not CNNs (attention blocks) or not channel-analyzable by design: outside morph's scope,
# listed so that the coverage list is complete: vision transformers and hybrids (beit ... xcit, edgenext,
# efficientformer, efficientvit, levit, mobilevit, nextvit, swiftformer, tiny_vit, visformer ...), and
TIMM_NOT_CNN: dict[str, str] = {
    "cpubone": "ConvAttention blocks (attention)",
    "csatv2": "a DCT stem that indexes single channels, then attention stages",
}

# CI runs these families (cheap at 3x64x64 in float64); the others run in the coverage table only.
# Left out of CI for now (coverage table only): resnest (FLOPs ratio 0.388 not yet explained), fastvit (FLOPs
# check fails), metaformer (poolformerv2 scale_width fails), and families not yet run through every check.
TIMM_CI = [  # 31 families verified through every check of tests/test_zoo.py on this machine
    "resnet", "resnetv2", "senet", "sknet", "res2net", "regnet", "mobilenetv2", "mnasnet", "fbnet", "mobilenetv3",
    "mobilenetv4", "lcnet", "hardcorenas", "ghostnet", "repghost", "rexnet", "densenet", "dpn", "dla", "cspnet",
    "vovnet", "hrnet", "hgnet", "repvgg", "mobileone", "fasternet", "inception_next", "starnet",
    "convnextv2", "spnasnet", "byobnet",
]

# coverage only: the smallest variants that cannot be fused (odd or 1-channel widths), and common variants
TIMM_EXTRA = [
    "rexnet_100", "tinynet_e", "gernet_s", "efficientnet_b0", "convnext_atto", "poolformer_s12",
]

# torchvision models that are not CNNs (attention): outside morph's scope
NOT_CNN = ("vit_", "swin_", "swin3d", "maxvit_")

# trace input (C, H, W); the default is 3x64x64
INPUT_SIZE = {
    "torchvision/inception_v3": (3, 299, 299),  # its auxiliary head (traced in train mode) needs 299
    "timm/inception_v3": (3, 96, 96),
    "timm/inception_v4": (3, 96, 96),
    "timm/inception_resnet_v2": (3, 96, 96),
    "timm/nasnetalarge": (3, 96, 96),
    "timm/pnasnet5large": (3, 96, 96),
}

# FLOPs input (C, H, W): the model's default (timm: its pretrained_cfg, torchvision: 3x224x224), except
FLOPS_INPUT_SIZE = {
    "torchvision/inception_v3": (3, 299, 299),
}

# zero-initialized fusion is not the ensemble (a(x) + b(x)) / 2: channel ops that do not compose block-wise
_LN = "LayerNorm over channels: the fused statistics mix a's and b's channels"
_SHUFFLE = "channel shuffle interleaves a's and b's channels differently at full width"
_SQUEEZE = "ReLU after the conv classifier: the average is taken before it"


def _regnet(w: int) -> str:
    return f"grouped convs keep their group count ({w}-wide groups do not divide the half widths): a fused group mixes a's and b's channels"


NOT_BLOCKWISE: dict[str, str] = {
    **{f"torchvision/convnext_{s}": _LN for s in ("tiny", "small", "base", "large")},
    **{f"torchvision/shufflenet_v2_x{s}": _SHUFFLE for s in ("0_5", "1_0", "1_5", "2_0")},
    "torchvision/squeezenet1_0": _SQUEEZE,
    "torchvision/squeezenet1_1": _SQUEEZE,
    "torchvision/regnet_x_400mf": _regnet(16),
    "torchvision/regnet_x_1_6gf": _regnet(24),
    "torchvision/regnet_x_3_2gf": _regnet(48),
    "torchvision/regnet_x_16gf": _regnet(128),
    "torchvision/regnet_x_32gf": _regnet(168),
    "torchvision/regnet_y_400mf": _regnet(8),
    "torchvision/regnet_y_800mf": _regnet(16),
    "torchvision/regnet_y_1_6gf": _regnet(24),
    "torchvision/regnet_y_3_2gf": _regnet(24),
    "torchvision/regnet_y_16gf": _regnet(112),
    "torchvision/regnet_y_32gf": _regnet(232),
    "torchvision/regnet_y_128gf": _regnet(264),
    "timm/convnext_zepto_rms": "RMSNorm over channels: the fused statistics mix a's and b's channels",
    "timm/convnext_atto": _LN,
    "timm/mambaout_femto": _LN,
    "timm/rdnet_tiny": _LN,
    "timm/convnextv2_atto": "global response norm divides by the mean channel norm, and LayerNorm over channels",
    "timm/inception_next_atto": "its token mixer splits channels into branches whose sizes are rounded per width",
    "timm/poolformerv2_s12": "GroupNorm with one group and LayerNorm over channels",
    "timm/poolformer_s12": "GroupNorm with one group normalizes over all channels",
    "timm/nf_regnet_b0": "scaled weight standardization normalizes each fused filter over the whole fan-in, zero tiles included",
}

# FLOPs ratio (half / original, per image at batch 64) outside 0.25 +- 0.03, and why: ops whose cost is
# linear in the width halve instead of quartering (the breakdown columns of docs/coverage.md)
_DW = "depthwise convs, the stem and the classifier halve instead of quartering (dw, edge columns)"
_GW = "grouped convs keep their group width, so their cost halves instead of quartering (dw column)"
_EDGE = "a small model: stem and head convs (fixed input or output width) halve instead of quartering (edge column)"
FLOPS_DEVIATIONS: dict[str, str] = {
    **{f"torchvision/efficientnet_b{i}": _DW for i in (0, 1, 2)},
    **{f"torchvision/mnasnet{s}": _DW for s in ("0_5", "0_75", "1_0", "1_3")},
    "torchvision/mobilenet_v2": _DW,
    "torchvision/mobilenet_v3_large": _DW,
    "torchvision/mobilenet_v3_small": _DW,
    "torchvision/shufflenet_v2_x0_5": _DW,
    **{f"torchvision/regnet_{s}": _GW for s in ("x_400mf", "x_800mf", "x_3_2gf", "x_8gf", "x_16gf", "x_32gf",
                                                 "y_800mf", "y_1_6gf", "y_8gf", "y_16gf", "y_32gf", "y_128gf")},
    "torchvision/resnext101_32x8d": _GW,
    "torchvision/squeezenet1_0": "the conv classifier (1000 fixed output channels at 13x13) is 31% of the FLOPs and halves",
    "torchvision/squeezenet1_1": "the conv classifier (1000 fixed output channels at 13x13) is 31% of the FLOPs and halves",
    "timm/resnest14d": "split-attention convs (radix 2) keep their group width: 54% of the FLOPs halve (dw column)",
    "timm/regnetx_002": _GW,
    "timm/regnetz_005": _GW,
    "timm/dpn48b": _GW,
    "timm/efficientnet_lite0": _DW,
    "timm/efficientnet_b0": _DW,
    "timm/mobilenetv2_035": _DW,
    "timm/mnasnet_small": _DW,
    "timm/fbnetc_100": _DW,
    "timm/tinynet_b": _DW,
    "timm/mobilenetv3_small_050": _DW,
    "timm/mobilenetv4_conv_small_035": _DW,
    "timm/lcnet_035": _DW,
    "timm/lcnetv2_small": _DW,
    "timm/hardcorenas_b": _DW,
    "timm/ghostnet_050": _DW,
    "timm/ghostnetv2_100": _DW,
    "timm/mixnet_s": _DW,
    "timm/spnasnet_100": _DW,
    "timm/repghostnet_050": _DW,
    "timm/fastvit_t8": _DW,
    "timm/starnet_s050": _DW,
    "timm/dla46x_c": _EDGE,
}


def spec_input_size(spec: str) -> tuple[int, int, int]:
    return INPUT_SIZE.get(spec, (3, 64, 64))


def flops_input_size(spec: str) -> tuple[int, int, int] | None:
    """FLOPs input size, ``None``: the model's default (``morph.graph.analyze.default_input_size``)."""
    return FLOPS_INPUT_SIZE.get(spec)


def torchvision_all() -> list[str]:
    """Every torchvision classification CNN (``torchvision.models.list_models(module=torchvision.models)``)."""
    import torchvision.models as tvm

    return [n for n in tvm.list_models(module=tvm) if not n.startswith(NOT_CNN)]


def ci_specs() -> list[str]:
    return [f"torchvision/{n}" for n in TORCHVISION_MODELS] + [f"timm/{TIMM_MODELS[f]}" for f in TIMM_CI]


def all_specs() -> list[str]:
    """Everything the coverage table runs: the CNNs, then the attention and token-mixing models (defined below)."""
    timm = list(TIMM_MODELS.values()) + [n for n in TIMM_EXTRA if n not in TIMM_MODELS.values()]
    return ([f"torchvision/{n}" for n in torchvision_all()] + [f"timm/{n}" for n in timm] + transformer_specs()
            + list(TIMM_TRANSFORMERS_REFUSED) + list(TORCHVISION_TRANSFORMERS_REFUSED))


# ------------------------------------------------------------------------------------------------
# attention and token-mixing models (issue 23): timm's smallest configurations (``test_*`` debug models where
# timm has them), at their own input size (ViTs without dynamic image size assert it). Coverage table only.
# ------------------------------------------------------------------------------------------------
TIMM_TRANSFORMERS = {
    "vit (debug, dynamic size, avg pool)": "test_vit",
    "vit (debug, 2 heads)": "test_vit2",
    "vit (debug, reg token, q/k norm, layer scale, latent attention pool)": "test_vit3",
    "vit": "vit_tiny_patch16_224",
    "deit": "deit_tiny_patch16_224",
    "vit (6 heads: heads mode)": "vit_small_patch16_224",
    "mixer": "mixer_s32_224",
    "resmlp": "resmlp_12_224",
    "gmlp": "gmlp_ti16_224",
    "vit (debug, RmsNorm)": "test_vit4",
    "swin": "swin_tiny_patch4_window7_224",
    "coatnet (debug)": "test_coatnet",
    "maxvit (debug)": "test_maxvit",
    "levit": "levit_128s",  # BatchNorm, per-head bias tables: the fusion is the ensemble exactly
    "deit (distillation token)": "deit_tiny_distilled_patch16_224",
    "cait (class attention, talking heads, layer scale)": "cait_xxs24_224",
    "pit (pooling stages, conv token pooling)": "pit_ti_224",
    "pvt_v2 (spatial-reduction attention, conv MLP)": "pvt_v2_b0",
    "visformer (conv stages, conv attention)": "visformer_tiny",
    "efficientformer (pooling mixers, last-stage attention)": "efficientformer_l1",
    "xcit (cross-covariance attention, Fourier position encoding)": "xcit_nano_12_p16_224",
    "vit (debug, relative-position MLP bias)": "test_vit_relpos",
    "maxvit": "maxvit_nano_rw_256",  # 2 heads in its first stage: head_dim mode
    # 3 heads in its first stage: head_dim mode; qkv as F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))
    "swinv2 (cosine attention, continuous position-bias MLP)": "swinv2_tiny_window8_256",
    # timm keeps these blocks out of fx; morph traces its stand-in forwards (morph/graph/forwards.py)
    "mobilevit (conv stages, patch unfold into a transformer)": "mobilevit_xxs",
    "efficientvit-mit (multi-scale ReLU linear attention)": "efficientvit_b0",
    "edgenext (split-transpose blocks, cross-covariance attention)": "edgenext_xx_small",
}

# attention modules that cannot halve their number of heads (3 heads, or 2 -> 1) change their head size
# (morph.graph.attention_width("head_dim")); all others grow the number of heads, each head keeping its size
ATTENTION_WIDTH: dict[str, str] = {
    **{f"timm/{n}": "head_dim" for n in ("test_vit", "test_vit2", "test_vit3", "test_vit4", "vit_tiny_patch16_224",
                                          "deit_tiny_patch16_224", "test_coatnet", "test_maxvit",
                                          "swin_tiny_patch4_window7_224", "deit_tiny_distilled_patch16_224",
                                          "pit_ti_224", "pvt_v2_b0", "visformer_tiny",
                                          "test_vit_relpos", "maxvit_nano_rw_256", "swinv2_tiny_window8_256")},
}

# timm attention/hybrid families morph refuses at analysis, with the op named in the one-line error
TIMM_TRANSFORMERS_REFUSED: dict[str, str] = {
    # fx leaf without a stand-in forward (v1's MobileVitBlock has one): its linear attention is not in the graph
    "timm/mobilevitv2_050": "MobileVitV2Block",
}

# torchvision's attention models (nn.MultiheadAttention rewritten by morph.graph.mha; Swin's fx-wrapped window
# attention read through its Linears' weights): family -> builder
TORCHVISION_TRANSFORMERS = {
    "vit (nn.MultiheadAttention)": "vit_b_16",
    "swin (shifted_window_attention)": "swin_t",
    "swin_v2 (cosine attention, continuous position bias MLP)": "swin_v2_t",
}

# torchvision's attention models, refused with the op named in the one-line error
TORCHVISION_TRANSFORMERS_REFUSED: dict[str, str] = {}

INPUT_SIZE.update({f"timm/{n}": (3, 160, 160) for n in ("test_vit", "test_vit2", "test_vit3", "test_vit4",
                                                         "test_vit_relpos")})
INPUT_SIZE.update({f"timm/{n}": (3, 224, 224) for n in ("vit_tiny_patch16_224", "deit_tiny_patch16_224",
                                                         "vit_small_patch16_224", "mixer_s32_224", "resmlp_12_224",
                                                         "gmlp_ti16_224", "swin_tiny_patch4_window7_224",
                                                         "levit_128s", "mobilevit_xxs", "edgenext_xx_small",
                                                         "efficientvit_b0", "deit_tiny_distilled_patch16_224",
                                                         "cait_xxs24_224", "pit_ti_224", "pvt_v2_b0",
                                                         "visformer_tiny", "efficientformer_l1",
                                                         "xcit_nano_12_p16_224")})
# torchvision's Swins run at any size (windows padded): 3x112x112 keeps their coverage rows short on a shared CPU
INPUT_SIZE.update({"torchvision/vit_b_16": (3, 224, 224), "torchvision/swin_t": (3, 112, 112),
                   "torchvision/swin_v2_t": (3, 112, 112)})
# torchvision's Swins start with 3 heads: head_dim mode; vit_b_16's 12 heads halve (heads mode)
ATTENTION_WIDTH.update({"torchvision/swin_t": "head_dim", "torchvision/swin_v2_t": "head_dim"})
NOT_BLOCKWISE.update({
    "torchvision/vit_b_16": _LN,
    "torchvision/swin_t": f"{_LN}; relative-position bias tables are shared by a's and b's heads",
    "torchvision/swin_v2_t": f"{_LN}; the position-bias MLP's hidden layer (fixed at 512) is shared by a's and b's heads",
})
INPUT_SIZE.update({"timm/test_coatnet": (3, 160, 160), "timm/test_maxvit": (3, 160, 160),
                   "timm/maxvit_nano_rw_256": (3, 256, 256), "timm/swinv2_tiny_window8_256": (3, 256, 256)})

_TOKENS = "a token-mixing Linear is one weight shared by a's and b's channels"
NOT_BLOCKWISE.update({
    **{f"timm/{n}": _LN for n in ("test_vit", "test_vit2", "test_vit3", "vit_tiny_patch16_224",
                                   "deit_tiny_patch16_224", "vit_small_patch16_224")},
    "timm/mixer_s32_224": f"{_LN}; {_TOKENS}",
    "timm/resmlp_12_224": _TOKENS,
    "timm/gmlp_ti16_224": f"{_LN}; {_TOKENS} (spatial gating unit)",
    "timm/test_coatnet": f"{_LN}; relative-position bias tables are shared by a's and b's heads",
    "timm/test_maxvit": f"{_LN}; relative-position bias tables are shared by a's and b's heads",
    "timm/test_vit4": "RMSNorm over channels: the fused statistics mix a's and b's channels",
    "timm/swin_tiny_patch4_window7_224": f"{_LN}; relative-position bias tables are shared by a's and b's heads",
    **{f"timm/{n}": _LN for n in ("deit_tiny_distilled_patch16_224", "pvt_v2_b0", "pit_ti_224",
                                   "xcit_nano_12_p16_224")},
    "timm/test_vit_relpos": f"{_LN}; the relative-position MLP's per-head bias is shared by a's and b's channels",
    "timm/cait_xxs24_224": f"{_LN}; talking heads mix a's and b's heads",
    "timm/maxvit_nano_rw_256": f"{_LN}; relative-position bias tables are shared by a's and b's heads",
    "timm/visformer_tiny": "head_dim mode: a's and b's channels share each head's softmax",
    "timm/efficientformer_l1": f"{_LN} (last stage)",
    "timm/mobilevit_xxs": _LN,
    "timm/edgenext_xx_small": _LN,
    "timm/efficientvit_b0": f"{_LN} (classifier head)",
    "timm/swinv2_tiny_window8_256": f"{_LN}; cosine attention normalizes each head over a's and b's channels together",
})

# small transformers: the patch embedding and the head (one side fixed) halve instead of quartering (edge column);
# the attention products (counted by morph.flops and zoo_check's breakdown through a scaled_dot_product_attention
# handle) halve in head_dim mode, where the head size halves and the number of tokens stays
_ATTN = "patch embedding, head and token-mixing Linears (one side fixed) halve instead of quartering (edge column)"
FLOPS_DEVIATIONS.update({f"timm/{n}": _ATTN for n in (
    "test_vit", "test_vit2", "gmlp_ti16_224")})
_HEAD_DIM_ATTN = ("attention products (q.k and attn.v) halve instead of quartering: head_dim mode halves the head size "
                  "and keeps the tokens and the head count")
FLOPS_DEVIATIONS.update({f"timm/{n}": _HEAD_DIM_ATTN for n in (
    "test_vit3", "test_vit4", "test_coatnet", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224", "pvt_v2_b0", "pit_ti_224")})
FLOPS_DEVIATIONS["timm/test_vit_relpos"] = f"{_ATTN}; {_HEAD_DIM_ATTN}"
_OTHER = "the other column (ops whose FLOPs are linear in the width: norms, scales, pooling) halves instead of quartering"
FLOPS_DEVIATIONS.update({"timm/visformer_tiny": _OTHER, "timm/cait_xxs24_224": _OTHER})
FLOPS_DEVIATIONS.update({
    "timm/efficientvit_b0": "depthwise and grouped convs (MBConv's depthwise, LiteMLA's multi-scale aggregation: the "
                            "dw column, 11%) and the other column halve instead of quartering",
    "timm/mobilevit_xxs": "attention products (q.k and attn.v over every patch sequence: 15% of its FLOPs by "
                          "morph.flops) scale with the number of heads: they halve instead of quartering",
})


def transformer_specs() -> list[str]:
    """The attention and token-mixing models that pass (the refused ones: ``*_TRANSFORMERS_REFUSED``)."""
    return [f"timm/{n}" for n in TIMM_TRANSFORMERS.values()] + [
        f"torchvision/{n}" for n in TORCHVISION_TRANSFORMERS.values()]
