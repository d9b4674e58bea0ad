"""Command lines generated from config dataclasses (moe_ds.cli)."""

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from moe_ds.cli import ConfigError, build_parser, field_comments, parse_config, run


@dataclass
class ToyConfig:
    model: str  # the model directory
    rank: int | None = None  # wrapper rank r
    init: Literal["mean", "svd"] = "svd"  # zero-shot start
    shuffle: bool = True  # shuffle the data
    layers: list[int] = field(default_factory=list)  # feature layers
    ratio: float = 0.5  # kept share of expert bytes

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")


def test_field_comments_become_help(capsys):
    assert field_comments(ToyConfig)["rank"] == "wrapper rank r"
    with pytest.raises(SystemExit):
        build_parser(ToyConfig, "a toy").parse_args(["--help"])
    out = capsys.readouterr().out
    assert "wrapper rank r (default: None)" in out
    assert "the model directory (required)" in out
    assert "{mean,svd}" in out


def test_types_flags_and_defaults():
    cfg = parse_config(ToyConfig, ["--model", "m", "--rank", "3", "--init", "mean", "--no-shuffle", "--layers", "1",
                                   "2", "--local_rank=1"])
    assert cfg == ToyConfig("m", 3, "mean", False, [1, 2], 0.5)
    assert parse_config(ToyConfig, ["--model=m"]) == ToyConfig("m")
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--model", "m", "--init", "spec"])  # not a choice
    # a repeated list option adds to the list; an abbreviation is not another option's name
    assert parse_config(ToyConfig, ["--model", "m", "--layers", "1", "--layers", "2", "3"]).layers == [1, 2, 3]
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--model", "m", "--layer", "1"])
    # an optional number can be set back to None from the command line (a config file may have set it)
    assert parse_config(ToyConfig, ["--model", "m", "--rank", "none"]).rank is None
    assert parse_config(ToyConfig, ["--model", "m", "--rank", "None"]).rank is None
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--model", "m", "--ratio", "none"])  # not optional: float only


def test_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": "from-file", "ratio": 0.25, "rank": 4}))
    cfg = parse_config(ToyConfig, ["--config", str(path), "--rank", "8"], config_file=True)
    assert (cfg.model, cfg.ratio, cfg.rank, cfg.init) == ("from-file", 0.25, 8, "svd")
    (tmp_path / "bad.yaml").write_text("model: m\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['bogus'\]"):
        parse_config(ToyConfig, ["--config", str(tmp_path / "bad.yaml")], config_file=True)


def test_errors_are_one_line_and_exit_2(capsys):
    with pytest.raises(ConfigError, match="missing required setting"):
        parse_config(ToyConfig, [])
    assert run("toy", lambda: parse_config(ToyConfig, ["--model", "m", "--ratio", "2"])) == 2
    err = capsys.readouterr().err
    assert err == "toy: error: settings: ratio must be in (0, 1], got 2.0\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run("toy", lambda: 1 / 0)


def test_full_disk_and_interrupt_are_one_line(capsys):
    import errno

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")

    def full_in_rust():  # safetensors reports the errno only in its message
        raise RuntimeError("Error while serializing: I/O error: File too large (os error 27)")

    def interrupted():
        raise KeyboardInterrupt

    assert run("toy", full) == 2 and run("toy", full_in_rust) == 2 and run("toy", interrupted) == 130
    assert capsys.readouterr().err.splitlines() == [
        "toy: error: No space left on device writing /out/model.safetensors; free space and rerun the same command "
        "to resume",
        "toy: error: File too large writing the output; free space and rerun the same command to resume",
        "toy: interrupted; rerun the same command to resume"]
    with pytest.raises(PermissionError):  # other OS errors are not disk space
        run("toy", lambda: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
