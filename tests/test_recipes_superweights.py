"""SuperWeights rows of ``morph train``: parameter counts predicted before building, untying inside the trainer's
loop (each new coefficient in the optimizer once), kill and resume keeping the sharing bit for bit, ensembles'
loss and metrics against float64 definitions, the report's table, and the shipped configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from morph.recipes import report, run
from morph.recipes.checkpoint import load_checkpoint, model_tensors
from morph.recipes.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SuperWeightsConfig,
    load_config,
)
from morph.recipes.data import EpochBatches, build_data
from morph.recipes.distributed import setup
from morph.recipes.errors import RecipeError
from morph.recipes.models import wrn
from morph.recipes.superweights import (
    Members,
    SharingHook,
    evaluate_members,
    narrowed_width,
    restore_sharing,
    row_keys,
    sharing_state,
)
from morph.recipes.trainer import Stage, Trainer, make_schedule

from morph.errors import CheckpointError, MorphError
from morph.superweights.banks import superweight_layers
from morph.superweights.build import convert_shared, initial_clusters, prepare, template_layers
from morph.superweights.npas import allocate

SMOKE = "cifar10-superweights-smoke"
SMALL = ["data.image_size=16"]
INPUT = (3, 16, 16)


def _results(run_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("seed0/*/result.json")}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("swsmoke")
    run.main(SMOKE, out_dir=out, overrides=SMALL)
    return out


# --- the rows -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_runs_every_row_with_its_metrics(smoke_run):
    cfg = load_config(SMOKE, SMALL)
    results = _results(smoke_run)
    assert set(results) == {k for k, _, _ in row_keys(cfg.superweights)} == {
        "stock", "learned-76000", "shape-76000", "none-76000", "sw-ensemble", "deep-ensemble"}
    for key, r in results.items():
        s = r["superweights"]
        assert r["top1"] == s["top1"] and 0 <= s["top1"] <= 100, key
        assert r["test_loss"] == s["nll"] > 0 and 0 <= s["ece"] <= 1, key
        assert r["params"] == s["params"] and s["template_params"] <= s["params"], key
        assert s["test_images"] == 64
        n = 2 if "ensemble" in key else 1
        assert len(s["members"]) == n and (s["diversity"] >= 0)
        assert s["flops_forward"] == pytest.approx(sum(m["flops"] for m in s["members"]))
        assert len(s["subsets"]) == (3 if n == 2 else 0)  # anytime inference: every member subset
    # learned rows: warm-up stage, then the main model; coefficients untied inside the loop
    assert [st["stage"] for st in results["learned-76000"]["stages"]] == ["warmup", "train"]
    assert results["learned-76000"]["superweights"]["untied"] >= 1  # beta 0.9: gradients rarely agree that much
    assert results["sw-ensemble"]["superweights"]["untied"] >= 1
    untie = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()
             if '"untie"' in line]
    assert {u["method"] for u in untie} == {"learned-76000", "sw-ensemble"}
    # one network's members' values are the network's own
    st = results["stock"]["superweights"]
    assert st["members"][0]["top1"] == st["top1"] and st["diversity"] == 0.0
    # the deep ensemble is the SuperWeight ensemble's members, plain and independent
    widths = [m["width"] for m in results["deep-ensemble"]["superweights"]["members"]]
    assert widths == [1.0, 0.5]


@pytest.mark.slow
def test_parameter_counts_are_those_predicted_before_building(smoke_run):
    """Every row's template parameters equal :func:`allocate` over the row's clusters and shapes, computed here
    from the stock architecture (and, for learned rows, the clusters the run kept), and fit the budget."""
    cfg = load_config(SMOKE, SMALL)
    results = _results(smoke_run)
    budget = 76_000
    base = wrn(10, 1)
    stock, plan = prepare(base, 1.0, INPUT)
    layers = [((0, n), k, s) for n, k, s in template_layers(stock, plan)]
    shapes = {r: s for r, _, s in layers}

    def predicted(clusters, shp, b):
        return allocate([[shp[tuple(r)] for r in c] for c in clusters], b).template_params

    assert results["stock"]["superweights"]["template_params"] == sum(math.prod(s) for s in shapes.values())
    shape = predicted(initial_clusters(layers, "shape"), shapes, budget)
    assert results["shape-76000"]["superweights"]["template_params"] == shape <= budget
    kept = json.loads((smoke_run / "seed0/learned-76000/clusters.json").read_text())["clusters"]
    learned = predicted(kept, shapes, budget)
    assert results["learned-76000"]["superweights"]["template_params"] == learned <= budget
    w = narrowed_width(base, budget, INPUT)
    assert w < 1.0 and results["none-76000"]["superweights"]["width"] == w
    narrow, nplan = prepare(base, w, INPUT)
    nlayers = [((0, n), k, s) for n, k, s in template_layers(narrow, nplan)]
    nshapes = {r: s for r, _, s in nlayers}
    none = predicted([[r] for r, _, _ in nlayers], nshapes, budget)
    assert results["none-76000"]["superweights"]["template_params"] == none <= budget
    # the SuperWeight ensemble: WRN-10-1 and WRN-10-0.5 (members built as WRNs), one member's worth of templates
    members = [prepare(wrn(10, k), 1.0, INPUT) for k in (1.0, 0.5)]
    elayers = {(i, n): s for i, (m, p) in enumerate(members) for n, _, s in template_layers(m, p)}
    ekept = json.loads((smoke_run / "seed0/sw-ensemble/clusters.json").read_text())["clusters"]
    ebudget = sum(math.prod(s) for s in shapes.values())
    sw = results["sw-ensemble"]["superweights"]
    assert sw["budget"] == ebudget and sw["template_params"] == predicted(ekept, elayers, ebudget) <= ebudget
    # untying adds coefficients, never templates
    for key in ("learned-76000", "sw-ensemble"):
        assert results[key]["superweights"]["template_params_built"] == results[key]["superweights"]["template_params"]
    assert cfg.superweights.budgets == [budget]


class Crash(Exception):
    pass


@pytest.mark.slow
def test_kill_and_resume_keeps_the_sharing_bit_for_bit(tmp_path, monkeypatch):
    """A learned row killed after its coefficients were untied resumes from its checkpoint with the untied
    vectors (more than the fresh model has) and ends bit-identical to an uninterrupted run."""
    over = SMALL + ["superweights.rows=[learned]", "superweights.epochs=3", "superweights.beta=1.0"]
    run.main(SMOKE, out_dir=tmp_path / "ref", overrides=over)
    real = Trainer._step
    calls = {"n": 0}

    def crashing(self, *args):
        calls["n"] += 1
        if calls["n"] == 4 + 4 + 2:  # warm-up epoch (4 steps), main epoch 1 (then untie), half of epoch 2
            raise Crash
        return real(self, *args)

    monkeypatch.setattr(Trainer, "_step", crashing)
    with pytest.raises(Crash):
        run.main(SMOKE, out_dir=tmp_path / "run", overrides=over)
    monkeypatch.setattr(Trainer, "_step", real)
    ckpt = tmp_path / "run/seed0/learned-76000/train/checkpoint.safetensors"
    _, meta = load_checkpoint(ckpt)
    assert meta["progress"]["epoch"] == 1 and meta["hook"]["untied"] >= 1
    kept = json.loads((tmp_path / "run/seed0/learned-76000/clusters.json").read_text())["clusters"]
    start = convert_shared(wrn(10, 1), 1.0, 76_000, [[r[1] for r in c] for c in kept], tie=True, seed=0,
                           input_size=INPUT)
    fresh = sum(v[2] for v in sharing_state(start)["vectors"])
    assert sum(v[2] for v in meta["hook"]["vectors"]) == fresh + meta["hook"]["untied"]
    torch.manual_seed(123)
    run.main(SMOKE, out_dir=tmp_path / "run", overrides=over)
    ref, res = _results(tmp_path / "ref"), _results(tmp_path / "run")
    a, b = ref["learned-76000"], res["learned-76000"]
    assert a["superweights"] == b["superweights"] and a["top1"] == b["top1"]
    import morph

    ma = morph.load(tmp_path / "ref/seed0/learned-76000/model.safetensors")
    mb = morph.load(tmp_path / "run/seed0/learned-76000/model.safetensors")
    ta, tb = model_tensors(ma), model_tensors(mb)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert sharing_state(ma) == sharing_state(mb)  # which piece uses which vector, kept through the file too
    assert sum(v[2] for v in sharing_state(mb)["vectors"]) == fresh + a["superweights"]["untied"]


# --- the hook and the trainer ---------------------------------------------------------------------


def tiny_config() -> Config:
    return Config(
        name="tiny",
        data=DataConfig(synthetic=True, train_subset=64, test_subset=32, image_size=16, num_workers=0),
        model=ModelConfig(depth=10, widen_factor=1),
        optim=OptimConfig(batch_size=16, lr=0.05),
        run=RunConfig(device="cpu", progress=False, log_every=0),
        superweights=SuperWeightsConfig(rows=["stock"]),
    ).validate()


def _stage(trainer: Trainer, steps: int, key: str = "s/train") -> Stage:
    return Stage(key=key, seed=7, steps=steps, lr=make_schedule(trainer.cfg.optim, steps, trainer.steps_per_epoch, 10),
                 flops_per_image=1e6, labels={"seed": 0, "method": "learned", "stage": "train"})


def test_untying_in_the_loop_enters_each_new_vector_once(tmp_path):
    cfg = tiny_config()
    trainer = Trainer(cfg, build_data(cfg.data), setup("cpu"), tmp_path, flops_unit=1e9)
    model = convert_shared(wrn(10, 1), 1.0, None, "bins", tie=True, seed=0, input_size=INPUT)
    before = len(list(model.parameters()))
    hook = SharingHook(epoch=1, beta=1.0, batches=2)
    res = trainer.fit(model, _stage(trainer, 8), hook=hook)  # 2 epochs of 4 steps; untie after the first
    assert hook.untied >= 1
    params = [p for g in res.optimizer.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(res.model.parameters())) == before + hook.untied
    assert {id(p) for p in params} == {id(p) for p in res.model.parameters()}
    assert all("momentum_buffer" in res.optimizer.state[p] for p in params)  # the new vectors trained a step
    no_decay = [g for g in res.optimizer.param_groups if g["weight_decay"] == 0.0][0]["params"]
    assert {id(p) for p in no_decay} == {id(p) for n, p in res.model.named_parameters() if "coefficients" in n}


def test_restore_sharing_refuses_states_that_do_not_fit():
    import copy

    built = convert_shared(wrn(10, 1), 1.0, None, "bins", tie=True, seed=0, input_size=INPUT)

    def fresh():
        return copy.deepcopy(built)

    good = sharing_state(fresh())
    restore_sharing(fresh(), good, "ckpt")
    layer = good["coef"][0]
    bank = good["vectors"][0]
    bad = {
        "not an object": [1, 2],
        "bank unknown": {**good, "vectors": [[99, 0, 1]] + good["vectors"][1:]},
        "too many vectors": {**good, "vectors": [[bank[0], bank[1], 10**9]] + good["vectors"][1:]},
        "index out of range": {**good, "coef": [[layer[0], layer[1], [5] * len(layer[2])]] + good["coef"][1:]},
        "layer unknown": {**good, "coef": [[0, "nope", layer[2]]] + good["coef"][1:]},
        "layer twice": {**good, "coef": [layer] + good["coef"][:-1]},
        "wrong levels": {**good, "coef": [[layer[0], layer[1], layer[2] + [0]]] + good["coef"][1:]},
        "bool index": {**good, "coef": [[layer[0], layer[1], [True] * len(layer[2])]] + good["coef"][1:]},
    }
    for what, state in bad.items():
        with pytest.raises(CheckpointError, match=r"^ckpt: corrupt sharing state") as e:
            restore_sharing(fresh(), state, "ckpt")
        assert "\n" not in str(e.value), what
    # a state with untied vectors gives the fresh model those vectors and indices
    model = fresh()
    state = json.loads(json.dumps(good))
    mix = superweight_layers(model)[1][1].mix
    key = next(v for v in state["vectors"] if (v[0], v[1]) == (mix.banks[0].cluster, 0))
    key[2] += 1
    item = next(c for c in state["coef"] if c[1] == mix.ref[1])
    item[2][0] = key[2] - 1
    restore_sharing(model, state, "ckpt")
    assert mix.coef[0] == key[2] - 1 and len(mix.banks[0].coefficients) == key[2]
    assert sharing_state(model) == state


def test_ensemble_loss_is_the_sum_and_metrics_are_of_the_mean_softmax(tmp_path):
    """The trainer's loss of stacked logits is the sum of the members' cross-entropies; its test loss and top-1,
    and :func:`evaluate_members`, are those of the mean softmax, against a float64 computation here."""
    cfg = tiny_config()
    trainer = Trainer(cfg, build_data(cfg.data), setup("cpu"), tmp_path, flops_unit=1e9)
    torch.manual_seed(0)
    ens = Members([wrn(10, 1), wrn(10, 0.5)]).eval()
    trainer._stacked = True
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    out = ens(x)
    assert torch.allclose(trainer.loss(out, y), F.cross_entropy(out[0], y) + F.cross_entropy(out[1], y))
    ev = trainer.evaluate(ens)
    m = evaluate_members(trainer, ens)
    xs, ys = zip(*trainer.batches(EpochBatches(32, 16, shuffle=False, drop_last=False)), strict=True)
    with torch.no_grad():
        logits = torch.cat([ens(xb) for xb in xs], 1).double()
    yy = torch.cat(ys)
    probs = logits.softmax(-1)
    mean = probs.mean(0)
    nll = float(-mean[torch.arange(len(yy)), yy].log().mean())
    top1 = float((mean.argmax(1) == yy).double().mean())
    assert ev["loss"] == pytest.approx(nll, rel=1e-5) and ev["top1"] == pytest.approx(100 * top1)
    assert m["ensemble"]["nll"] == pytest.approx(nll, rel=1e-9) and m["ensemble"]["top1"] == top1
    for i in range(2):
        assert m["members"][i]["top1"] == float((probs[i].argmax(1) == yy).double().mean())


# --- configs --------------------------------------------------------------------------------------


GPU_CONFIGS = ["cifar100-wrn28-10-npas", "cifar100-wrn28-10-swn-ho", "cifar100-wrn28-10-swn-ho-120m",
               "cifar100-wrn28-swn-he"]


def test_paper_configs_hold_the_paper_settings():
    npas = load_config("cifar100-wrn28-10-npas")
    assert (npas.model.depth, npas.model.widen_factor, npas.data.dataset) == (28, 10, "cifar100")
    assert npas.superweights.rows == ["stock", "learned", "shape", "none"]
    assert (npas.superweights.tau, npas.superweights.beta, npas.superweights.untie_epoch) == (0.1, 0.9, 10)
    assert (npas.optim.schedule, npas.optim.milestones, npas.optim.gamma, npas.optim.nesterov) == (
        "step", [60, 120, 180], 0.2, True)
    ho = load_config("cifar100-wrn28-10-swn-ho")
    assert ho.superweights.members == [1.0] * 4 and ho.superweights.ensemble_share == "layer"
    assert ho.superweights.ensemble_budget is None and not ho.superweights.tie  # one WRN-28-10: 36.5M
    assert load_config("cifar100-wrn28-10-swn-ho-120m").superweights.ensemble_budget == 120_000_000
    he = load_config("cifar100-wrn28-swn-he")
    ks = [round(he.model.widen_factor * w, 9) for w in he.superweights.members]
    assert (he.model.depth, ks, he.superweights.ensemble_budget) == (28, [7, 4, 3], 18_000_000)
    assert he.data.cutout == 16 and he.optim.milestones == [60, 120, 160]


@pytest.mark.slow
@pytest.mark.parametrize("name", GPU_CONFIGS + ["cifar10-superweights-cpu"])
def test_shipped_configs_run_end_to_end_at_a_tiny_size(name, tmp_path):
    """Each config with a tiny override (synthetic data, WRN-10 at a small width, 1-2 epochs) runs every row."""
    cfg = load_config(name)
    tiny = ["data.synthetic=true", "data.train_subset=64", "data.test_subset=32", "data.image_size=16",
            "data.format=auto", "data.root=null", "data.num_workers=0", "model.depth=10", "optim.batch_size=32",
            "superweights.epochs=2", "superweights.warmup_epochs=1", "superweights.grad_batches=1",
            "superweights.untie_batches=1", "run.seeds=[0]", "run.device=cpu", "run.progress=false"]
    tiny += [f"model.widen_factor={cfg.model.widen_factor / 8 if cfg.model.widen_factor >= 4 else 0.25}"]
    if cfg.superweights.untie_epoch:
        tiny.append("superweights.untie_epoch=1")
    if cfg.superweights.member_depths is not None:
        tiny.append(f"superweights.member_depths={[10] * len(cfg.superweights.members)}")
    run.main(name, out_dir=tmp_path, overrides=tiny)
    results = _results(tmp_path)
    assert set(results) == {k for k, _, _ in row_keys(cfg.superweights)}
    for r in results.values():
        assert 0 <= r["top1"] <= 100 and r["superweights"]["template_params"] > 0
    files = report.main([tmp_path], tmp_path / "report")
    assert files.params_plot is not None and files.params_plot.read_bytes()[:4] == b"\x89PNG"


def test_config_errors_name_the_key():
    def bad(**sw):
        return Config(superweights=SuperWeightsConfig(**sw), growth=Config().growth)

    cases = {
        "superweights.rows='nope' is not one of": dict(rows=["nope"]),
        "superweights.rows lists a row twice": dict(rows=["stock", "stock"]),
        "superweights.budgets is empty": dict(rows=["learned"]),
        "superweights.budgets lists a budget twice": dict(rows=["learned"], budgets=[5, 5]),
        r"superweights.budgets\[0\]=0 must be": dict(rows=["shape"], budgets=[0]),
        "superweights.ensemble_share='x' is not one of": dict(rows=["sw-ensemble"], ensemble_share="x"),
        "superweights.members: 1 to 16": dict(rows=["sw-ensemble"], members=[]),
        "superweights.member_depths: 1 depths for 2 members": dict(rows=["sw-ensemble"], members=[1, 1],
                                                                   member_depths=[16]),
        r"superweights.member_depths\[0\]=15 is not a WRN depth": dict(rows=["sw-ensemble"], members=[1],
                                                                       member_depths=[15]),
        "superweights.tau=2.0 is a cosine threshold": dict(rows=["stock"], tau=2.0),
        "superweights.untie_batches=0 must be in": dict(rows=["stock"], untie_batches=0),
    }
    for msg, sw in cases.items():
        with pytest.raises(RecipeError, match=msg):
            bad(**sw).validate()
    cfg = Config(model=ModelConfig(arch="timm/resnet18"), superweights=SuperWeightsConfig(rows=["sw-ensemble"],
                                                                                          members=[1.0, 1.5]))
    with pytest.raises(RecipeError, match=r"superweights.members\[1\]=1.5: members of a timm/resnet18"):
        cfg.validate()
    # a SuperWeights-only config needs no growth method
    assert Config(growth=Config().growth, superweights=SuperWeightsConfig(rows=["stock"])).validate()
    c = Config()
    c.growth.methods = []
    with pytest.raises(RecipeError, match="growth.methods is empty"):
        c.validate()


def test_a_budget_below_a_row_is_refused_before_training(tmp_path):
    with pytest.raises(RecipeError, match=r"superweights.budgets: 60,000 is below 74,416, the least budget of the "
                                          r"shape row"):
        run.main(SMOKE, out_dir=tmp_path, overrides=SMALL + ["superweights.budgets=[60000]"])
    # member 0's layers (WRN-10-0.125: 1,908 weights) are below the least budget of the ensemble's depth bins
    with pytest.raises(RecipeError, match=r"superweights.ensemble_budget: 1,908 \(member 0's layers\) is below "):
        run.main(SMOKE, out_dir=tmp_path, overrides=SMALL + ["model.widen_factor=0.125", "superweights.rows=[sw-ensemble]"])
    assert not (tmp_path / "config.yaml").exists() and not list(tmp_path.glob("seed*"))


# --- the report -----------------------------------------------------------------------------------


def _sw_result(root, key, row, seed, top1, nll, budget=None, members=1):
    d = root / f"seed{seed}" / key
    d.mkdir(parents=True)
    m = [{"top1": top1 + i, "nll": nll, "ece": 0.05} for i in range(members)]
    sw = {"row": row, "budget": budget, "top1": top1, "nll": nll, "ece": 0.04, "diversity": 0.5 if members > 1 else 0,
          "template_params": 1000, "params": 1200, "flops_forward": 2e6, "members": m}
    (d / "result.json").write_text(json.dumps({"method": key, "label": key, "seed": seed, "top1": top1,
                                               "flops_norm": 1.0, "params": 1200, "superweights": sw}))


def test_report_table_means_and_paired_intervals(tmp_path):
    import yaml

    root = tmp_path / "r"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"name": "swcfg"}))
    vals = {"stock": [50.0, 52.0, 54.0], "learned-100": [51.0, 54.0, 54.0], "sw-ensemble": [60.0, 61.0, 65.0],
            "deep-ensemble": [62.0, 62.0, 62.0]}
    rows = {"stock": "stock", "learned-100": "learned", "sw-ensemble": "sw-ensemble", "deep-ensemble": "deep-ensemble"}
    for key, tops in vals.items():
        for seed, t in enumerate(tops):
            _sw_result(root, key, rows[key], seed, t, 1.0 + seed / 10, 100 if key.startswith("learned") else None,
                       3 if "ensemble" in key else 1)
    files = report.main([root], tmp_path / "out")
    table = files.text.split("Paired by seed")[0]
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert lines["stock"].startswith("| stock | 52.00 ± 2.00 (3) | 0: 50.00, 1: 52.00, 2: 54.00 | 1.100 ± 0.100 (3) |"
                                     " 4.00 ± 0.00 (3) | 1,000 | 1,200 | 2.00 | – | – |")
    assert lines["sw-ensemble"].endswith("| 0.500 ± 0.000 (3) | 62.00 / 63.00 / 64.00 |")
    data = files.data["superweights"]["configs"][0]
    assert [r["key"] for r in data["rows"]] == ["stock", "learned-100", "sw-ensemble", "deep-ensemble"]
    pairs = {(p["a"], p["b"]): p["top1"] for p in data["pairs"]}
    d = pairs[("learned-100", "stock")]  # differences 1, 2, 0: mean 1, std 1, t(0.975, 2) = 4.302653
    assert d["mean"] == pytest.approx(1.0) and d["std"] == pytest.approx(1.0)
    assert d["high"] - d["mean"] == pytest.approx(4.302652729 / math.sqrt(3), rel=1e-7)
    assert pairs[("sw-ensemble", "deep-ensemble")]["mean"] == pytest.approx(0.0)
    assert files.params_plot.read_bytes()[:4] == b"\x89PNG" and files.plot == files.params_plot
    assert not (tmp_path / "out" / "top1_vs_flops.png").exists()  # no growth rows: no growth plots


def test_report_refuses_a_bad_superweights_field(tmp_path):
    import yaml

    root = tmp_path / "r"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"name": "swcfg"}))
    _sw_result(root, "stock", "stock", 0, 50.0, 1.0)
    p = root / "seed0/stock/result.json"
    r = json.loads(p.read_text())
    for field, value, msg in (("ece", 2.0, "superweights.ece is not in"), ("row", "x", "superweights.row is not"),
                              ("members", [], "superweights.members is not a list"),
                              ("params", -1, "superweights.params is not a parameter count")):
        bad = json.loads(json.dumps(r))
        bad["superweights"][field] = value
        p.write_text(json.dumps(bad))
        with pytest.raises(MorphError, match=msg) as e:
            report.main([root], tmp_path / "out")
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists()


def test_the_hook_unties_without_changing_the_function(tmp_path):
    """Untying inside the loop (eval-mode coefficient gradients, no step) leaves the outputs bit-identical, adds
    the clones to the optimizer once, and writes one ``untie`` metrics record."""
    from morph.recipes.metrics import read_metrics
    from morph.recipes.trainer import build_optimizer

    cfg = tiny_config()
    trainer = Trainer(cfg, build_data(cfg.data), setup("cpu"), tmp_path, flops_unit=1e9)
    model = convert_shared(wrn(10, 1), 1.0, None, "bins", tie=True, seed=0, input_size=INPUT)
    opt = build_optimizer(model, cfg.optim)
    x = torch.randn(4, 3, 16, 16)
    before = model.eval()(x)
    n = len(list(model.parameters()))
    hook = SharingHook(epoch=2, beta=1.0, batches=2)
    stage = _stage(trainer, 8)
    assert not hook.after_epoch(trainer, model, opt, stage, 1)  # not its epoch
    assert hook.after_epoch(trainer, model, opt, stage, 2)
    assert torch.equal(model.eval()(x), before)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters())) == n + hook.untied
    recs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "untie"]
    assert len(recs) == 1 and recs[0]["new_vectors"] == hook.untied and recs[0]["step"] == 8


def test_the_committed_cpu_comparison_report_is_rederived_from_its_run_summaries(tmp_path):
    """``morph report`` over the committed run summaries of docs/results/cifar10-superweights-cpu gives the
    committed report.md, and every row has its 3 seeds."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "docs" / "results" / "cifar10-superweights-cpu"
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    files = report.main(dirs, tmp_path / "out")
    assert files.text == (root / "report.md").read_text()
    rows = files.data["superweights"]["configs"][0]["rows"]
    assert len(rows) == 9 and all(r["top1"]["n"] == 3 for r in rows)
