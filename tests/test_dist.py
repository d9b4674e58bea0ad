"""Collectives: every tensor handed to one lives on the backend's device (NCCL has no CPU backend)."""

import ast
from pathlib import Path

import pytest
import torch

from conftest import REPO
from moe_ds import dist


def test_all_reduce_sum_hands_the_collective_a_tensor_on_the_collective_device(monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "_initialized", lambda: True)
    monkeypatch.setattr(dist, "collective_device", lambda: torch.device("meta"))  # stands in for cuda:LOCAL_RANK
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: seen.append(t.device))
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with pytest.raises(NotImplementedError):  # a meta tensor has no data to copy back: the collective already ran
        dist.all_reduce_sum(x)
    assert seen == [torch.device("meta")]
    monkeypatch.undo()
    torch.testing.assert_close(dist.all_reduce_sum(x), x)  # one process: the tensor itself


def test_no_collective_is_called_outside_moe_ds_dist():
    """Every all_reduce/all_gather/broadcast goes through moe_ds.dist, which puts the tensor on the right device."""
    calls = []
    for path in sorted((REPO / "moe_ds").rglob("*.py")):
        if path.name == "dist.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in {"all_reduce", "all_gather", "broadcast", "reduce",
                                                                  "all_gather_into_tensor", "reduce_scatter"}:
                src = ast.unparse(node)
                if "distributed" in src or src.startswith(("dist.", "comm.")):
                    calls.append(f"{Path(path).relative_to(REPO)}:{node.lineno}: {src}")
    assert calls == []
