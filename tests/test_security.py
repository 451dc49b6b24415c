"""A checkpoint is data: reading one never runs code, reads weights, reaches the network, unpickles,
prints its text raw, or allocates and computes what its metadata asks for.

A corpus of hostile checkpoints, by class, is written from a good one (timm ``test_resnet`` halves at
3x32x32) and from a tiny one (one tensor of four floats, ~300 bytes, naming any model):

- ``code``: code named by the file (a callable, a module that writes a marker when imported);
- ``weights``: builders that load weights by default (torchvision detection/segmentation builders default
  ``weights_backbone`` to ImageNet weights: a pickle is planted at the torch hub cache path), and
  constructor arguments that load weights, read files or download;
- ``size``: absurd sizes (a ViT of huge depth, a Swin of huge window, huge ``num_classes``, ``embed_dim``,
  ``mlp_ratio``; a model that cannot be built on the meta device);
- ``text``: escape sequences and rich markup in metadata, tensor names and the file's path;
- ``metadata``: hostile JSON (non-ASCII digits, deep nesting, NaN/Infinity, huge numbers, wrong types);
- ``sets``: set ids with a trailing newline, templates and coefficients stored as integers or bools.

Every case goes through ``morph.load`` and the ``inspect``, ``bake``, ``fuse``, ``grow`` and ``cka`` (two
checkpoints) commands in one child process (so that its peak memory can be measured), with the network
cut off and audited there (``sys.addaudithook``): each must exit 2 with exactly one ``error:`` line that
names the file and holds no control character, attempt no connection, unpickle nothing, import nothing the
file names, write no file, and take under 10 s; the child's peak RSS stays under 2 GB.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procstat import peak_rss

MARKER = "PWNED"
GB = 1 << 30

READERS = ("load", "inspect", "bake", "fuse", "grow", "cka")
# torch hub cache names of the backbone weights torchvision's detection/segmentation builders default to
HUB_FILES = ("mobilenet_v3_large-8738ca79.pth", "resnet50-0676ba61.pth", "resnet101-63fe2227.pth",
             "vgg16_features-amdegroot-88682ab5.pth")
ESC = "\x1b]8;;https://evil.example\x07click\x1b]8;;\x07\x1b[2J\x1b[31m"  # a link, clear screen, red


class _Payload:
    """Unpickling this creates the marker file (what a weights file named by a checkpoint could do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_cases(marker: str, pickle_path: str) -> dict[str, tuple[str, object]]:
    """name -> (class, change). A change is a function of the good file's parsed morph_info, raw morph_info
    text, or a ``("tiny", spec, kwargs)`` / ``("meta", dict)`` / ``("tensors", fn)`` / ``("path", name)`` tuple."""

    def spec(src, model, **kwargs):
        return lambda i: i.update(spec={"source": src, "name": model, "kwargs": kwargs})

    def kwargs(**kw):
        return lambda i: i["spec"]["kwargs"].update(kw)

    def field(**kw):
        return lambda i: i.update(kw)

    def tiny(src, model, **kw):
        return ("tiny", {"source": src, "name": model, "kwargs": kw})

    def meta(**kw):
        return ("meta", kw)

    def retype(suffix, dtype):
        def change(tensors):
            import torch

            for k in list(tensors):
                if k.endswith(suffix):
                    tensors[k] = (tensors[k] * 0 + 1).to(getattr(torch, dtype))
        return ("tensors", change)

    def rename_tensor(new):
        def change(tensors):
            k = next(k for k in tensors if k.endswith(".templates"))
            tensors[new] = tensors.pop(k)
        return ("tensors", change)

    return {
        # code named by the file
        "os-system": ("code", spec("callable", "os:system", command=f"touch {marker}")),
        "subprocess-call": ("code", spec("callable", "subprocess:call", args=["touch", marker])),
        "builtins-exec": ("code", spec("callable", "builtins:exec", source=f"open({marker!r}, 'w')")),
        "importlib": ("code", spec("callable", "importlib:import_module", name="antigravity")),
        "module-on-path": ("code", spec("callable", "secmod:build")),
        "callable-as-timm": ("code", spec("timm", "os:system", command=f"touch {marker}")),
        "path-traversal-name": ("code", spec("timm", "../../etc/passwd")),
        # weights: builders that load weights by default, and arguments that load weights, read files, download
        "tv-lraspp": ("weights", tiny("torchvision", "lraspp_mobilenet_v3_large")),
        "tv-fcn-resnet50": ("weights", tiny("torchvision", "fcn_resnet50")),
        "tv-deeplabv3-mobilenet": ("weights", tiny("torchvision", "deeplabv3_mobilenet_v3_large")),
        "tv-retinanet": ("weights", tiny("torchvision", "retinanet_resnet50_fpn")),
        "tv-ssdlite": ("weights", tiny("torchvision", "ssdlite320_mobilenet_v3_large", num_classes=3)),
        "tv-ssd300-vgg16": ("weights", tiny("torchvision", "ssd300_vgg16")),
        "tv-lraspp-half": ("weights", spec("torchvision", "lraspp_mobilenet_v3_large", num_classes=10)),
        "timm-checkpoint-path": ("weights", kwargs(checkpoint_path=pickle_path)),
        "timm-pretrained": ("weights", kwargs(pretrained=True)),
        "timm-overlay-file": ("weights", kwargs(pretrained_cfg_overlay={"file": pickle_path})),
        "timm-pretrained-cfg": ("weights", kwargs(pretrained_cfg={"url": "https://example.com/w.pth"})),
        "timm-cache-dir": ("weights", kwargs(cache_dir="/tmp")),
        "torchvision-weights": ("weights", spec("torchvision", "resnet18", weights="IMAGENET1K_V1")),
        "torchvision-weights-backbone": ("weights", spec("torchvision", "fcn_resnet50", weights_backbone="DEFAULT")),
        "kwarg-object": ("weights", kwargs(drop_rate={"__class__": "os.system"})),
        # absurd sizes: refused on the meta device, by module count, or by the allocation budget
        "vit-depth": ("size", tiny("timm", "vit_tiny_patch16_224", depth=32768)),
        "vit-depth-1e6": ("size", tiny("timm", "vit_tiny_patch16_224", depth=10**6)),
        "swin-window": ("size", tiny("timm", "swin_tiny_patch4_window7_224", window_size=4096, img_size=16384)),
        "vit-embed-dim": ("size", tiny("timm", "vit_tiny_patch16_224", embed_dim=32768, num_heads=1)),
        "vit-mlp-ratio": ("size", tiny("timm", "vit_tiny_patch16_224", mlp_ratio=30000.0)),
        "resnet-num-classes": ("size", tiny("timm", "resnet18", num_classes=32768)),
        "convnext-dims": ("size", tiny("timm", "convnext_atto", dims=[32768, 32768, 32768, 32768])),
        "tv-vit-image-size": ("size", tiny("torchvision", "vit_b_16", image_size=32768)),
        "tv-regnet-not-on-meta": ("size", tiny("torchvision", "regnet_y_128gf")),
        "tv-regnet-classes": ("size", tiny("torchvision", "regnet_y_400mf", num_classes=32768)),
        "half-num-classes": ("size", kwargs(num_classes=32768)),
        "num-classes-1e9": ("size", kwargs(num_classes=10**9)),
        "input-200000": ("size", field(input_size=[3, 200000, 200000])),
        "templates-1e8": ("size", field(templates=10**8)),
        "width-1e5": ("size", field(width=1e5)),
        "factor-1e6": ("size", field(factor=10**6)),
        "growth-from-width-huge": ("size", field(extra={"growth": {"which": "internal", "from_width": 1e9}})),
        # text from the file: escape sequences, markup, a hostile path
        "text-kind": ("text", field(kind=ESC)),
        "text-spec-name": ("text", spec("timm", ESC)),
        "text-kwarg-name": ("text", kwargs(**{"x" + ESC: 1})),
        "text-kwarg-value": ("text", kwargs(act_layer=ESC + "[link=https://e.example]x[/link]")),
        "text-set-id": ("text", field(set_ids=[ESC])),
        "text-version": ("text", meta(format_version=ESC)),
        "text-tensor-name": ("text", rename_tensor("stem" + ESC + "[/][link=https://e.example]x.templates")),
        "text-path-markup": ("text", ("path", "a[/]b[link=https://e.example]c[/link][bold]")),
        "text-path-escape": ("text", ("path", "p" + ESC.replace("/", "_"))),
        # hostile metadata
        "version-arabic-digit": ("metadata", meta(format_version="\u0661")),
        "version-superscript": ("metadata", meta(format_version="\u00b2")),
        "version-huge": ("metadata", meta(format_version="9" * 5000)),
        "json-deep-list": ("metadata", "[" * 100_000 + "]" * 100_000),
        "json-deep-kwargs": ("metadata", kwargs(act_layer=json.loads("[" * 50 + "]" * 50))),
        "json-nan": ("metadata", '{"kind": "half", "width": NaN}'),
        "json-infinity": ("metadata", '{"kind": "half", "width": Infinity}'),
        "json-1e999": ("metadata", '{"kind": "half", "width": 1e999}'),
        "json-huge-int": ("metadata", '{"kind": "half", "width": 1' + "0" * 4000 + "}"),
        "json-digits-limit": ("metadata", '{"kind": "half", "width": 1' + "0" * 5000 + "}"),
        "width-huge-int": ("metadata", field(width=10**400)),
        "templates-bool": ("metadata", field(templates=True)),
        "width-string": ("metadata", field(width="0.5")),
        "templates-float": ("metadata", field(templates=2.5)),
        "input-size-text": ("metadata", field(input_size="3x32x32")),
        "set-ids-int": ("metadata", field(set_ids=5)),
        "kwargs-list": ("metadata", lambda i: i["spec"].update(kwargs=[1, 2])),
        "spec-missing": ("metadata", lambda i: i.pop("spec")),
        "spec-not-object": ("metadata", field(spec="timm/resnet50")),
        "extra-growth-list": ("metadata", field(extra={"growth": [1, 2]})),
        "original-shapes-text": ("metadata", field(original={"shapes": {"a": "x"}})),
        "kind-unknown": ("metadata", field(kind="evil")),
        "kind-list": ("metadata", field(kind=["half"])),
        "kind-fused-one-set": ("metadata", field(kind="fused")),
        "kind-plain-with-banks": ("metadata", field(kind="plain", set_ids=[], templates=0)),
        "templates-mismatch": ("metadata", field(templates=3)),
        "width-mismatch": ("metadata", field(width=0.25)),
        "growth-which-unknown": ("metadata", field(extra={"growth": {"which": "../../etc", "from_width": 0.5}})),
        "format-foreign": ("metadata", meta(format="pickle")),
        "not-json": ("metadata", "{not json"),
        "json-list": ("metadata", "[1, 2, 3]"),
        # template sets and tensor dtypes
        "set-id-newline": ("sets", field(set_ids=["seed2\n"])),
        "set-id-space": ("sets", field(set_ids=["seed 2"])),
        "set-id-long": ("sets", field(set_ids=["s" * 65])),
        "templates-int64": ("sets", retype(".templates", "int64")),
        "templates-bool-dtype": ("sets", retype(".templates", "bool")),
        "coefficients-int32": ("sets", retype(".mix.coefficients", "int32")),
        "bias-int64": ("sets", retype(".bias", "int64")),
    }


# ---------------------------------------------------------------------------------------------
# the child process


def _write_corpus(work: Path) -> tuple[Path, dict[str, Path]]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import morph

    base = morph.build_model("timm/test_resnet", num_classes=10)
    good = work / "good.safetensors"
    morph.save(morph.convert(base, 0.5, seed=1, input_size=(3, 32, 32)), good)
    morph.save(morph.convert(base, 0.5, seed=2, input_size=(3, 32, 32)), work / "good2.safetensors")
    payload = pickle.dumps({"state_dict": _Payload(str(work / MARKER))})
    pkl = work / "weights.pth"
    pkl.write_bytes(payload)
    hub = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    for name in HUB_FILES:  # what a weights_backbone download would torch.load
        (hub / name).write_bytes(payload)
    (work / "secmod.py").write_text(f"open({str(work / MARKER)!r}, 'w')\ndef build(**kw):\n    return None\n")
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    good_tensors = load_file(str(good))
    files = {}
    (work / "corpus").mkdir()
    for name, (_, change) in hostile_cases(str(work / MARKER), str(pkl)).items():
        m, tensors, file_name = dict(meta), dict(good_tensors), f"{name}.safetensors"
        if isinstance(change, str):
            m["morph_info"] = change
        elif isinstance(change, tuple) and change[0] == "tiny":
            info = {"kind": "plain", "spec": change[1], "width": 1.0, "input_size": [3, 32, 32]}
            m["morph_info"], tensors = json.dumps(info), {"w": torch.zeros(4)}
        elif isinstance(change, tuple) and change[0] == "meta":
            m.update(change[1])
        elif isinstance(change, tuple) and change[0] == "tensors":
            change[1](tensors)
        elif isinstance(change, tuple) and change[0] == "path":  # a good-looking file whose path is hostile
            info = json.loads(meta["morph_info"])
            info["templates"] = 3
            m["morph_info"], file_name = json.dumps(info), change[1] + ".safetensors"
        else:
            info = json.loads(meta["morph_info"])
            change(info)
            m["morph_info"] = json.dumps(info)
        files[name] = work / "corpus" / file_name
        files[name].parent.mkdir(parents=True, exist_ok=True)  # a "/" in a hostile name is a folder
        save_file(tensors, str(files[name]), metadata=m)
    return good, files


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(root / c / f"{i}.png")
    return root


AUDITED = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request", "pickle.find_class",
           "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn")


def _child(work: Path) -> None:
    events: list[str] = []

    def audit(event, args):
        if event in AUDITED:
            events.append(event)

    sys.addaudithook(audit)  # before morph's own: every attempt is seen, even the ones morph then refuses
    sys.path.insert(0, str(work))  # secmod.py is importable: importing it writes the marker

    from morph.cli.main import app
    from typer.testing import CliRunner

    import morph
    from morph.text import printable

    good, files = _write_corpus(work)
    imgs = _image_folder(work / "imgs")
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
    morph.load(good)  # warm up imports before timing
    runner.invoke(app, ["inspect", str(good), "--no-flops"])
    results = []
    for name, path in files.items():
        for command in READERS:
            before = sorted(str(p) for p in work.rglob("*"))
            n_conn, n_events, mods = len(connections), len(events), set(sys.modules)
            t0 = time.perf_counter()
            if command == "load":
                try:
                    morph.load(path)
                    code, message = 0, ""
                except morph.CheckpointError as e:
                    code, message = 2, f"error: {printable(' '.join(str(e).split()))}\n"
                except Exception as e:  # reported, and the test fails on it
                    code, message = 1, f"{type(e).__name__}: {e}\n"
            else:
                args = {"inspect": ["inspect", path, "--no-flops"],
                        "bake": ["bake", path, "-o", out_dir / "b.safetensors"],
                        "fuse": ["fuse", path, work / "good2.safetensors", "-o", out_dir / "f.safetensors"],
                        "grow": ["grow", path, "--method", "random", "-o", out_dir / "g.safetensors"],
                        "cka": ["cka", path, work / "good2.safetensors", "--data", imgs, "--batches", "1",
                                "--batch-size", "4", "--image-size", "32"]}[command]
                r = runner.invoke(app, [str(a) for a in args])
                code, message = r.exit_code, r.stderr + r.stdout
                if r.exception is not None and not isinstance(r.exception, SystemExit):
                    message += f"{type(r.exception).__name__}: {r.exception}"
            results.append({
                "case": name, "command": command, "code": code, "message": message, "file": printable(path.name),
                "seconds": time.perf_counter() - t0, "marker": (work / MARKER).exists(),
                "new_files": sorted(set(str(p) for p in work.rglob("*")) - set(before)),
                "connections": connections[n_conn:], "events": events[n_events:],
                "imported": sorted(m for m in set(sys.modules) - mods if m.split(".")[0] in ("secmod", "antigravity",
                                                                                            "this", "webbrowser")),
                "rss": peak_rss(),
            })
    peak = peak_rss()
    print(json.dumps({"results": results, "peak_rss": peak}))


# ---------------------------------------------------------------------------------------------
# the corpus, through every reader (long tier)


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               TORCH_HOME=str(work / "torch_home"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(work)], capture_output=True, text=True, env=env,
                          cwd=work, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = hostile_cases("M", "P")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_checkpoint_is_refused_everywhere(corpus_run, case):
    rows = [r for r in corpus_run["results"] if r["case"] == case]
    assert [r["command"] for r in rows] == list(READERS)
    for r in rows:
        where = f"{case} / {r['command']}"
        assert r["code"] == 2, f"{where}: exit {r['code']}: {r['message']}"
        lines = r["message"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}: {r['message']!r}"
        assert lines[0].isprintable(), f"{where}: raw control characters in {lines[0]!r}"
        assert r["file"] in lines[0], f"{where}: the error does not name the file: {lines[0]}"
        assert not r["marker"], f"{where}: the payload ran"
        assert r["new_files"] == [], f"{where}: wrote {r['new_files']}"
        assert r["connections"] == [], f"{where}: tried the network {r['connections']}"
        assert r["events"] == [], f"{where}: audited {r['events']} (network, unpickling or a process)"
        assert r["imported"] == [], f"{where}: imported {r['imported']}"
        assert r["seconds"] < 10, f"{where}: took {r['seconds']:.1f} s"


@pytest.mark.slow
def test_hostile_corpus_peak_memory(corpus_run):
    assert corpus_run["peak_rss"] < 2 * GB, f"peak RSS {corpus_run['peak_rss'] / GB:.2f} GB"


@pytest.mark.slow
def test_refusals_name_the_reason(corpus_run):
    msg = {r["case"]: r["message"] for r in corpus_run["results"] if r["command"] == "load"}
    assert "'os:system'" in msg["os-system"] and "trust_code=True" in msg["os-system"]
    assert "--trust-code" in msg["subprocess-call"]
    assert "'checkpoint_path'" in msg["timm-checkpoint-path"]
    assert "'pretrained'" in msg["timm-pretrained"]
    assert "'weights'" in msg["torchvision-weights"]
    assert "'weights_backbone'" in msg["torchvision-weights-backbone"]
    assert "tensors do not match torchvision/lraspp_mobilenet_v3_large" in msg["tv-lraspp"]  # built, no weights
    assert "33,011,211 parameter and buffer elements" in msg["tv-fcn-resnet50"]  # refused on the meta device
    assert "more than 1,032 modules" in msg["vit-depth"]
    assert "within ±32,768" in msg["vit-depth-1e6"] and "within ±32,768" in msg["num-classes-1e9"]
    assert "would allocate more than 8,388,672 elements" in msg["tv-regnet-not-on-meta"]  # not on meta: real budget
    assert "input_size 3x200000x200000" in msg["input-200000"]
    assert "templates 100000000" in msg["templates-1e8"]
    assert "width 100000.0" in msg["width-1e5"]
    assert "2 template set(s)" in msg["kind-fused-one-set"]
    assert "holds 2 templates, the metadata says 3" in msg["templates-mismatch"]
    assert "tensors do not match timm/test_resnet" in msg["width-mismatch"]
    assert "corrupt format_version '\u0661'" in msg["version-arabic-digit"]
    assert "nests too deeply" in msg["json-deep-list"]
    assert "NaN is not a number JSON allows" in msg["json-nan"]
    assert "set_ids ['seed2\\n']" in msg["set-id-newline"]
    assert "stored as 'I64', not floating point" in msg["templates-int64"]
    assert "stored as integer (torch.int64), the model's is floating point" in msg["bias-int64"]
    assert "\\x1b" in msg["text-kind"]
    assert "1 unexpected (first 'stem\\x1b]8;;https://evil" in msg["text-tensor-name"]


def test_corpus_covers_every_class():
    classes = {}
    for cls, _ in CASES.values():
        classes[cls] = classes.get(cls, 0) + 1
    assert set(classes) == {"code", "weights", "size", "text", "metadata", "sets"}
    assert min(classes.values()) >= 5, classes


# ---------------------------------------------------------------------------------------------
# the rules one by one (fast tier)


def test_check_kwargs_rules():
    from morph.safety import MAX_KWARG_NUMBER, check_kwargs

    good = {"num_classes": 21843, "drop_rate": 0.1, "drop_path_rate": 0.1, "init_weights": True, "act_layer": "relu",
            "out": [1, 2], "depth": -MAX_KWARG_NUMBER, "mlp_ratio": 4.0}
    assert check_kwargs(good, "f") == good
    for name in ("checkpoint_path", "cache_dir", "model_dir", "weights_backbone", "hf_hub_id", "pretrained_cfg",
                 "file", "url", "download", "weights"):
        with pytest.raises(Exception, match=f"refuses model kwarg '{name}'"):
            check_kwargs({name: "x"}, "f")
    for bad in ({"pretrained": False}, {"my_weights_file": "x"}, {"x": {"a": 1}}, {"x": [[1]]}, {"x": float("nan")},
                {"not an identifier": 1}, {"depth": MAX_KWARG_NUMBER + 1}, {"x": [1, 10**9]}, {"x": 1e300},
                {"x": "y" * 201}, {"x": list(range(65))}, {"na\u0131me": 1}):
        with pytest.raises(Exception, match="^f: "):
            check_kwargs(bad, "f")


def test_allocation_budget_refuses_before_allocating():
    import torch

    from morph import CheckpointError
    from morph.safety import AllocationBudget

    with pytest.raises(CheckpointError, match="f.safetensors: .* more than 1,000 elements"):
        with AllocationBudget(1000, "f.safetensors"):
            torch.zeros(10, 10)
            with torch.device("meta"):
                torch.nn.Linear(10**6, 10**6)  # the meta device allocates nothing: not counted
            try:
                torch.nn.Linear(10**6, 10**6)  # 4 TB: refused, never attempted
            except Exception:  # noqa: BLE001  (a library's broad except cannot swallow the refusal)
                pytest.fail("the refusal was an Exception a library could swallow")


def test_module_budget_stops_a_deep_model():
    import torch.nn as nn

    from morph import CheckpointError
    from morph.safety import ModuleBudget

    with pytest.raises(CheckpointError, match="f: the model it describes has more than 100 modules"):
        with ModuleBudget(100, "f"):
            nn.Sequential(*[nn.ReLU() for _ in range(1000)])
    with ModuleBudget(100, "f"):
        nn.Sequential(*[nn.ReLU() for _ in range(50)])


def test_no_weights_backstop(tmp_path, monkeypatch):
    """Inside the guard: torch.load, the hub loaders, unpickling and connections raise one MorphError line,
    and nothing is unpickled; outside it, and in other threads, everything works as before."""
    import threading
    import urllib.request

    import torch
    import torchvision.models._api as tv_api

    from morph import MorphError
    from morph.safety import no_weights

    marker = tmp_path / MARKER
    planted = tmp_path / "w.pth"
    planted.write_bytes(pickle.dumps({"x": _Payload(str(marker))}))
    plain = tmp_path / "plain.pt"
    torch.save({"x": torch.ones(2)}, plain)
    attempts = [
        lambda: torch.load(planted, weights_only=False),
        lambda: torch.load(plain, weights_only=True),
        lambda: torch.hub.load_state_dict_from_url("https://example.com/w.pth", model_dir=str(tmp_path)),
        lambda: torch.hub.download_url_to_file("https://example.com/w.pth", str(tmp_path / "d")),
        lambda: tv_api.load_state_dict_from_url("https://example.com/w.pth"),
        lambda: pickle.loads(planted.read_bytes()),
        lambda: socket.create_connection(("127.0.0.1", 9)),
        lambda: socket.getaddrinfo("example.com", 80),
        lambda: urllib.request.urlopen("http://127.0.0.1:9/"),
    ]
    for attempt in attempts:
        with pytest.raises(MorphError) as e:
            with no_weights("f.safetensors"):
                attempt()
        assert str(e.value).startswith("f.safetensors: building the model tried to ") and "\n" not in str(e.value)
    assert not marker.exists()
    assert torch.equal(torch.load(plain, weights_only=True)["x"], torch.ones(2))  # outside: as before
    got = []
    with no_weights("f.safetensors"):
        t = threading.Thread(target=lambda: got.append(torch.load(plain, weights_only=True)))
        t.start()
        t.join()
    assert torch.equal(got[0]["x"], torch.ones(2))  # another thread is not guarded
    assert torch.load.__module__ == "torch.serialization" and not hasattr(torch.load, "__wrapped__")


def test_weightless_sets_every_weights_argument():
    import inspect

    import torchvision.models as tvm

    from morph.zoo import weightless

    defaulted = []
    for name in tvm.list_models():
        builder = tvm.get_model_builder(name)
        params = inspect.signature(builder).parameters
        kw = weightless(builder, {"num_classes": 3})
        assert kw["weights"] is None and kw["num_classes"] == 3
        if "weights_backbone" in params:
            assert kw["weights_backbone"] is None
            defaulted += [name] if params["weights_backbone"].default is not None else []
    assert len(defaulted) == 15, defaulted  # the builders that would download ImageNet weights by default


def _plant_hub_and_trap_sockets(tmp_path, monkeypatch) -> list:
    """TORCH_HOME at ``tmp_path`` with a code-running pickle at every hub cache path a weights download would
    read, and ``socket.connect`` recording (and refusing) every attempt; returns the list of attempts."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    for name in HUB_FILES:
        (hub / name).write_bytes(pickle.dumps(_Payload(str(tmp_path / MARKER))))
    tried: list = []
    monkeypatch.setattr(socket.socket, "connect", lambda *a: tried.append(a) or (_ for _ in ()).throw(OSError("no")))
    return tried


def test_building_a_detection_model_downloads_nothing(tmp_path, monkeypatch):
    """morph.build_model of a builder whose weights_backbone defaults to ImageNet weights: no connection, the
    pickle planted at the hub cache path is not read, and an argument asking for weights is refused."""
    import morph

    tried = _plant_hub_and_trap_sockets(tmp_path, monkeypatch)
    model = morph.build_model("torchvision/lraspp_mobilenet_v3_large", num_classes=3)
    assert type(model).__name__ == "LRASPP" and model.morph_spec.kwargs == {"num_classes": 3}
    assert tried == [] and not (tmp_path / MARKER).exists()
    for bad in ({"weights": "DEFAULT"}, {"weights_backbone": "DEFAULT"}, {"pretrained": True}):
        with pytest.raises(morph.MorphError, match="builds models without weights"):
            morph.build_model("torchvision/fcn_resnet50", **bad)


def _tiny(path: Path, spec: dict | None = None, info: dict | None = None, meta: dict | None = None,
          tensors: dict | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    record = {"kind": "plain", "spec": spec, "width": 1.0, "input_size": [3, 32, 32], **(info or {})}
    m = {"format": "morph", "format_version": "1", "morph_info": json.dumps(record), **(meta or {})}
    save_file(tensors if tensors is not None else {"w": torch.zeros(4)}, str(path), metadata=m)
    return path


def test_small_file_naming_big_or_deep_models_is_refused_fast(tmp_path, monkeypatch):
    """~300-byte files: a segmentation model whose backbone would download, a huge num_classes: refused on the
    meta device by their parameter count (the corpus has the rest: depth, window, embed_dim...)."""
    import morph

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    tried = []
    monkeypatch.setattr(socket.socket, "connect", lambda *a: tried.append(a) or (_ for _ in ()).throw(OSError("no")))
    cases = [({"source": "torchvision", "name": "fcn_resnet50", "kwargs": {}}, "33,011,211 parameter and buffer"),
             ({"source": "timm", "name": "resnet18", "kwargs": {"num_classes": 32768}}, "far more than the 4")]
    for i, (spec, match) in enumerate(cases):
        path = _tiny(tmp_path / f"t{i}.safetensors", spec)
        assert path.stat().st_size < 400
        t0 = time.perf_counter()
        with pytest.raises(morph.CheckpointError, match=match):
            morph.load(path)
        assert time.perf_counter() - t0 < 10
    assert tried == []


@pytest.mark.parametrize("meta, info, match", [
    ({"format_version": "\u0661"}, {}, "corrupt format_version '\u0661'"),
    ({"morph_info": "[" * 100_000}, {}, "nests too deeply"),
    ({"morph_info": '{"kind": "plain", "width": NaN}'}, {}, "NaN is not a number JSON allows"),
    ({"morph_info": '{"kind": "plain", "width": 1e999}'}, {}, "width inf is not a number"),
    ({}, {"width": 10**400}, "width 1000000000.* is not a number"),
    ({}, {"templates": True}, "templates True is not an integer"),
    ({}, {"kind": "\x1b[2J"}, "kind '\\\\x1b\\[2J' is not one of"),
    ({}, {"set_ids": ["seed1\n"]}, "set_ids \\['seed1\\\\n'\\] must be a list of ids"),
])
def test_hostile_metadata_is_one_line(tmp_path, meta, info, match):
    import morph

    path = _tiny(tmp_path / "m.safetensors", {"source": "timm", "name": "test_resnet", "kwargs": {}}, info, meta)
    with pytest.raises(morph.CheckpointError, match=match) as e:
        morph.read_info(path)
    assert str(e.value).isprintable() and str(path) in str(e.value)


def _half(tmp_path: Path, seed: int = 1) -> Path:
    import morph

    base = morph.build_model("timm/test_resnet", num_classes=10)
    return morph.save(morph.convert(base, 0.5, seed=seed, input_size=(3, 32, 32)), tmp_path / f"half{seed}.safetensors")


def _edit(src: Path, dst: Path, info=None, tensors=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    record = json.loads(meta["morph_info"])
    if info:
        info(record)
    meta["morph_info"] = json.dumps(record)
    sd = load_file(str(src))
    if tensors:
        tensors(sd)
    save_file(sd, str(dst), metadata=meta)
    return dst


def test_set_id_newline_and_integer_templates_are_refused(tmp_path):
    import torch

    import morph

    half = _half(tmp_path)
    twin = _edit(half, tmp_path / "twin.safetensors", info=lambda i: i.update(set_ids=[i["set_ids"][0] + "\n"]))
    with pytest.raises(morph.CheckpointError, match="set_ids"):
        morph.load(twin)

    def to_int(sd):
        for k in sd:
            if k.endswith(".templates"):
                sd[k] = sd[k].round().to(torch.int64)

    ints = _edit(half, tmp_path / "ints.safetensors", tensors=to_int)
    with pytest.raises(morph.CheckpointError, match="stored as 'I64', not floating point"):
        morph.read_info(ints)


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    """Bugs stay bugs: an exception raised inside morph while it reads a good file propagates as itself."""
    from morph.cli.main import app
    from typer.testing import CliRunner

    import morph
    import morph.checkpoint

    half = _half(tmp_path)

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(sys.modules["morph.convert"], "convert", broken)
    with pytest.raises(ZeroDivisionError):
        morph.load(half)
    r = CliRunner().invoke(app, ["inspect", str(half), "--no-flops"])
    assert r.exit_code == 1 and isinstance(r.exception, ZeroDivisionError)
    monkeypatch.undo()
    monkeypatch.setattr(morph.checkpoint, "load_state", broken)
    with pytest.raises(ZeroDivisionError):
        morph.load(half)


def test_cli_error_lines_are_text(tmp_path):
    """A path with rich markup and escape sequences, and metadata with escape sequences: one plain line."""
    from morph.cli.main import app
    from typer.testing import CliRunner

    folder = tmp_path / "a[/]b[link=https://e.example]c[bold]\x1b[31m"
    folder.mkdir(parents=True)
    half = _half(folder)
    bad = _edit(half, folder / "k.safetensors", info=lambda i: i.update(kind="\x1b]8;;https://e.example\x07x"))
    runner = CliRunner()
    for args in (["inspect", str(bad), "--no-flops"], ["bake", str(bad), "-o", str(tmp_path / "o.safetensors")],
                 ["grow", str(bad), "-o", str(tmp_path / "o.safetensors")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output, r.exception)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].isprintable(), lines
        assert str(bad).replace("\x1b", "\\x1b") in lines[0] and "a[/]b[link=https:/e.example]c[bold]" in lines[0]
        assert "kind '\\x1b]8;;" in lines[0]
    assert not (tmp_path / "o.safetensors").exists()


def test_inspect_prints_file_text_as_text(tmp_path):
    """A checkpoint that loads, whose metadata and path hold escape sequences and markup: inspect succeeds,
    and prints them escaped, never raw, never as markup."""
    from morph.cli.main import app
    from typer.testing import CliRunner

    folder = tmp_path / "x[/]y[link=https://e.example]z"
    folder.mkdir(parents=True)
    half = _half(folder)
    esc = "\x1b]8;;https://e.example\x07click\x1b]8;;\x07"
    shown = _edit(half, folder / "t.safetensors",
                  info=lambda i: i.update(growth="\x1b[2J", extra={"growth": {"method": esc, "note": "[red]x[/]"}}))
    r = CliRunner().invoke(app, ["inspect", str(shown), "--no-flops"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "\\x1b]8;;https://e.example\\x07click" in r.stdout.replace("\n", "")
    assert "[red]x[/]" in r.stdout.replace("\n", "")


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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# typed by a user: a model name, a hostile-looking path (long tier)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision/fcn_resnet50", "torchvision/lraspp_mobilenet_v3_large"])
def test_convert_of_a_model_that_defaults_to_backbone_weights_downloads_nothing(tmp_path, monkeypatch, name):
    """`morph convert torchvision/fcn_resnet50`: built without weights (no connection, the pickle planted at the
    hub cache path is not read), converted and verified; no traceback."""
    from morph.cli.main import app
    from typer.testing import CliRunner

    import morph

    tried = _plant_hub_and_trap_sockets(tmp_path, monkeypatch)
    out = tmp_path / "half.safetensors"
    r = CliRunner().invoke(app, ["convert", name, "--input-size", "3,32,32", "-o", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "verified" in r.stdout and tried == [] and not (tmp_path / MARKER).exists()
    assert morph.read_info(out)[0].spec.spec == name


@pytest.mark.slow
def test_markup_and_escapes_in_paths_print_as_text_everywhere(tmp_path):
    """inspect, bake, fuse and grow on files whose folder holds rich markup and an escape sequence: they work,
    and print the path as text (markup shown, escapes escaped)."""
    from morph.cli.main import app
    from typer.testing import CliRunner

    folder = tmp_path / "r[/]s[link=https://e.example]t[bold]\x1b[31m"
    folder.mkdir(parents=True)
    a, b = _half(folder, 1), _half(folder, 2)
    runner = CliRunner()
    for args in (["inspect", a, "--no-flops"], ["bake", a, "-o", folder / "b.safetensors"],
                 ["fuse", a, b, "-o", folder / "f.safetensors"], ["grow", a, "-o", folder / "g.safetensors"]):
        r = runner.invoke(app, [str(x) for x in args])
        assert r.exit_code == 0, (args[0], r.output, r.exception)
        text = (r.stdout + r.stderr).replace("\n", "")
        assert "\x1b" not in text, args[0]
        assert "[/]s[link=https:/e.example]t[bold]\\x1b[31m" in text, (args[0], text)
