"""The model zoo that morph is checked on: every torchvision classification CNN and one small model
from each of 32 timm CNN families (the family is the timm module that registers the model)."""

# CI runs these (the cheapest of each torchvision prefix); benchmarks/coverage.py runs every model.
TORCHVISION_CI = [
    "alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "googlenet",
    "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_1",
    "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
]

TIMM_FAMILIES = {
    "resnet": "resnet10t", "regnet": "regnetx_002", "efficientnet": "efficientnet_b0", "mobilenetv3": "lcnet_050",
    "ghostnet": "ghostnet_050", "rexnet": "rexnetr_100", "densenet": "densenet121", "dpn": "dpn48b",
    "dla": "dla34", "cspnet": "cs3darknet_focus_s", "vovnet": "ese_vovnet19b_slim", "hrnet": "hrnet_w18_small",
    "res2net": "res2net50_14w_8s", "sknet": "skresnet18", "selecsls": "selecsls42b", "tresnet": "tresnet_m",
    "convnext": "convnext_atto", "convmixer": "convmixer_768_32", "byobnet": "repvgg_a0",
    "hardcorenas": "hardcorenas_a", "inception_v3": "inception_v3", "xception_aligned": "xception41",
    "resnest": "resnest14d", "hgnet": "hgnetv2_b0", "repghost": "repghostnet_050", "fasternet": "fasternet_t0",
    "inception_next": "inception_next_tiny", "starnet": "starnet_s050", "senet": "legacy_seresnet18",
    "resnetv2": "resnetv2_50", "metaformer": "poolformer_s12", "rdnet": "rdnet_tiny",
}

# torchvision models that are not CNNs (attention): outside morph's scope
NOT_CNN = ("vit_", "swin_", "maxvit_")

# trace input (C, H, W); the default is 3x64x64
INPUT_SIZE = {
    "torchvision/inception_v3": (3, 299, 299),  # its auxiliary head (traced in train mode) needs 299
    "timm/inception_v3": (3, 96, 96),
}


def spec_input_size(spec: str) -> tuple[int, int, int]:
    return INPUT_SIZE.get(spec, (3, 64, 64))


def ci_specs() -> list[str]:
    return [f"torchvision/{n}" for n in TORCHVISION_CI] + [f"timm/{n}" for n in TIMM_FAMILIES.values()]


def all_specs() -> list[str]:
    import torchvision.models as tvm

    tv = [n for n in tvm.list_models(module=tvm) if not n.startswith(NOT_CNN)]
    return [f"torchvision/{n}" for n in tv] + [f"timm/{n}" for n in TIMM_FAMILIES.values()]
