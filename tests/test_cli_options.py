"""`bloodcell train`'s options are generated from TrainConfig's fields: every field has
its option (or is marked as having none), with the field's type, default and help, and
the parsed options make the same TrainConfig as the Python API."""
from __future__ import annotations

import argparse
import dataclasses
import os

import pytest

from bloodcell.cli import build_parser
from bloodcell.cli.args import add_options, options_to_config
from bloodcell.trainconfig import TrainConfig


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_field_is_an_option_with_its_type_default_and_help():
    opts = {a.dest: a for a in _train_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True) is False:
            assert f.name not in opts, f.name
            continue
        a = opts[f.name]
        assert a.help, f"--{f.name} has no help"
        if f.default is not dataclasses.MISSING:
            assert a.default == f.default, f.name
    assert opts["max_steps_per_epoch"].help == argparse.SUPPRESS
    # typed from the annotation; ranged fields checked by the parser too
    assert type(opts["lr"].type("0.01")) is float and type(opts["epochs"].type("3")) is int
    assert opts["split_file"].type is str
    with pytest.raises(argparse.ArgumentTypeError, match="out of range"):
        opts["epochs"].type("0")
    assert opts["schedule"].choices == ["constant", "onecycle"]
    assert opts["model"].required and opts["out"].required and not opts["data"].required
    assert opts["progress"].option_strings == ["--no-progress"]


def test_parsed_options_make_the_config_and_the_registry_fills_the_rest():
    args = build_parser().parse_args(["train", "--model", "cnn3", "--data", "d", "--out", "o", "--lr", "0.01",
                                      "--schedule", "onecycle", "--resume", "--no-progress",
                                      "--max-steps-per-epoch", "2"])
    cfg = options_to_config(TrainConfig, args, pretrained=False)
    assert cfg == TrainConfig(model="cnn3", data="d", out="o", lr=0.01, schedule="onecycle", resume=True,
                              progress=False, max_steps_per_epoch=2, pretrained=False)
    r = cfg.resolved()
    assert r.lr == 0.01 and r.schedule == "onecycle"   # given: kept
    assert r.epochs is not None and r.batch_size is not None  # not given: the model's defaults


def test_bad_values_are_refused_by_the_parser(capsys):
    for bad in (["--lr", "fast"], ["--precision", "fp8"], ["--epochs", "2.5"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--model", "cnn3", "--out", "o", *bad])
        assert bad[0] in capsys.readouterr().err


def test_add_options_on_another_dataclass():
    @dataclasses.dataclass
    class Cfg:
        name: str = dataclasses.field(metadata={"help": "a name"})
        size: int | None = dataclasses.field(default=None, metadata={"help": "a size", "flag": "--px"})
        quiet: bool = False
        skip: list = dataclasses.field(default_factory=list, metadata={"cli": False})
    p = argparse.ArgumentParser()
    add_options(p, Cfg)
    assert options_to_config(Cfg, p.parse_args(["--name", "a", "--px", "3", "--quiet"])) == Cfg("a", 3, True)
    assert options_to_config(Cfg, p.parse_args(["--name", "b"])) == Cfg("b")
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name is required: it has no default


def test_out_paths_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """adapt, evaluate, export, calibrate and train refuse an --out they could not write at
    the end, before minutes of work (checked with a file in the way: works as root too)."""
    import bloodcell.adapt
    import bloodcell.cli.train
    from bloodcell.cli import main
    from bloodcell.cli.args import check_out
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_out(afile, folder=True)
    with pytest.raises(ValueError, match="is a folder"):
        check_out(tmp_path, folder=False)
    with pytest.raises(ValueError, match="afile is not a folder"):
        check_out(afile / "run" / "x.json", folder=False)
    check_out(tmp_path / "new" / "deeper", folder=True)  # folders still to make are fine
    assert not (tmp_path / "new").exists()  # and none is made by the check
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(ValueError, match="not writable"):
            check_out(ro / "run", folder=True)
    monkeypatch.setattr(bloodcell.adapt, "adapt", lambda *a, **k: pytest.fail("fitted before checking --out"))
    monkeypatch.setattr(bloodcell.cli.train, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    for cmd in (["adapt", "--data", str(tmp_path), "--out", str(afile)],
                ["evaluate", "--data", str(tmp_path), "--out", str(afile)],
                ["calibrate", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(afile / "c.json")],
                ["export", "--out", str(afile / "m.onnx")]):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert f"--out {afile}" in err and "not a folder" in err, (cmd, err)


def test_options_are_not_abbreviated_and_numbers_are_checked(capsys):
    from bloodcell.cli import main
    with pytest.raises(SystemExit):  # not --split-file test
        main(["calibrate", "--model", "x", "--split", "test"])
    assert "unrecognized arguments: --split test" in capsys.readouterr().err
    for bad in (["--threshold", "nan"], ["--components", "0"]):
        with pytest.raises(SystemExit):
            main(["screen-fit", "--out", "s.json", *bad])
        assert "out of range" in capsys.readouterr().err
