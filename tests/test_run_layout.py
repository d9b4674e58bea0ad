"""Atomic writers of moe_ds.run_layout: a file or a folder appears whole or not at all."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_ds.run_layout import atomic_file, atomic_output_dir, write_atomic, write_json_atomic


def test_write_atomic_text_bytes_and_json(tmp_path):
    write_atomic(tmp_path / "a.txt", "héllo\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "a.txt", "again")  # replaces the finished file
    write_json_atomic(tmp_path / "c.json", {"x": 1})
    assert (tmp_path / "a.txt").read_text() == "again"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json"]  # no temp files left
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_file_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "w.safetensors"
    with atomic_file(path) as tmp:
        save_file({"x": torch.ones(2)}, tmp)
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            save_file({"x": torch.zeros(2)}, tmp)
            raise RuntimeError("killed mid-write")
    assert torch.equal(load_file(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_atomic_output_dir_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "f").write_text("2")
            raise RuntimeError
    assert (out / "f").read_text() == "1"
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "g").write_text("2")
    assert [p.name for p in out.iterdir()] == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
