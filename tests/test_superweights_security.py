"""The sharing record of a shared model or ensemble is data: bounded, checked against itself and against the
tensor shapes in the file, and refused with one line when inconsistent (``morph.load``: ``CheckpointError``;
the CLI: one ``error:`` line, exit code 2, no traceback).

Hostile files are written from good ones (timm ``test_resnet`` at 3x32x32, one shared model and one
two-member ensemble) by editing their ``morph_info`` metadata or their tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from morph.cli.main import app
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import morph
from morph.errors import CheckpointError
from morph.superweights.ensemble import ensemble

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sw")
    base = morph.build_model("timm/test_resnet", num_classes=10)
    shared = morph.convert(base, share="learned", bins=2, templates=3, seed=0, input_size=SIZE)
    ens = ensemble([base, base], widths=[1.0, 0.5], clusters="bins", bins=2, seed=1, input_size=SIZE)
    paths = {"shared": d / "shared.safetensors", "ensemble": d / "ensemble.safetensors"}
    morph.save(shared, paths["shared"])
    morph.save(ens, paths["ensemble"])
    return paths


def _rewrite(src: Path, dst: Path, info=None, tensors=None) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    sd = load_file(str(src))
    d = json.loads(meta["morph_info"])
    if info is not None:
        info(d)
    if tensors is not None:
        tensors(sd, d)
    meta["morph_info"] = json.dumps(d)
    save_file(sd, str(dst), metadata=meta)
    return dst


def _rec(d):
    return d["extra"]["superweights"]


def _bank_key(sd, level=0, what="templates"):
    return next(k for k in sorted(sd) if f".mix.banks.{level}.{what}" in k)


CASES = {
    # (which file, edit of the record, edit of the tensors, text of the refusal)
    "record-missing": ("shared", lambda d: d["extra"].pop("superweights"), None, "extra.superweights"),
    "record-version": ("shared", lambda d: _rec(d).update(version=2), None, "version 2"),
    "clusters-not-list": ("shared", lambda d: _rec(d).update(clusters="all"), None, "clusters must be"),
    "layer-in-two-clusters": ("shared", lambda d: _rec(d)["clusters"][1].append(_rec(d)["clusters"][0][0]), None,
                              "in two clusters"),
    "bad-member-index": ("shared", lambda d: _rec(d)["clusters"][0][0].__setitem__(0, 5), None, "not [member"),
    "bank-templates-9": ("shared", lambda d: _rec(d)["banks"][0].__setitem__(3, 9), None, "out of bounds"),
    "bank-huge-piece": ("shared", lambda d: _rec(d)["banks"][0].__setitem__(2, 1 << 50), None, "out of bounds"),
    "bank-twice": ("shared", lambda d: _rec(d)["banks"].append(list(_rec(d)["banks"][0])), None, "listed twice"),
    "bank-level-gap": ("shared", lambda d: _rec(d)["banks"].append([0, 40, 9, 1, 1]), None, "before its level"),
    "coef-index-out-of-range": ("shared", lambda d: _rec(d)["coef"][0][2].__setitem__(0, 999), None,
                                "coefficient vector 999"),
    "coef-unknown-layer": ("shared", lambda d: _rec(d)["coef"][0].__setitem__(1, "nowhere"), None,
                           "not a clustered layer"),
    "coef-too-many-levels": ("shared", lambda d: _rec(d)["coef"][0][2].extend([0] * 70), None, "levels"),
    "templates-field": ("shared", lambda d: d.update(templates=7), None, "largest K"),
    "share-none": ("shared", lambda d: d.update(share="none"), None, "share 'none' is not learned"),
    "budget-negative": ("shared", lambda d: _rec(d).update(budget=-3), None, "budget must be"),
    "bank-tensor-size": ("shared", None, lambda sd, d: sd.__setitem__(_bank_key(sd), torch.zeros(7)), "the record says"),
    "coef-tensor-size": ("shared", None, lambda sd, d: sd.__setitem__(_bank_key(sd, 0, "coefficients.0"), torch.zeros(5)),
                         "the record says"),
    "stray-bank-tensor": ("shared", None, lambda sd, d: sd.__setitem__("fc.mix.banks.0.templates", torch.zeros(4)),
                          "no recorded layer"),
    "bank-missing": ("shared", None, lambda sd, d: [sd.pop(k) for k in [k for k in sd if ".mix.banks.0.templates" in k]],
                     "recorded banks"),
    "record-piece-vs-model": ("shared", None, lambda sd, d: _grow_first_bank(sd, d), "do not fit"),
    "members-missing": ("ensemble", lambda d: d["extra"].pop("members"), None, "members must be"),
    "members-too-many": ("ensemble", lambda d: d["extra"]["members"].extend(d["extra"]["members"] * 9), None,
                         "members must be"),
    "member-refused-kwarg": ("ensemble", lambda d: d["extra"]["members"][1]["spec"]["kwargs"].update(pretrained=True),
                             None, "refuses model kwarg 'pretrained'"),
    "member-width": ("ensemble", lambda d: d["extra"]["members"][1].update(width=3.0), None, "above 1"),
    "member-not-in-file": ("ensemble", lambda d: _rec(d)["clusters"][0][0].__setitem__(0, 3), None, "not [member"),
    "shared-with-members": ("shared", lambda d: d["extra"].update(members=[]), None, "records no ensemble members"),
}


def _grow_first_bank(sd, d):
    """A record and tensors that agree with each other but not with the model's layer shapes."""
    rec = _rec(d)
    bank = rec["banks"][0]
    bank[2] += 1
    for k in [k for k in sd if ".mix.banks.0.templates" in k]:
        layer = k[: k.index(".mix.banks.")]
        if any(e[1] == layer and rec["clusters"][0] and [e[0], e[1]] in rec["clusters"][0] for e in rec["coef"]):
            sd[k] = torch.zeros(bank[2] * bank[3])


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_sharing_record_is_refused_with_one_line(good, tmp_path, case):
    which, info, tensors, text = CASES[case]
    path = _rewrite(good[which], tmp_path / f"{case}.safetensors", info, tensors)
    with pytest.raises(CheckpointError) as e:
        morph.load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert text in msg, msg


def test_cli_refuses_a_hostile_record_with_one_error_line(good, tmp_path):
    runner = CliRunner()
    for case in ("coef-index-out-of-range", "bank-tensor-size", "member-refused-kwarg"):
        which, info, tensors, text = CASES[case]
        path = _rewrite(good[which], tmp_path / f"{case}.safetensors", info, tensors)
        for cmd in (["inspect", str(path), "--no-flops"], ["bake", str(path), "-o", str(tmp_path / "out.safetensors")]):
            r = runner.invoke(app, cmd, env={"COLUMNS": "200"})
            assert r.exit_code == 2, (case, cmd, r.output)
            err = r.stderr.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in r.output, r.output
        assert not (tmp_path / "out.safetensors").exists()


def test_good_files_load(good):
    for path in good.values():
        morph.load(path)
