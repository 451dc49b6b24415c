"""A checkpoint is data: reading one never runs code, reads other files, reaches the network or allocates
what its metadata asks for.

A corpus of hostile checkpoints is written from a good one (timm ``test_resnet`` halves at 3x32x32). Every
case goes through ``morph.load`` and the ``inspect``, ``bake``, ``fuse`` and ``grow`` commands in one child
process (so that its peak memory can be measured), with the network cut off there: each must give a
one-line error (exit code 2 from the CLI), create no payload marker, write no file, attempt no connection,
and take under 10 s; the child's peak RSS stays under 2 GB.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

MARKER = "PWNED"
GB = 1 << 30
COMMANDS = ("load", "inspect", "bake", "fuse", "grow")


class _Payload:
    """Unpickling this creates the marker file (what a weights file named by a checkpoint could do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_cases(marker: str, pickle_path: str) -> dict[str, object]:
    """name -> a change to the good file's morph_info (a function of the parsed JSON) or raw metadata text."""

    def spec(src, model, **kwargs):
        return lambda i: i.update(spec={"source": src, "name": model, "kwargs": kwargs})

    def kwargs(**kw):
        return lambda i: i["spec"]["kwargs"].update(kw)

    def field(**kw):
        return lambda i: i.update(kw)

    return {
        # code named by the file
        "os-system": spec("callable", "os:system", command=f"touch {marker}"),
        "subprocess-call": spec("callable", "subprocess:call", args=["touch", marker]),
        "builtins-exec": spec("callable", "builtins:exec", source=f"open({marker!r}, 'w')"),
        "importlib": spec("callable", "importlib:import_module", name="antigravity"),
        "callable-as-timm": spec("timm", "os:system", command=f"touch {marker}"),
        "path-traversal-name": spec("timm", "../../etc/passwd"),
        # constructor arguments that read files, load weights or download
        "timm-checkpoint-path": kwargs(checkpoint_path=pickle_path),
        "timm-pretrained": kwargs(pretrained=True),
        "timm-overlay-file": kwargs(pretrained_cfg_overlay={"file": pickle_path}),
        "timm-pretrained-cfg": kwargs(pretrained_cfg={"url": "https://example.com/w.pth"}),
        "timm-cache-dir": kwargs(cache_dir="/tmp"),
        "torchvision-weights": spec("torchvision", "resnet18", weights="IMAGENET1K_V1"),
        "torchvision-weights-backbone": spec("torchvision", "resnet18", weights_backbone="IMAGENET1K_V1"),
        "kwarg-object": kwargs(drop_rate={"__class__": "os.system"}),
        # absurd sizes
        "input-200000": field(input_size=[3, 200000, 200000]),
        "templates-1e8": field(templates=10**8),
        "width-1e5": field(width=1e5),
        "num-classes-1e9": kwargs(num_classes=10**9),
        "factor-1e6": field(factor=10**6),
        # wrong types and inconsistent kinds
        "width-string": field(width="0.5"),
        "templates-float": field(templates=2.5),
        "input-size-text": field(input_size="3x32x32"),
        "set-ids-int": field(set_ids=5),
        "kwargs-list": lambda i: i["spec"].update(kwargs=[1, 2]),
        "kind-unknown": field(kind="evil"),
        "kind-fused-one-set": field(kind="fused"),
        "kind-plain-with-banks": field(kind="plain", set_ids=[], templates=0),
        "templates-mismatch": field(templates=3),
        "width-mismatch": field(width=0.25),
        "spec-not-object": field(spec="timm/resnet50"),
        "growth-which-unknown": field(extra={"growth": {"which": "../../etc", "from_width": 0.5}}),
        "growth-from-width-huge": field(extra={"growth": {"which": "internal", "from_width": 1e9}}),
        "not-json": "{not json",
        "json-list": "[1, 2, 3]",
    }


# ---------------------------------------------------------------------------------------------
# the child process


def _write_corpus(work: Path) -> tuple[Path, dict[str, Path]]:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import morph

    base = morph.build_model("timm/test_resnet", num_classes=10)
    good = work / "good.safetensors"
    morph.save(morph.convert(base, 0.5, seed=1, input_size=(3, 32, 32)), good)
    morph.save(morph.convert(base, 0.5, seed=2, input_size=(3, 32, 32)), work / "good2.safetensors")
    pkl = work / "weights.pth"
    pkl.write_bytes(pickle.dumps({"state_dict": _Payload(str(work / MARKER))}))
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(good))
    files = {}
    for name, change in hostile_cases(str(work / MARKER), str(pkl)).items():
        m = dict(meta)
        if isinstance(change, str):
            m["morph_info"] = change
        else:
            info = json.loads(meta["morph_info"])
            change(info)
            m["morph_info"] = json.dumps(info)
        files[name] = work / "corpus" / f"{name}.safetensors"
        files[name].parent.mkdir(exist_ok=True)
        save_file(tensors, str(files[name]), metadata=m)
    return good, files


def _child(work: Path) -> None:
    from morph.cli.main import app
    from typer.testing import CliRunner

    import morph

    good, files = _write_corpus(work)
    connections: list[str] = []

    def refuse(*args, **kwargs):
        connections.append(repr(args[:2]))
        raise OSError("network access attempted in a checkpoint security test")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.getaddrinfo = refuse  # type: ignore[assignment]

    runner = CliRunner()
    out_dir = work / "out"
    out_dir.mkdir()
    morph.load(good)  # warm up imports and kernels before timing
    results = []
    for name, path in files.items():
        for command in COMMANDS:
            before = sorted(p.name for p in work.rglob("*"))
            n_conn = len(connections)
            t0 = time.perf_counter()
            if command == "load":
                try:
                    morph.load(path)
                    code, message = 0, ""
                except morph.CheckpointError as e:
                    code, message = 2, f"error: {e}\n"
                except Exception as e:  # reported, and the test fails on it
                    code, message = 1, f"{type(e).__name__}: {e}\n"
            else:
                args = {"inspect": ["inspect", path, "--no-flops"], "bake": ["bake", path, "-o", out_dir / "b.safetensors"],
                        "fuse": ["fuse", path, work / "good2.safetensors", "-o", out_dir / "f.safetensors"],
                        "grow": ["grow", path, "-o", out_dir / "g.safetensors"]}[command]
                r = runner.invoke(app, [str(a) for a in args])
                code, message = r.exit_code, r.stderr + r.stdout
                if r.exception is not None and not isinstance(r.exception, SystemExit):
                    message += f"{type(r.exception).__name__}: {r.exception}"
            results.append({
                "case": name, "command": command, "code": code, "message": message,
                "seconds": time.perf_counter() - t0, "marker": (work / MARKER).exists(),
                "new_files": sorted(set(p.name for p in work.rglob("*")) - set(before)),
                "connections": connections[n_conn:],
            })
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"results": results, "peak_rss": peak}))


# ---------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, str(work)], capture_output=True, text=True, env=env,
                          cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(hostile_cases("M", "P")))
def test_hostile_checkpoint_is_refused_everywhere(corpus_run, case):
    rows = [r for r in corpus_run["results"] if r["case"] == case]
    assert [r["command"] for r in rows] == list(COMMANDS)
    for r in rows:
        where = f"{case} / {r['command']}"
        assert r["code"] == 2, f"{where}: exit {r['code']}: {r['message']}"
        lines = r["message"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}: {r['message']!r}"
        assert f"{case}.safetensors" in lines[0], f"{where}: the error does not name the file: {lines[0]}"
        assert not r["marker"], f"{where}: the payload ran"
        assert r["new_files"] == [], f"{where}: wrote {r['new_files']}"
        assert r["connections"] == [], f"{where}: tried the network {r['connections']}"
        assert r["seconds"] < 10, f"{where}: took {r['seconds']:.1f} s"


def test_hostile_corpus_peak_memory(corpus_run):
    assert corpus_run["peak_rss"] < 2 * GB, f"peak RSS {corpus_run['peak_rss'] / GB:.2f} GB"


def test_refusals_name_the_reason(corpus_run):
    msg = {r["case"]: r["message"] for r in corpus_run["results"] if r["command"] == "load"}
    assert "'os:system'" in msg["os-system"] and "trust_code=True" in msg["os-system"]
    assert "--trust-code" in msg["subprocess-call"]
    assert "'checkpoint_path'" in msg["timm-checkpoint-path"]
    assert "'pretrained'" in msg["timm-pretrained"]
    assert "'weights'" in msg["torchvision-weights"]
    assert "input_size 3x200000x200000" in msg["input-200000"]
    assert "templates 100000000" in msg["templates-1e8"]
    assert "width 100000.0" in msg["width-1e5"]
    assert "would allocate more than" in msg["num-classes-1e9"]
    assert "2 template set(s)" in msg["kind-fused-one-set"]
    assert "holds 2 templates, the metadata says 3" in msg["templates-mismatch"]
    assert "tensors do not match timm/test_resnet" in msg["width-mismatch"]


def test_check_kwargs_rules():
    from morph.safety import check_kwargs

    good = {"num_classes": 10, "drop_rate": 0.1, "drop_path_rate": 0.1, "init_weights": True, "act_layer": "relu",
            "out": [1, 2]}
    assert check_kwargs(good, "f") == good
    for name in ("checkpoint_path", "cache_dir", "model_dir", "weights_backbone", "hf_hub_id", "pretrained_cfg",
                 "file", "url", "download", "weights"):
        with pytest.raises(Exception, match=f"refuses model kwarg '{name}'"):
            check_kwargs({name: "x"}, "f")
    for bad in ({"pretrained": False}, {"my_weights_file": "x"}, {"x": {"a": 1}}, {"x": [[1]]}, {"x": float("nan")},
                {"not an identifier": 1}):
        with pytest.raises(Exception, match="^f: "):
            check_kwargs(bad, "f")


def test_allocation_budget_refuses_before_allocating():
    import torch

    from morph import CheckpointError
    from morph.safety import AllocationBudget

    with AllocationBudget(1000, "f.safetensors"):
        torch.zeros(10, 10)
        with pytest.raises(CheckpointError, match="f.safetensors: .* more than 1,000 elements"):
            torch.nn.Linear(10**6, 10**6)  # 4 TB: refused, never attempted


# ---------------------------------------------------------------------------------------------
# a user's own model still round-trips, when the caller says how to build it


def test_own_callable_model_round_trips_with_model_fn_or_trust_code(tmp_path):
    import motifs
    import torch

    import morph

    half = morph.convert(morph.build_model("motifs:residual", num_classes=7), 0.5, input_size=(3, 16, 16))
    path = morph.save(half, tmp_path / "own.safetensors")
    with pytest.raises(morph.CheckpointError, match=r"'motifs:residual'.*model_fn=.*trust_code=True"):
        morph.load(path)
    want = half.state_dict()
    x = torch.randn(2, 3, 16, 16)
    for model in (morph.load(path, model_fn=motifs.residual), morph.load(path, trust_code=True)):
        got = model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert torch.equal(model.eval()(x), half.eval()(x))
        assert morph.get_info(model).spec.spec == "motifs:residual"


def test_cli_trust_code_opt_in(tmp_path):
    from morph.cli.main import app
    from typer.testing import CliRunner

    import morph

    half = morph.convert(morph.build_model("motifs:residual", num_classes=7), 0.5, input_size=(3, 16, 16))
    path = str(morph.save(half, tmp_path / "own.safetensors"))
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", path, "--no-flops"])
    assert r.exit_code == 2 and "--trust-code" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["inspect", path, "--trust-code", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == "motifs:residual"


def test_installed_command_refuses_code_from_a_file(tmp_path):
    """The real entry point (not CliRunner): exit code 2, one line, and the payload never runs."""
    import morph

    half = morph.convert(morph.build_model("timm/test_resnet", num_classes=10), 0.5, input_size=(3, 32, 32))
    good = morph.save(half, tmp_path / "good.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
    info = json.loads(meta["morph_info"])
    marker = tmp_path / MARKER
    info["spec"] = {"source": "callable", "name": "os:system", "kwargs": {"command": f"touch {marker}"}}
    meta["morph_info"] = json.dumps(info)
    evil = tmp_path / "evil.safetensors"
    save_file(load_file(str(good)), str(evil), metadata=meta)
    proc = subprocess.run([sys.executable, "-m", "morph.cli.main", "inspect", str(evil)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "'os:system'" in proc.stderr and not marker.exists()


if __name__ == "__main__":
    _child(Path(sys.argv[1]))


# ---------------------------------------------------------------------------------------------
# the recipes' own checkpoints (resume reads them) and morph report's inputs follow the same rules


def _recipes_checkpoint(path: Path, meta_change=None, raw_meta: str | None = None) -> Path:
    import torch
    from morph.recipes.checkpoint import FORMAT
    from safetensors.torch import save_file

    meta = {"stage": "s/train", "steps": 4, "done": False, "world_size": 1,
            "progress": {"epoch": 1, "step": 4, "images": 64, "flops": 1.0, "wall_time": 1.0},
            "optim": {"param_groups": [], "scalars": {}}, "rng": [{"python": [3, [0], None], "numpy": ["MT19937", 0, 0, 0.0]}],
            "result": None}
    if meta_change:
        meta_change(meta)
    header = {"format": FORMAT, "meta": raw_meta if raw_meta is not None else json.dumps(meta)}
    save_file({"model.w": torch.zeros(2)}, str(path), metadata=header)
    return path


@pytest.mark.parametrize("change, raw, match", [
    (None, "{not json", "metadata is not valid JSON"),
    (lambda m: m.update(steps="4"), None, "steps is not a non-negative integer"),
    (lambda m: m["progress"].update(__class__=1), None, "progress must map"),
    (lambda m: m.update(done=True, result={"top1": 1.0, "model": 2}), None, "result must be null or map"),
    (lambda m: m.update(done=True), None, "a done stage has no result"),
    (lambda m: m.update(world_size=10**9), None, "world_size"),
    (lambda m: m.update(optim={"param_groups": "x"}), None, "optim must hold"),
    (lambda m: m.update(rng="x"), None, "rng must be a list"),
])
def test_recipes_checkpoint_metadata_is_checked(tmp_path, change, raw, match):
    from morph.recipes.checkpoint import load_checkpoint

    from morph import CheckpointError

    path = _recipes_checkpoint(tmp_path / "checkpoint.safetensors", change, raw)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_recipes_checkpoint_good_metadata_reads(tmp_path):
    from morph.recipes.checkpoint import load_checkpoint

    groups, meta = load_checkpoint(_recipes_checkpoint(tmp_path / "checkpoint.safetensors"))
    assert list(groups) == ["model"] and meta["steps"] == 4


@pytest.mark.parametrize("result, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"method": "large", "top1": "96"}), "a result needs"),
    (json.dumps([1, 2]), "a result needs"),
])
def test_report_inputs_are_checked(tmp_path, result, match):
    from morph.cli.main import app
    from typer.testing import CliRunner

    run = tmp_path / "run"
    (run / "seed0" / "large").mkdir(parents=True)
    (run / "config.yaml").write_text("name: c10\n")
    (run / "seed0" / "large" / "result.json").write_text(result)
    (run / "metrics.jsonl").write_text('{"kind": "epoch", "method": "large", "seed": 0}\n{cut short')
    r = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "result.json" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recorded", ["morph.recipes.models:wrn", "recipes.models:wrn"])
def test_morph_own_factories_load_without_opt_in(tmp_path, recorded):
    """The recipes' WRN is morph's own factory: a file may name it (also by the name earlier versions
    recorded), and morph calls its own function, not whatever the name would import."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import morph

    model = morph.build_model("morph.recipes.models:wrn", depth=10, widen_factor=1, num_classes=3)
    path = morph.save(model, tmp_path / "wrn.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    info = json.loads(meta["morph_info"])
    info["spec"]["name"] = recorded
    meta["morph_info"] = json.dumps(info)
    save_file(load_file(str(path)), str(path), metadata=meta)
    r = morph.load(path)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(r.eval()(x), model.eval()(x))
