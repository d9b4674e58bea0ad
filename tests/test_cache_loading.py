"""How the cache stage loads its teacher and splits its corpus (#11 items 4, 5, 9 and 10).

- Item 4: the teacher's weights go to the rank's GPU through ``from_pretrained(device_map=...)``, never built on
  the host and then moved. No GPU here: the device map is checked on the arguments ``from_pretrained``
  receives, and no ``.to()``/``.cuda()`` may follow the build.
- Item 5: ``--quantize`` of a teacher whose experts are fused 3-D weights (every transformers-5 MoE family),
  which bitsandbytes would leave unquantised, is refused in one line before anything is written, whether or
  not bitsandbytes imports; a teacher it can quantise records exactly what was quantised.
- Item 9: a teacher whose tokenizer adds BOS reads every document after its BOS; the rule is in the cache.
- Item 10: with 2 ranks (simulated one after the other in this process: they only meet through the files)
  each rank tokenises only its half of the records; the two shards cover every document once and the index
  presents them in the strided order, ``max_sequences`` counting over all ranks.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, processors

from conftest import FAMILIES, REPO, spy_on_loading, tiny_config, tiny_model
from moe_ds import cache_teacher as ct
from moe_ds import teacher_cache as tc
from moe_ds.cache_teacher import CacheTeacherConfig, CacheTeacherError, cache_teacher, load_teacher, teacher_precision
from moe_ds.cli import run
from moe_ds.corpus import pack_sequences
from moe_ds.dist import DistInfo


def _jsonl(path: Path, texts) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dense_config(vocab_size: int) -> T.Qwen3Config:
    return T.Qwen3Config(vocab_size=vocab_size, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, num_hidden_layers=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=False)


@pytest.fixture(scope="module")
def dense_teacher(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny dense Qwen3 (all its weights in nn.Linear, which bitsandbytes can quantise) with its tokenizer."""
    path = tmp_path_factory.mktemp("dense_teacher")
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(_dense_config(len(tiny_tokenizer))).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- item 4

@pytest.mark.parametrize("quantize", ["none", "8bit"])
def test_teacher_weights_go_to_the_ranks_gpu_through_from_pretrained(dense_teacher, monkeypatch, quantize):
    """from_pretrained gets ``device_map={"": cuda:LOCAL_RANK}``; the built model is never moved."""
    spy = spy_on_loading(monkeypatch, {"": "cpu"})  # no GPU here: load where the map would have put it
    cfg = CacheTeacherConfig(teacher=str(dense_teacher), data="unused.jsonl", output="unused.h5", quantize=quantize)
    model, precision = load_teacher(cfg, torch.device("cuda", 3))
    assert len(spy.calls) == 1 and spy.calls[0]["device_map"] == {"": torch.device("cuda", 3)}
    assert model is spy.built[0] and spy.calls[0]["dtype"] == torch.bfloat16  # --dtype auto on a GPU
    assert spy.moved == []
    assert precision == ("bfloat16" if quantize == "none" else "8bit(bitsandbytes: 14 nn.Linear; the rest bfloat16)")


def test_teacher_on_cpu_is_loaded_in_place(tiny_lm_dir):
    model, precision = load_teacher(CacheTeacherConfig(teacher=str(tiny_lm_dir), data="d.jsonl", output="o.h5"),
                                    torch.device("cpu"))
    assert precision == "float32" and {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------------- item 5

@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantizing_fused_experts_is_refused_from_the_config(monkeypatch, family, quantize):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # the refusal must not need it
    with pytest.raises(CacheTeacherError) as e:
        teacher_precision(tiny_config(family), quantize, torch.bfloat16)
    message = str(e.value)
    assert message.startswith(f"--quantize {quantize}: bitsandbytes quantizes only nn.Linear layers, and this "
                              f"{family} teacher holds its experts as ")
    assert "mlp.experts.gate_up_proj [" in message and "would stay bfloat16" in message
    assert message.endswith("so use --quantize none with --dtype bf16") and "\n" not in message


def test_precision_states_what_bitsandbytes_quantizes():
    dense = _dense_config(320)
    assert teacher_precision(dense, "none", torch.float32) == "float32"
    assert teacher_precision(dense, "4bit", torch.bfloat16) == "4bit(bitsandbytes: 14 nn.Linear; the rest bfloat16)"


def _launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_cache_teacher", REPO / "launch" / "cache_teacher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("existing", [False, True])
def test_quantized_moe_teacher_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_lm_dir, stdlib_text, capsys,
                                                                     monkeypatch, existing):
    """Refused before any output is touched: neither a new cache nor a finished one is written or removed."""
    data = _jsonl(tmp_path / "c.jsonl", [stdlib_text[i:i + 2000] for i in range(0, 10_000, 2000)])
    out = tmp_path / "out" / "c.h5"
    args = ["--teacher", str(tiny_lm_dir), "--data", data, "--output", str(out), "--top-k", "4", "--seq-len", "32",
            "--max-sequences", "4"]
    launcher = _launcher()
    if existing:
        assert run("cache_teacher", lambda: launcher.main(args), errors=launcher.ERRORS) == 0
    before = _snapshot(tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    capsys.readouterr()
    code = run("cache_teacher", lambda: launcher.main([*args, "--quantize", "4bit", "--overwrite"]),
               errors=launcher.ERRORS)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("cache_teacher: error: --quantize 4bit: bitsandbytes quantizes only nn.Linear layers, "
                             "and this qwen3_moe teacher holds its experts as 4 fused 3-D weights "
                             "(model.layers.0.mlp.experts.gate_up_proj [6, 48, 32], ...; ")
    assert _snapshot(tmp_path) == before and out.exists() == existing


def test_quantized_dense_teacher_records_exactly_what_was_quantized(tmp_path, dense_teacher, stdlib_text):
    data = _jsonl(tmp_path / "c.jsonl", [stdlib_text[i:i + 2000] for i in range(0, 20_000, 2000)])
    base = CacheTeacherConfig(teacher=str(dense_teacher), data=data, output=str(tmp_path / "fp32.h5"), top_k=8,
                              seq_len=32, max_sequences=6, batch_size=3)
    fp32 = cache_teacher(base)
    q8 = cache_teacher(replace(base, output=str(tmp_path / "q8.h5"), quantize="8bit"))
    assert fp32.teacher_dtype == "float32@cpu"
    assert q8.teacher_dtype == "8bit(bitsandbytes: 14 nn.Linear; the rest float32)@cpu"
    a, b = tc.TeacherCacheDataset(tmp_path / "fp32.h5"), tc.TeacherCacheDataset(tmp_path / "q8.h5")
    for i in range(6):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
        torch.testing.assert_close(b[i]["logsumexp"], a[i]["logsumexp"], rtol=0, atol=0.05)


# ----------------------------------------------------------------------------------------------- item 9

def test_teacher_whose_tokenizer_adds_bos_reads_it_before_every_document(tmp_path, tiny_tokenizer, stdlib_text):
    tok = T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str()),
                                    eos_token=tiny_tokenizer.eos_token)
    tok.add_special_tokens({"bos_token": "<s>"})
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    teacher = tmp_path / "teacher"
    tiny_model("mixtral", vocab_size=len(tok)).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    texts = [stdlib_text[i:i + 150] for i in range(0, 3000, 150)]
    cfg = CacheTeacherConfig(teacher=str(teacher), data=_jsonl(tmp_path / "c.jsonl", texts),
                             output=str(tmp_path / "c.h5"), top_k=4, seq_len=32)
    meta = cache_teacher(cfg)
    stream = []
    for t in texts:
        stream += [bos] + tok(t, add_special_tokens=False)["input_ids"] + [eos]
    ds = tc.TeacherCacheDataset(cfg.output)
    assert len(ds) == len(stream) // 32 and len(ds) >= 4
    assert [ds[i]["input_ids"].tolist() for i in range(len(ds))] == [stream[i:i + 32]
                                                                     for i in range(0, len(ds) * 32, 32)]
    assert f"as bos={bos} + text + eos={eos}, concatenated" in meta.dataset


# ----------------------------------------------------------------------------------------------- item 10

@pytest.fixture
def counted_ranks(monkeypatch, tiny_lm_dir):
    """``as_rank(r, W)`` makes the next ``cache_teacher`` call run as rank r of W; ``tokenised`` lists the texts
    each rank's tokenizer was given in batches (packing), by rank."""
    state = {"rank": 0}
    tokenised: dict[int, list[str]] = {}
    cls = type(T.AutoTokenizer.from_pretrained(tiny_lm_dir))
    original = cls.__call__

    def counting(self, text=None, *args, **kwargs):
        if isinstance(text, list):
            tokenised.setdefault(state["rank"], []).extend(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting)

    def as_rank(rank: int, world_size: int) -> None:
        state["rank"] = rank
        monkeypatch.setattr(ct, "init_distributed", lambda: DistInfo(rank, world_size, rank))
        monkeypatch.setenv("RANK", str(rank))  # for log_main
        monkeypatch.setenv("WORLD_SIZE", str(world_size))

    return as_rank, tokenised


def _two_ranks(cfg, as_rank) -> tc.CacheMeta:
    as_rank(1, 2)  # rank 1 first: rank 0 then finds its shard complete and writes the index
    assert cache_teacher(cfg) is None
    as_rank(0, 2)
    return cache_teacher(cfg)


def _records(stdlib_text: str) -> list[str]:
    """41 documents of 60-900 characters (and one empty), so the two ranks' token counts differ."""
    texts, at = [], 0
    for i in range(41):
        size = 60 + (i * 337) % 840
        texts.append(stdlib_text[at:at + size] if i != 17 else "")
        at += size
    return texts


def test_each_rank_tokenises_only_its_records_and_the_shards_cover_each_once(tmp_path, tiny_lm_dir, stdlib_text,
                                                                            counted_ranks):
    as_rank, tokenised = counted_ranks
    texts = _records(stdlib_text)
    cfg = CacheTeacherConfig(teacher=str(tiny_lm_dir), data=_jsonl(tmp_path / "c.jsonl", texts),
                             output=str(tmp_path / "c.h5"), top_k=4, seq_len=32, batch_size=8)
    meta = _two_ranks(cfg, as_rank)
    # Each rank tokenised its own records once, half the corpus; together every document exactly once.
    assert tokenised[0] == [t for t in texts[0::2] if t] and tokenised[1] == [t for t in texts[1::2] if t]
    assert sorted(tokenised[0] + tokenised[1]) == sorted(t for t in texts if t)
    # Shard r holds rank r's records packed on their own; the index interleaves them, up to what both cover.
    tokenizer = T.AutoTokenizer.from_pretrained(tiny_lm_dir)
    packed = [[s.tolist() for s in pack_sequences(texts[r::2], tokenizer, 32)] for r in range(2)]
    assert len(packed[0]) != len(packed[1])
    shards = []
    for r in range(2):
        with h5py.File(tc.shard_path(cfg.output, r, 2)) as f:
            shards.append(f["input_ids"][:].tolist())
    assert shards == packed
    n = tc.index_rows([len(p) for p in packed])
    assert meta.num_sequences == n == min(2 * len(packed[0]), 2 * len(packed[1]) + 1) and meta.world_size == 2
    ds = tc.TeacherCacheDataset(cfg.output)
    assert [ds[g]["input_ids"].tolist() for g in range(n)] == [packed[g % 2][g // 2] for g in range(n)]
    with h5py.File(cfg.output) as f:
        assert f["input_ids"][:].tolist() == [packed[g % 2][g // 2] for g in range(n)]
    assert "record i goes to rank i % world_size, which packs only its own records" in meta.dataset


def test_max_sequences_counts_over_all_ranks(tmp_path, tiny_lm_dir, stdlib_text, counted_ranks, capsys):
    as_rank, tokenised = counted_ranks
    texts = _records(stdlib_text)
    cfg = CacheTeacherConfig(teacher=str(tiny_lm_dir), data=_jsonl(tmp_path / "c.jsonl", texts),
                             output=str(tmp_path / "c.h5"), top_k=4, seq_len=32, max_sequences=7, batch_size=2)
    meta = _two_ranks(cfg, as_rank)
    assert meta.num_sequences == 7 and meta.world_size == 2
    assert [tc.read_meta(tc.shard_path(cfg.output, r, 2)).num_sequences for r in range(2)] == [4, 3]
    assert set(tokenised[0]) <= set(texts[0::2]) and set(tokenised[1]) <= set(texts[1::2])
    tokenizer = T.AutoTokenizer.from_pretrained(tiny_lm_dir)
    packed = [[s.tolist() for s in pack_sequences(texts[r::2], tokenizer, 32)] for r in range(2)]
    ds = tc.TeacherCacheDataset(cfg.output)
    assert [ds[g]["input_ids"].tolist() for g in range(7)] == [packed[g % 2][g // 2] for g in range(7)]
    # A finished 2-rank cache is this configuration's for one rank too, as before: nothing is redone or written.
    before = _snapshot(tmp_path)
    as_rank(0, 1)
    capsys.readouterr()
    assert cache_teacher(cfg) == meta
    assert _snapshot(tmp_path) == before
    err = capsys.readouterr().err
    assert "nothing to do" in err and "its 2 rank(s) packed their own records" in err


def test_a_rank_without_a_share_reads_no_text(tmp_path, tiny_lm_dir, stdlib_text, counted_ranks):
    """max_sequences below the rank count: the last rank has no sequences to make and tokenises nothing."""
    as_rank, tokenised = counted_ranks
    texts = _records(stdlib_text)
    cfg = CacheTeacherConfig(teacher=str(tiny_lm_dir), data=_jsonl(tmp_path / "c.jsonl", texts),
                             output=str(tmp_path / "c.h5"), top_k=4, seq_len=32, max_sequences=1)
    meta = _two_ranks(cfg, as_rank)
    assert meta.num_sequences == 1 and 1 not in tokenised
    assert np.asarray(tc.TeacherCacheDataset(cfg.output)[0]["input_ids"]).shape == (32,)
