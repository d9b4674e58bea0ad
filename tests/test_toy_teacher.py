"""The toy-teacher builder: corpus split, a tiny training run, the saved teacher and its cache."""

import json
import shutil

import pytest
import transformers as T

from moe_ds.toy_teacher import (HELDOUT_FILE, RECORD, TRAIN_FILE, TeacherConfig, build_teacher, load_documents,
                                split_documents, stdlib_dir, stdlib_files)

TINY = {"vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8,
        "num_experts": 4, "top_k": 2, "moe_intermediate_size": 32, "seq_len": 32, "batch_size": 8, "steps": 25,
        "lr": 1e-2, "heldout_chars": 6_000}


@pytest.fixture(scope="module")
def small_stdlib(tmp_path_factory):
    """A stand-in stdlib folder: the 40 smallest top-level modules plus one package and one test folder."""
    src, root = stdlib_dir(), tmp_path_factory.mktemp("stdlib")
    for path in sorted(src.glob("*.py"), key=lambda p: (p.stat().st_size, p.name))[:40]:
        shutil.copy(path, root / path.name)
    shutil.copytree(src / "json", root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text("assert True\n")
    return root


def test_split_is_deterministic_disjoint_and_by_unit():
    docs = load_documents()
    assert not any(d.source.split("/")[0] in ("test", "site-packages") for d in docs)
    train, held = split_documents(docs, 400_000)
    train2, held2 = split_documents(load_documents(), 400_000)
    assert [d.source for d in held] == [d.source for d in held2] and len(train) == len(train2)
    assert not {d.unit for d in train} & {d.unit for d in held}  # a package never straddles the split
    assert not {d.source for d in train} & {d.source for d in held}
    assert len(train) + len(held) == len(docs)
    assert sum(len(d.text) for d in held) >= 400_000
    assert any(d.source.startswith("pydoc_data/topics:") for d in train)
    assert sorted(split_documents(docs, 100_000)[1], key=lambda d: d.source) != sorted(held, key=lambda d: d.source)


def test_config_checks():
    with pytest.raises(ValueError, match="exactly one"):
        TeacherConfig(steps=None)
    with pytest.raises(ValueError, match="top_k"):
        TeacherConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TeacherConfig(num_heads=6, num_kv_heads=4)
    assert TeacherConfig(steps=None, minutes=1.0).minutes == 1.0


def test_tiny_build_trains_saves_and_caches(tmp_path, small_stdlib):
    out = tmp_path / "toy" / "teacher"
    cfg = TeacherConfig(**TINY)
    rec = build_teacher(cfg, out, stdlib_root=small_stdlib)
    assert not rec["cached"] and rec["steps"] == TINY["steps"]
    assert rec["loss_last"] < rec["loss_first"] - 0.5
    assert rec["heldout_ppl"] < rec["heldout_ppl_before"]
    assert json.loads((out / RECORD).read_text())["heldout_ppl"] == rec["heldout_ppl"]
    assert rec["corpus"]["stdlib_files"] == len(stdlib_files(small_stdlib))
    assert "test/test_x.py" not in stdlib_files(small_stdlib)

    # corpus files the later stages read: JSONL with a text field, beside the teacher
    data = tmp_path / "toy" / "data"
    train = [json.loads(line) for line in (data / TRAIN_FILE).read_text().splitlines()]
    held = [json.loads(line) for line in (data / HELDOUT_FILE).read_text().splitlines()]
    assert train and held and all(isinstance(r["text"], str) and r["text"] for r in train + held)
    assert not {r["source"] for r in train} & {r["source"] for r in held}

    # the folder loads like any Hub model
    model = T.AutoModelForCausalLM.from_pretrained(out)
    tok = T.AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen3_moe" and tok.eos_token_id is not None
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id

    # same config: reused without training; a changed config rebuilds
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = build_teacher(TeacherConfig(**TINY), out, stdlib_root=small_stdlib)
    assert again["cached"] and again["heldout_ppl"] == rec["heldout_ppl"]
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    changed = build_teacher(TeacherConfig(**{**TINY, "steps": 5}), out, stdlib_root=small_stdlib)
    assert not changed["cached"] and changed["steps"] == 5 and changed["cache_key"] != rec["cache_key"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["data", "teacher"]  # no temporary or old folder left

    # a forced rebuild with the same config and seed is the same teacher, on the same corpus files
    held_bytes = (data / HELDOUT_FILE).read_bytes()
    forced = build_teacher(TeacherConfig(**{**TINY, "steps": 5}), out, force=True, stdlib_root=small_stdlib)
    assert not forced["cached"] and forced["heldout_ppl"] == changed["heldout_ppl"]
    assert (data / HELDOUT_FILE).read_bytes() == held_bytes
