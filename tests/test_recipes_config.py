"""Recipe configs: shipped files, YAML loading, key=value overrides and their errors."""

from __future__ import annotations

import pytest
import yaml
from morph.recipes.config import (
    CONFIG_DIR,
    Config,
    apply_overrides,
    config_from_dict,
    list_configs,
    load_config,
    save_config,
)
from morph.recipes.run import check_run_dir

PAPER_CONFIGS = {"cifar10-wrn28-10", "cifar100-wrn28-10", "imagenet-resnet50"}


def test_every_shipped_config_loads_and_opens_with_its_launch_line():
    names = set(list_configs())
    assert {"cifar10-smoke", "cifar10-wrn16-2-cpu"} | PAPER_CONFIGS <= names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and ("morph train" in first or "torchrun" in first), (name, first)
        assert f"train {name}" in first, (name, first)


def test_paper_settings():
    c10 = load_config("cifar10-wrn28-10")
    assert (c10.model.arch, c10.model.depth, c10.model.widen_factor, c10.model.norm) == ("wrn", 28, 10, "block")
    assert (c10.optim.lr, c10.optim.momentum, c10.optim.weight_decay, c10.optim.batch_size) == (0.1, 0.9, 5e-4, 128)
    assert (c10.optim.schedule, c10.growth.epochs, c10.growth.budget, c10.growth.width) == ("cosine", 200, 0.45, 0.5)
    assert c10.data.cutout == 16
    assert load_config("cifar100-wrn28-10").data.dataset == "cifar100"
    inet = load_config("imagenet-resnet50")
    assert inet.model.arch == "torchvision/resnet50"
    assert (inet.optim.schedule, inet.optim.milestones, inet.growth.epochs) == ("step", [30.0, 60.0, 80.0], 90)
    assert (inet.optim.batch_size, inet.optim.weight_decay, inet.growth.budget) == (256, 1e-4, 0.35)


def test_overrides_parse_yaml_values_and_coerce_types():
    cfg = load_config(
        "cifar10-smoke",
        [
            "optim.lr=5e-4",
            "growth.methods=[large, mixturegrowth]",
            "data.root=null",
            "run.seeds=[0,1,2]",
            "optim.weight_decay=0",
            "model.widen_factor=4",
            "optim.nesterov=true",
        ],
    )
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)  # "5e-4" is a string in YAML 1.1
    assert cfg.growth.methods == ["large", "mixturegrowth"]
    assert cfg.data.root is None and cfg.run.seeds == [0, 1, 2]
    assert cfg.optim.weight_decay == 0.0 and cfg.model.widen_factor == 4.0 and cfg.optim.nesterov is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr", "bad override 'optim.lr': expected key=value"),
        ("=3", "bad override '=3': expected key=value"),
        ("optimizer.lr=0.1", "unknown config key 'optimizer.lr'"),
        ("optim.lrr=0.1", "unknown config key optim.lrr; valid keys under optim:"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("optim.batch_size=1.5", "optim.batch_size: expected an integer"),
        ("optim.nesterov=maybe", "optim.nesterov: expected true or false"),
        ("growth.methods=large", "growth.methods: expected a list"),
        ("growth.methods=[large,huge]", "growth.methods='huge' is not one of"),
        ("optim.schedule=linear", "optim.schedule='linear' is not one of: cosine, step"),
        ("growth.init=magic", "growth.init='magic' is not one of"),
        ("growth.width=1.5", "growth.width must be in (0, 1)"),
        ("model.depth=27", "model.depth must be 6n+4"),
        ("optim.lr=[1", "the value is not valid YAML"),
        ("optim.lr.x=1", "'lr' is a value, not a section"),
    ],
)
def test_bad_overrides_raise_one_line_value_errors(override, message):
    with pytest.raises(ValueError) as info:
        load_config("cifar10-smoke", [override])
    text = str(info.value)
    assert message in text and "\n" not in text


def test_unknown_config_names_the_shipped_ones():
    with pytest.raises(ValueError, match=r"unknown config 'cifar11'.*shipped configs: .*cifar10-smoke"):
        load_config("cifar11")


def test_config_file_path_and_resolved_config_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  depth: 16\n  widen_factor: 2\noptim:\n  weight_decay: 1e-4\n")
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.model.depth == 16 and cfg.optim.weight_decay == 1e-4
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    assert again == cfg
    path.write_text("optim:\n  lr: [\n")
    with pytest.raises(ValueError, match="mine.yaml is not valid YAML"):
        load_config(str(path))
    path.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(ValueError, match=r"mine.yaml: unknown config key optimizer"):
        load_config(str(path))


def test_run_dir_refuses_another_config_but_allows_run_settings(tmp_path):
    cfg = load_config("cifar10-smoke")
    save_config(cfg, tmp_path / "config.yaml")
    check_run_dir(tmp_path, load_config("cifar10-smoke", ["run.seeds=[0,1]", "growth.methods=[large]", "data.root=/x"]))
    with pytest.raises(ValueError, match=r"holds a run with optim.lr=0.05, not 0.1; pass another --out-dir"):
        check_run_dir(tmp_path, load_config("cifar10-smoke", ["optim.lr=0.1"]))


def test_defaults_validate():
    assert Config().validate().growth.methods[-1] == "mixturegrowth"
    d = apply_overrides({}, ["run.seeds=[3]"])
    assert d == {"run": {"seeds": [3]}}
