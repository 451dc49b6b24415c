"""Every file morph reads that is not a checkpoint, and every path it writes, follows one rule.

A corpus of hostile inputs (training configs, run directories on resume, ``morph report`` inputs, ``cka --run``
folders, image folders, CLI options, output paths) goes through the ``morph`` CLI. Every case must give exit
code 2, exactly one ``error:`` line, no traceback, change no file and create none (victim files outside the
named output are checked byte for byte), and take under 10 s. The whole corpus runs in one child process (the
long tier) so that its peak RSS can be measured: under 2 GB. A few representative cases run in the fast tier.

Classes (issue 20): 3 YAML aliases and anchors, 4 text from files printed as text, 5 outputs (symlinks,
overwrite, atomic, nothing left on failure), 6 names are names, 7 one line for every bad file or number.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from procstat import peak_rss

GB = 1 << 30

VICTIM = b"the user's own file\n"

TINY = """\
data: {dataset: cifar10, synthetic: true, train_subset: 64, test_subset: 32, image_size: 16, num_workers: 0, cutout: 0}
model: {arch: wrn, depth: 10, widen_factor: 1}
optim: {batch_size: 16, lr: 0.05}
growth: {methods: [large], epochs: 1}
run: {seeds: [0], device: cpu, progress: false, log_every: 0, amp: false, channels_last: false}
"""


def bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs" YAML: ``width ** levels`` strings from a few hundred bytes."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width x height`` pixels, with one tiny IDAT: a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# building the corpus


def _images(folder: Path, n: int = 4, size: int = 32, fmt: str = "PNG") -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"img{i}.{'png' if fmt == 'PNG' else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p, fmt)
        out.append(p)
    return out


def _run_dir(root: Path, name: str = "c10", result: object = None, config: str | None = None) -> Path:
    d = root / "seed0" / "large"
    d.mkdir(parents=True)
    (root / "config.yaml").write_text(config if config is not None else f"name: {name}\n")
    r = {"method": "large", "seed": 0, "top1": 90.0, "flops_norm": 1.0} if result is None else result
    (d / "result.json").write_text(r if isinstance(r, str) else json.dumps(r))
    (root / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "method": "large", "seed": 0, "flops_norm": 1.0,
                                                    "test_top1": 90.0}) + "\n")
    return root


def _victim(work: Path) -> Path:
    v = work / "victim.txt"
    if not v.exists():
        v.write_bytes(VICTIM)
    return v


def _tamper(ckpt: Path, change_meta=None, change_tensors=None, raw: str | None = None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ckpt), "pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["meta"])
    if change_meta:
        change_meta(meta)
    if change_tensors:
        change_tensors(tensors)
    header["meta"] = raw(meta) if callable(raw) else json.dumps(meta)
    save_file(tensors, str(ckpt), metadata=header)


def fast_corpus(work: Path) -> dict[str, dict]:
    """Cases that need no trained run: name -> {cls, argv, expect}."""
    cases: dict[str, dict] = {}
    victim = _victim(work)

    def case(name: str, cls: str, argv: list, expect: str) -> None:
        cases[name] = {"cls": cls, "argv": [str(a) for a in argv], "expect": expect}

    def config(name: str, text: str | bytes) -> Path:
        p = work / "configs" / f"{name}.yaml"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    tiny = config("tiny", TINY)
    out = work / "runs" / "out"

    # 3: YAML without aliases, bounded
    b = bomb()
    case("yaml-bomb-config", "yaml", ["train", config("bomb", b), "--out-dir", out], "anchor &a0 at line 1")
    rb = work / "runs" / "bomb-resume"
    rb.mkdir(parents=True)
    (rb / "config.yaml").write_text(bomb(8, 9))
    case("yaml-bomb-run-dir-on-resume", "yaml", ["train", tiny, "--out-dir", rb], "anchor &a0")
    case("yaml-bomb-report", "yaml", ["report", _run_dir(work / "runs" / "bomb-report", config=b), "-o", out],
         "anchor &a0")
    rc = work / "runs" / "bomb-cka"
    (rc / "seed0" / "large" / "train" / "epochs").mkdir(parents=True)
    (rc / "seed0" / "large" / "train" / "epochs" / "epoch-000.safetensors").write_bytes(b"x")
    (rc / "config.yaml").write_text(b)
    case("yaml-bomb-cka-run", "yaml", ["cka", "--run", rc, "--method", "large"], "anchor &a0")
    case("yaml-alias-only", "yaml", ["train", config("alias", TINY + "x: *nothing\n"), "--out-dir", out], "alias")
    case("yaml-python-tag", "yaml", ["train", config("pytag", "name: !!python/object/apply:os.system [ls]\n"),
                                     "--out-dir", out], "python/object/apply")
    case("yaml-deep", "yaml", ["train", config("deep", "data: " + "[" * 5000 + "]" * 5000 + "\n"), "--out-dir", out],
         "nested")
    case("yaml-huge", "yaml", ["train", config("huge", "# " + "x" * (5 << 20) + "\n"), "--out-dir", out],
         "too large")
    case("yaml-override-anchor", "yaml", ["train", tiny, "optim.lr=&a 0.1", "--out-dir", out], "anchor &a")

    # 4: text from files and paths is text
    case("markup-path-cka", "text", ["cka", work / "m[/]x[bold].safetensors", "--data", work / "d[/]"],
         "m[/]x[bold].safetensors")
    case("markup-path-data-root", "text", ["train", tiny, "data.synthetic=false", "--data-dir", work / "no[/]data",
                                           "--out-dir", out], "no[/]data")
    case("markup-path-report", "text", ["report", _run_dir(work / "runs" / "r[/]x[link=evil]", result="{"),
                                        "-o", out], "r[/]x[link=evil]")
    rm = work / "runs" / "m[/]"
    rm.mkdir(parents=True)
    case("markup-path-cka-run", "text", ["cka", "--run", rm], "m[/]: no seed<S> folders")
    case("escape-in-config-name", "text", ["train", config("esc", TINY + "name: \"a\\e]8;;https://evil\\ab\"\n"),
                                           "--out-dir", out], "\\x1b]8")

    # 5: outputs
    png = work / "existing.png"
    png.write_bytes(b"not overwritten")
    link_png = work / "link.png"
    link_png.symlink_to(victim)
    imgs = work / "images-good"
    _images(imgs / "cls")
    case("cka-output-exists", "output", ["cka", "timm/test_resnet", "--data", imgs, "-o", png], "exists; pass --force")
    case("cka-output-symlink-force", "output", ["cka", "timm/test_resnet", "--data", imgs, "-o", link_png, "--force"],
         "symbolic link")
    case("cka-output-folder", "output", ["cka", "timm/test_resnet", "--data", imgs, "-o", work / "images-good.png",
                                         "--force"], "is a folder")
    (work / "images-good.png").mkdir()
    good_run = _run_dir(work / "runs" / "good")
    rep = work / "rep-exists"
    rep.mkdir()
    (rep / "report.md").write_text("mine")
    case("report-output-exists", "output", ["report", good_run, "-o", rep], "exists; pass --force")
    rep2 = work / "rep-link"
    rep2.mkdir()
    (rep2 / "report.md").symlink_to(victim)
    case("report-output-symlink-force", "output", ["report", good_run, "-o", rep2, "--force"], "symbolic link")
    rep3 = work / "rep-png-link"
    rep3.mkdir()
    (rep3 / "top1_vs_flops.png").symlink_to(victim)
    case("report-png-symlink-force", "output", ["report", good_run, "-o", rep3, "--force"], "symbolic link")
    case("report-output-is-file", "output", ["report", good_run, "-o", victim], "is a file, not a folder")
    case("bake-output-symlink-force", "output", ["bake", victim, "-o", _link(work, "b.safetensors", victim),
                                                 "--force"], "symbolic link")
    rl = work / "runs" / "cfg-link"
    rl.mkdir(parents=True)
    (rl / "config.yaml").symlink_to(victim)
    case("run-config-symlink", "output", ["train", tiny, "--out-dir", rl], "symbolic link")

    # 6: names are names
    for tag, name in (("absolute", "/tmp/evil"), ("dotdot", "../../escape"), ("slash", "a/b"), ("empty", ""),
                      ("dot", ".."), ("newline", "a\nb"), ("escape", "a\x1b[2Jb"), ("bidi", "a\u202eb")):
        case(f"name-{tag}", "name", ["train", config(f"name-{tag}", TINY + f"name: {json.dumps(name)}\n"),
                                     "--out-dir", out], "name ")
    case("name-override", "name", ["train", tiny, "name=../x"], "name '../x'")

    # 7: report inputs (one line naming the file)
    runs = work / "runs"
    deep = "[" * 100000 + "]" * 100000
    for tag, result, expect in (
        ("bad-json", "{not json", "not valid JSON"),
        ("wrong-type", {"method": "large", "top1": "96", "flops_norm": 1.0}, "a result needs"),
        ("nan", '{"method": "large", "top1": NaN, "flops_norm": 1.0}', "NaN"),
        ("infinity", '{"method": "large", "top1": Infinity, "flops_norm": 1.0}', "Infinity"),
        ("overflow", '{"method": "large", "top1": 1e999, "flops_norm": 1.0}', "overflows"),
        ("huge-int", '{"method": "large", "top1": 1' + "0" * 5000 + ', "flops_norm": 1.0}', "not valid JSON"),
        ("huge-number", {"method": "large", "top1": 1e300, "flops_norm": 1.0}, "not a percentage"),
        ("missing-field", {"method": "large", "top1": 50.0}, "a result needs"),
        ("deep", deep, "nested"),
        ("list", [1, 2], "a result needs"),
        ("bad-seed", {"method": "large", "top1": 5.0, "flops_norm": 1.0, "seed": [1]}, "'seed'"),
        ("bad-stages", {"method": "large", "top1": 5.0, "flops_norm": 1.0, "stages": [{"stage": ["x"]}]}, "stages[0]"),
        ("not-utf8", b"\xff\xfe{}".decode("latin-1"), "not UTF-8"),
    ):
        d = _run_dir(runs / f"report-{tag}", result=result if tag != "not-utf8" else "{}")
        if tag == "not-utf8":
            (d / "seed0" / "large" / "result.json").write_bytes(b"\xff\xfe{}")
        case(f"report-{tag}", "errors", ["report", d, "-o", out], expect)
    d = _run_dir(runs / "report-huge-file")
    (d / "seed0" / "large" / "result.json").write_bytes(b" " * (5 << 20) + b"{}")
    case("report-huge-file", "errors", ["report", d, "-o", out], "too large")
    d = _run_dir(runs / "report-result-dir")
    os.unlink(d / "seed0" / "large" / "result.json")
    (d / "seed0" / "large" / "result.json").mkdir()
    case("report-result-is-folder", "errors", ["report", d, "-o", out], "is a folder")
    d = _run_dir(runs / "report-result-link")
    os.unlink(d / "seed0" / "large" / "result.json")
    (d / "seed0" / "large" / "result.json").symlink_to("/dev/zero")
    case("report-result-symlink-dev-zero", "errors", ["report", d, "-o", out], "symbolic link")
    d = _run_dir(runs / "report-config-dir")
    os.unlink(d / "config.yaml")
    (d / "config.yaml").mkdir()
    case("report-config-is-folder", "errors", ["report", d, "-o", out], "is a folder")
    d = _run_dir(runs / "report-config-list", config="[1, 2]\n")
    case("report-config-not-mapping", "errors", ["report", d, "-o", out], "not a config")
    d = _run_dir(runs / "report-config-fifo")
    os.unlink(d / "config.yaml")
    os.mkfifo(d / "config.yaml")
    case("report-config-fifo", "errors", ["report", d, "-o", out], "not a regular file")
    d = _run_dir(runs / "report-metrics-dir")
    os.unlink(d / "metrics.jsonl")
    (d / "metrics.jsonl").mkdir()
    case("report-metrics-is-folder", "errors", ["report", d, "-o", out], "is a folder")
    d = _run_dir(runs / "report-metrics-huge")
    with open(d / "metrics.jsonl", "r+b") as f:
        f.truncate(65 << 20)  # sparse: no disk used
    case("report-metrics-huge", "errors", ["report", d, "-o", out], "too large")
    fifo = work / "configs" / "fifo.yaml"
    os.mkfifo(fifo)
    case("config-fifo", "errors", ["train", fifo, "--out-dir", out], "not a regular file")
    d = _run_dir(runs / "report-name-type", config="name: [1, 2]\n")
    case("report-name-not-string", "errors", ["report", d, "-o", out], "'name'")

    # 7: cka --run folder and file names
    def cka_run(tag: str) -> Path:
        r = runs / f"cka-{tag}"
        (r / "seed0" / "large" / "train" / "epochs").mkdir(parents=True)
        (r / "config.yaml").write_text("name: x\ndata: {root: /nonexistent}\n")
        return r

    r = cka_run("epoch-name")
    (r / "seed0" / "large" / "train" / "epochs" / "epoch-abc.safetensors").write_bytes(b"x")
    case("cka-run-epoch-name", "errors", ["cka", "--run", r, "--method", "large"], "epoch-abc.safetensors")
    r = cka_run("epoch-digits")
    (r / "seed0" / "large" / "train" / "epochs" / "epoch-\u00b2.safetensors").write_bytes(b"x")
    case("cka-run-epoch-superscript", "errors", ["cka", "--run", r, "--method", "large"], "not a kept epoch")
    r = cka_run("epoch-dir")
    (r / "seed0" / "large" / "train" / "epochs" / "epoch-001.safetensors").mkdir()
    case("cka-run-epoch-is-folder", "errors", ["cka", "--run", r, "--method", "large"], "must be a file")
    r = cka_run("epoch-link")
    (r / "seed0" / "large" / "train" / "epochs" / "epoch-001.safetensors").symlink_to(victim)
    case("cka-run-epoch-symlink", "errors", ["cka", "--run", r, "--method", "large"], "must be a file")
    r = runs / "cka-seed-names"
    (r / "seed\u00b2").mkdir(parents=True)
    (r / "seedling").mkdir()
    case("cka-run-seed-names", "errors", ["cka", "--run", r], "no seed<S> folders")
    r = cka_run("method")
    case("cka-run-method-path", "errors", ["cka", "--run", r, "--method", "../../etc"], "--method")
    case("cka-run-seed-missing", "errors", ["cka", "--run", cka_run("seed-missing"), "--run-seed", "7",
                                            "--method", "large"], "no seed7 folder")
    r = cka_run("root-list")
    (r / "seed0" / "large" / "train" / "epochs" / "epoch-001.safetensors").write_bytes(b"x")
    (r / "config.yaml").write_text("name: x\ndata: {root: [1, 2]}\n")
    case("cka-run-data-root-list", "errors", ["cka", "--run", r, "--method", "large"], "data.root is not a path")

    # 7: image folders
    def folder(tag: str) -> Path:
        f = work / "images" / tag
        _images(f / "cls", n=4)
        return f

    f = folder("bomb")
    (f / "cls" / "img1.png").write_bytes(png_header(30000, 30000))
    case("image-bomb-png", "errors", _cka_images(f), "img1.png")
    f = folder("truncated")
    jpg = _images(f / "cls", n=1, fmt="JPEG")[0]
    (f / "cls" / "img1.png").unlink()
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    case("image-truncated-jpeg", "errors", _cka_images(f), jpg.name)
    f = folder("text")
    (f / "cls" / "img2.png").unlink()
    (f / "cls" / "notes.jpg").write_text("this is text, not a JPEG\n")
    case("image-text-named-jpg", "errors", _cka_images(f), "notes.jpg")
    f = folder("loop")
    (f / "cls" / "loop").symlink_to(f / "cls")
    case("image-symlink-loop", "errors", _cka_images(f), "loop")
    f = folder("fifo")
    os.mkfifo(f / "cls" / "pipe.jpg")
    case("image-fifo", "errors", _cka_images(f), "pipe.jpg")
    f = work / "images" / "train-tensor"
    _images(f / "train" / "a", n=2)
    _images(f / "test" / "a", n=2)
    (f / "train" / "a" / "img1.png").write_bytes(png_header(30000, 30000))
    case("image-bomb-train", "errors", ["train", tiny, "data.synthetic=false", "data.format=imagefolder",
                                        f"data.cache_dir={work / 'cache'}", "--data-dir", f, "--out-dir", out],
         "img1.png")

    # 7: non-finite and absurd numbers, named, before anything is allocated
    for tag, override, expect in (
        ("lr-nan", "optim.lr=.nan", "optim.lr: expected a finite number"),
        ("lr-inf", "optim.lr=.inf", "optim.lr: expected a finite number"),
        ("lr-nan-string", "optim.lr=nan", "optim.lr: expected a finite number"),
        ("batch-1e12", "optim.batch_size=1e12", "optim.batch_size"),
        ("image-size", "data.image_size=100000", "data.image_size"),
        ("templates", "growth.templates=1000000000", "growth.templates"),
        ("seeds", "run.seeds=[1e30]", "run.seeds"),
        ("epochs-huge-int", "growth.epochs=" + "9" * 40, "growth.epochs"),
        ("subset", "data.train_subset=10000000000", "data.train_subset"),
        ("widen", "model.widen_factor=1e9", "model.widen_factor"),
        ("budget-inf", "growth.budget=1e400", "growth.budget"),
        ("cache-dir-nul", 'data.cache_dir="a\\0b"', "data.cache_dir"),
    ):
        case(f"number-{tag}", "errors", ["train", tiny, override, "--out-dir", out], expect)
    case("number-cka-batch-size", "errors", ["cka", "timm/test_resnet", "--data", imgs, "--batch-size", "100000000"],
         "--batch-size")
    case("number-cka-image-size", "errors", ["cka", "timm/test_resnet", "--data", imgs, "--image-size", "1000000"],
         "--image-size")
    case("number-cka-batches", "errors", ["cka", "timm/test_resnet", "--data", imgs, "--batches", "1000000000000"],
         "--batches")
    return cases


def _link(work: Path, name: str, target: Path) -> Path:
    p = work / name
    p.symlink_to(target)
    return p


def _cka_images(folder: Path) -> list:
    return ["cka", "timm/test_resnet", "--data", folder, "--batches", "1", "--batch-size", "4", "--image-size", "32"]


def resume_corpus(work: Path, app) -> dict[str, dict]:
    """Tampered run directories: a real tiny run (trained here), copied and edited once per case."""
    import shutil

    import torch
    from typer.testing import CliRunner

    tiny = work / "configs" / "tiny.yaml"
    base = work / "runs" / "trained"
    r = CliRunner().invoke(app, ["train", str(tiny), "--out-dir", str(base)])
    assert r.exit_code == 0, r.output
    (ckpt_rel,) = [p.relative_to(base) for p in base.rglob("checkpoint.safetensors")]
    cases: dict[str, dict] = {}

    def case(tag: str, expect: str, change) -> None:
        d = work / "runs" / f"resume-{tag}"
        shutil.copytree(base, d, symlinks=True)
        change(d / ckpt_rel, d)
        cases[f"resume-{tag}"] = {"cls": "errors", "argv": ["train", str(tiny), "--out-dir", str(d)], "expect": expect}

    def meta(fn, raw=None):
        return lambda ckpt, d: _tamper(ckpt, fn, raw=raw)

    def tensors(fn):
        return lambda ckpt, d: _tamper(ckpt, change_tensors=fn)

    def first_momentum(t):
        return next(k for k in t if k.startswith("optim.") and k.endswith("momentum_buffer"))

    # the metadata is strict JSON (morph.safety.parse_json): a non-finite number is refused as it is parsed
    case("nan-epoch", "NaN is not a number JSON allows", meta(lambda m: m["progress"].update(epoch=float("nan"))))
    case("inf-flops", "Infinity is not a number JSON allows", meta(lambda m: m["progress"].update(flops=float("inf"))))
    case("float-epoch", "progress.epoch", meta(lambda m: m["progress"].update(epoch=1.5)))
    case("step-past-end", "progress.step", meta(lambda m: m["progress"].update(step=10**6)))
    case("maximize", "maximize", meta(lambda m: m["optim"]["param_groups"][0].update(maximize=True)))
    case("weight-decay", "weight_decay", meta(lambda m: m["optim"]["param_groups"][0].update(weight_decay=0.5)))
    case("momentum", "momentum", meta(lambda m: m["optim"]["param_groups"][0].update(momentum=-3)))
    case("nesterov-string", "nesterov", meta(lambda m: m["optim"]["param_groups"][0].update(nesterov="yes")))
    case("lr-nan", "NaN is not a number JSON allows", meta(lambda m: m["optim"]["param_groups"][0].update(lr=float("nan"))))
    case("extra-group-key", "keys", meta(lambda m: m["optim"]["param_groups"][0].update(evil=1)))
    case("result-nan", "NaN is not a number JSON allows", meta(lambda m: m["result"].update(top1=float("nan"))))
    case("rng-missing", "rng", meta(lambda m: m.update(rng=[])))
    case("momentum-wrong-shape", "momentum_buffer",
         tensors(lambda t: t.update({first_momentum(t): torch.zeros(3, 1, 1, 1)})))
    case("momentum-nan", "NaN", tensors(lambda t: t[first_momentum(t)].fill_(float("nan"))))
    case("momentum-unknown-param", "names no parameter",
         tensors(lambda t: t.update({"optim.99999.momentum_buffer": torch.zeros(1)})))
    case("model-wrong-shape", "has shape", tensors(lambda t: t.update({
        next(k for k in t if k.startswith("model.") and t[k].dim() == 4): torch.zeros(1, 1, 1, 1)})))
    case("checkpoint-folder", "checkpoint", lambda ckpt, d: (ckpt.unlink(), ckpt.mkdir()))
    case("checkpoint-truncated", "checkpoint", lambda ckpt, d: ckpt.write_bytes(ckpt.read_bytes()[:100]))
    case("checkpoint-text", "checkpoint", lambda ckpt, d: ckpt.write_text("not a checkpoint"))
    case("result-symlink", "symbolic link", lambda ckpt, d: (
        (d / "seed0" / "large" / "result.json").unlink(),
        (d / "seed0" / "large" / "result.json").symlink_to(_victim(work))))
    case("config-symlink", "symbolic link", lambda ckpt, d: (
        (d / "config.yaml").unlink(), (d / "config.yaml").symlink_to(_victim(work))))
    case("config-changed", "holds a run with", lambda ckpt, d: (d / "config.yaml").write_text(
        (d / "config.yaml").read_text().replace("lr: 0.05", "lr: 0.5")))
    return cases


# ---------------------------------------------------------------------------------------------
# running cases


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (links not followed) with its type, size and content hash for files."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.isfile(p) and not os.path.islink(p) and st.st_size < (16 << 20):
                with open(p, "rb") as f:
                    digest = hashlib.blake2b(f.read(), digest_size=8).hexdigest()
            else:
                digest = ""
            out[p] = (st.st_mode >> 12, st.st_size if not os.path.islink(p) else os.readlink(p), digest)
    return out


def run_case(app, work: Path, spec: dict) -> dict:
    from typer.testing import CliRunner

    before = snapshot(work)
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, spec["argv"])
    seconds = time.perf_counter() - t0
    after = snapshot(work)
    message = r.stderr + r.stdout
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        message += "".join(traceback.format_exception(r.exception))
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    return {"code": r.exit_code, "message": message, "seconds": seconds, "changed": changed}


def check(name: str, spec: dict, rec: dict) -> None:
    where = f"{name} ({spec['cls']})"
    assert rec["code"] == 2, f"{where}: exit {rec['code']}: {rec['message'][-2000:]}"
    assert "Traceback" not in rec["message"], f"{where}: {rec['message'][-2000:]}"
    lines = rec["message"].strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    # one error line, the last; before it at most a progress note (the data cache announcing its decoding)
    assert len(errors) == 1 and lines[-1] == errors[0] and len(lines) <= 2, f"{where}: {rec['message'][-2000:]!r}"
    assert spec["expect"] in errors[0], f"{where}: {spec['expect']!r} not in {errors[0]!r}"
    assert "\x1b" not in rec["message"], f"{where}: an escape reached the terminal: {errors[0]!r}"
    assert rec["changed"] == [], f"{where}: files changed or created: {rec['changed']}"
    assert rec["seconds"] < 10, f"{where}: took {rec['seconds']:.1f} s"


def _child(work: Path) -> None:
    import morph.recipes.report  # noqa: F401 - imported before timing
    import morph.recipes.run  # noqa: F401
    from morph.cli.main import app

    cases = fast_corpus(work)
    cases.update(resume_corpus(work, app))
    results = {name: run_case(app, work, spec) for name, spec in cases.items()}
    peak = peak_rss()
    print(json.dumps({"cases": cases, "results": results, "peak_rss": peak}))


# ---------------------------------------------------------------------------------------------
# the long tier: the whole corpus in one child process


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile-inputs")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(work)], capture_output=True, text=True, env=env, cwd=work,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CLASSES = ("yaml", "text", "output", "name", "errors")


@pytest.mark.slow
@pytest.mark.parametrize("cls", CLASSES)
def test_whole_corpus_one_line_exit_2_nothing_written(corpus_run, cls):
    cases = {n: s for n, s in corpus_run["cases"].items() if s["cls"] == cls}
    assert len(cases) >= 4, f"{cls}: only {len(cases)} cases"
    for name, spec in cases.items():
        check(name, spec, corpus_run["results"][name])


@pytest.mark.slow
def test_whole_corpus_peak_memory(corpus_run):
    assert corpus_run["peak_rss"] < 2 * GB, f"peak RSS {corpus_run['peak_rss'] / GB:.2f} GB"


@pytest.mark.slow
def test_resume_of_the_untampered_run_still_works(tmp_path):
    """The checks refuse only what is wrong: rerunning a finished run resumes it (every field passes)."""
    from morph.cli.main import app
    from typer.testing import CliRunner

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    run = tmp_path / "r[/]un"  # a path that is rich markup: printed as text
    for _ in range(2):
        r = CliRunner().invoke(app, ["train", str(cfg), "--out-dir", str(run)])
        assert r.exit_code == 0, r.output
    assert "r[/]un" in r.stdout and (run / "seed0" / "large" / "result.json").is_file()


# ---------------------------------------------------------------------------------------------
# the fast tier: representative cases in this process


FAST = ("yaml-bomb-config", "yaml-bomb-run-dir-on-resume", "markup-path-cka", "cka-output-symlink-force",
        "report-output-symlink-force", "name-dotdot", "report-nan", "report-result-symlink-dev-zero",
        "cka-run-epoch-name", "number-lr-nan", "number-batch-1e12")


@pytest.fixture(scope="module")
def fast_cases(tmp_path_factory):
    import morph.cli.main  # noqa: F401 - imported before timing: a case's time is its own, not the imports'
    import morph.recipes.report  # noqa: F401
    import morph.recipes.run  # noqa: F401

    work = tmp_path_factory.mktemp("inputs")
    cwd = os.getcwd()
    os.chdir(work)  # a relative default output (runs/, report/) would land here
    try:
        yield work, fast_corpus(work)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("name", FAST)
def test_representative_case(fast_cases, name):
    from morph.cli.main import app

    work, cases = fast_cases
    check(name, cases[name], run_case(app, work, cases[name]))


def test_report_table_shows_names_as_text(tmp_path):
    from morph.recipes.report import collect, markdown_table

    name = "[link=https://evil.example]x[/link] | \x1b]8;;https://evil.example\x07y"
    run = _run_dir(tmp_path / "run", config=f"name: {json.dumps(name)}\n")
    text = markdown_table(collect([run]))
    assert "[link=https://evil.example]x[/link] \\| \\x1b]8;;https://evil.example\\x07y top-1 (%)" in text
    assert "\x1b" not in text and "\x07" not in text


@pytest.mark.slow
def test_report_prints_names_as_text_not_markup(tmp_path):
    from morph.cli.main import app
    from typer.testing import CliRunner

    name = "[link=https://evil.example]x[/link] \x1b]8;;https://evil.example\x07y"
    run = _run_dir(tmp_path / "run", config=f"name: {json.dumps(name)}\n")
    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for planted in (".report.md.tmp", f".report.md.tmp{os.getpid()}", ".top1_vs_flops.png.tmp.png"):
        (out / planted).symlink_to(victim)  # the temporary names earlier versions used
    r = CliRunner().invoke(app, ["report", str(run), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "[link=https://evil.example]x[/link]" in r.stdout  # shown literally, not turned into a link
    assert "\x1b" not in r.stdout and "\\x1b]8;;https://evil.example\\x07y" in r.stdout
    assert victim.read_bytes() == VICTIM
    md = (out / "report.md").read_text()
    assert "\x1b" not in md and "\\x1b" in md
    r = CliRunner().invoke(app, ["report", str(run), "-o", str(out)])  # a second time: not without --force
    assert r.exit_code == 2 and "exists; pass --force" in r.stderr
    r = CliRunner().invoke(app, ["report", str(run), "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output


def test_yaml_loader_refuses_aliases_and_keeps_plain_yaml():
    from morph.inputs import InputError, load_yaml

    assert load_yaml("a: 1\nb: [x, {c: 2.5}]\n", "f") == {"a": 1, "b": ["x", {"c": 2.5}]}
    assert len(bomb().encode()) < 800
    for text, what in ((bomb(), "anchor &a0 at line 1"), ("a: 1\nb: *x\n", "alias *x at line 2"),
                       ("x: !!python/name:os.system\n", "python/name"), ("[" * 40 + "]" * 40, "nested")):
        with pytest.raises(InputError, match="f is not valid YAML") as e:
            load_yaml(text, "f")
        assert what in str(e.value) and "\n" not in str(e.value)


def test_names_are_names():
    from morph.paths import BadNameError, check_name

    for ok in ("cifar10-smoke", "run 1", "résumé", "a.b"):
        assert check_name(ok, "name") == ok
    for bad in ("", ".", "..", "a/b", "/abs", "a\\b", "a\nb", "a\x1bb", "a\u202eb", " a", "x" * 200, 5):
        with pytest.raises(BadNameError, match="^name "):
            check_name(bad, "name")


def test_outputs_are_all_or_nothing(tmp_path):
    from morph.paths import OutputError, Outputs, write_text

    target = tmp_path / "new" / "deeper"
    with pytest.raises(RuntimeError):
        with Outputs() as out:
            out.write_bytes(target / "a.txt", b"a")
            raise RuntimeError("the command failed")
    assert not (tmp_path / "new").exists()  # no file, no folder left
    victim = _victim(tmp_path)
    (tmp_path / "link.txt").symlink_to(victim)
    for force in (False, True):
        with pytest.raises(OutputError, match="symbolic link"):
            write_text(tmp_path / "link.txt", "x", force=force)
    assert victim.read_bytes() == VICTIM
    write_text(tmp_path / "f.txt", "one", force=False)
    with pytest.raises(OutputError, match="exists; pass --force"):
        write_text(tmp_path / "f.txt", "two", force=False)
    write_text(tmp_path / "f.txt", "two", force=True)
    assert (tmp_path / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "link.txt", "victim.txt"]  # no temporary left


@pytest.mark.slow
def test_stream_loader_names_a_corrupt_image_from_a_worker(tmp_path):
    """A corrupt image decoded in a DataLoader worker process is still one line naming the file."""
    import torchvision.transforms as T
    from morph.recipes.data import EpochBatches, SeededDataset, make_loader

    from morph.images import ImageError, image_folder

    _images(tmp_path / "a", n=4)
    (tmp_path / "a" / "img2.png").write_bytes(png_header(40000, 40000))
    ds = SeededDataset(image_folder(tmp_path), T.ToTensor())
    with pytest.raises(ImageError) as e:
        list(make_loader(ds, EpochBatches(4, 4, shuffle=False, drop_last=False), num_workers=1, pin_memory=False))
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and msg.startswith(str(tmp_path / "a" / "img2.png"))


@pytest.mark.slow
def test_tampered_data_cache_is_rebuilt_not_used(tmp_path):
    """The decoded-image cache is a file too: one whose labels, dtype or shape are not what this code writes is
    rebuilt from the images."""
    import torch
    from morph.recipes.config import DataConfig
    from morph.recipes.data import build_data
    from safetensors import safe_open
    from safetensors.torch import save_file

    for split in ("train", "test"):
        for cls in ("a", "b"):
            _images(tmp_path / "data" / split / cls, n=2, size=8)
    cfg = DataConfig(root=str(tmp_path / "data"), format="imagefolder", loader="tensor", image_size=8,
                     cache_dir=str(tmp_path / "cache"), cutout=0)
    good = build_data(cfg, say=None).tensors
    (path,) = (tmp_path / "cache").glob("*-train-*.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    for tensors in ({"images": good.train.images, "targets": torch.full((4,), 99)},
                    {"images": good.train.images.float(), "targets": good.train.targets},
                    {"images": good.train.images[:, :1], "targets": good.train.targets}):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        again = build_data(cfg, say=None).tensors
        assert torch.equal(again.train.targets, good.train.targets)
        assert torch.equal(again.train.images, good.train.images)


def test_image_folder_reads_good_images_and_skips_nothing(tmp_path):
    from morph.images import image_folder

    _images(tmp_path / "a", n=2)
    _images(tmp_path / "b" / "nested", n=3)
    ds = image_folder(tmp_path)
    assert ds.classes == ["a", "b"] and [t for _, t in ds.samples] == [0, 0, 1, 1, 1]
    img, label = ds[4]
    assert img.size == (32, 32) and img.mode == "RGB" and label == 1


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
