"""MoEfication of a dense Llama into a Mixtral MoE (moe_ds.moefication), on a tiny random Llama (no GGUF needed)."""

import copy
import dataclasses
import json

import pytest
import torch
import transformers as T

from moe_ds import moefication as M

E = 4


def tiny_llama(seed: int = 0) -> T.LlamaForCausalLM:
    """A 2-layer, hidden-32 Llama with SmolLM2's non-default settings (tied embeddings, rope_theta 1e5, GQA,
    explicit head_dim, eps 1e-5), random weights, fp32, eval mode."""
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e5}, tie_word_embeddings=True,
                           max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return T.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def dense():
    return tiny_llama()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def built(dense, windows):
    return M.moefy(dense, M.MoEficationConfig(num_experts=E, top_k=2, calib_windows=8, calib_seq_len=32), windows)


def test_config_maps_llama_settings_onto_mixtral(dense):
    c = M.mixtral_config(dense.config, num_experts=E, top_k=2)
    assert isinstance(c, T.MixtralConfig)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 4, 2, 8)
    assert c.rope_parameters["rope_theta"] == 1e5 and c.rms_norm_eps == 1e-5 and c.tie_word_embeddings
    assert (c.intermediate_size, c.num_local_experts, c.num_experts_per_tok) == (64 // E, E, 2)
    with pytest.raises(M.MoEficationError, match="does not divide"):
        M.mixtral_config(dense.config, num_experts=5, top_k=2)
    with pytest.raises(M.MoEficationError, match="attention_bias"):
        M.mixtral_config(T.LlamaConfig(attention_bias=True, intermediate_size=64), num_experts=E, top_k=2)


@pytest.mark.parametrize("clustering,router", [("coactivation", "lstsq"), ("weights", "centroid")])
def test_all_experts_with_uniform_router_equal_dense(dense, windows, clustering, router):
    cfg = M.MoEficationConfig(num_experts=E, top_k=2, clustering=clustering, router=router)
    moe, _ = M.moefy(dense, cfg, windows)
    assert moe.model.embed_tokens.weight.data_ptr() == moe.lm_head.weight.data_ptr()  # tied, like the source
    M.set_top_k(moe, E)
    M.uniform_router(moe)
    with torch.no_grad():
        want, got = dense(input_ids=windows).logits, moe(input_ids=windows).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    M.set_top_k(moe, 2)  # fewer experts: no longer the dense model
    with torch.no_grad():
        assert (moe(input_ids=windows).logits - want).abs().max() > 1e-3


def test_experts_partition_the_neurons(dense, built):
    moe, layers = built
    for i, layer in enumerate(dense.model.layers):
        gate_up = moe.model.layers[i].mlp.experts.gate_up_proj  # [E, 2m, d]
        down = moe.model.layers[i].mlp.experts.down_proj  # [E, d, m]
        m = 64 // E
        assert gate_up.shape == (E, 2 * m, 32) and down.shape == (E, 32, m)
        assert layers[i]["sizes"] == [m] * E
        # every dense neuron is the gate row of exactly one expert row, with its own up row and down column
        rows = gate_up[:, :m].reshape(-1, 32)
        match = (rows[:, None, :] == layer.mlp.gate_proj.weight[None]).all(dim=2)  # [E*m, I]
        assert torch.equal(match.sum(dim=0), torch.ones(64, dtype=torch.long))
        assert torch.equal(match.sum(dim=1), torch.ones(64, dtype=torch.long))
        neuron = match.float().argmax(dim=1)
        torch.testing.assert_close(gate_up[:, m:].reshape(-1, 32), layer.mlp.up_proj.weight[neuron], atol=0, rtol=0)
        scaled = down.permute(0, 2, 1).reshape(-1, 32) / 2  # stored times top_k = 2
        torch.testing.assert_close(scaled, layer.mlp.down_proj.weight.T[neuron], atol=1e-7, rtol=0)


def test_router_beats_random_selection(built):
    """The fitted router picks experts whose unweighted sum is closer to the dense FFN than k random experts, and
    its picks agree with the k largest-output experts more often than chance (k/E)."""
    _, layers = built
    for stats in layers:
        assert stats["router_error"] < stats["random_error"]
        assert stats["oracle_error"] <= stats["router_error"] + 1e-6
        assert stats["oracle_agreement"] > 2 / E + 0.1


def test_router_logit_scale(built, dense, windows):
    moe, _ = built
    x = M.ffn_inputs(dense, windows)[0]
    logits = x @ moe.model.layers[0].mlp.gate.weight.T
    assert logits.std(dim=1).mean().item() == pytest.approx(M.MoEficationConfig().router_logit_std, rel=1e-4)


def test_balanced_kmeans_recovers_planted_groups():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=gen) * 10
    truth = torch.arange(4).repeat_interleave(6)[torch.randperm(24, generator=gen)]
    points = centres[truth] + torch.randn(24, 16, generator=gen) * 0.1
    labels = M.balanced_kmeans(points, 4, seed=3)
    assert torch.bincount(labels).tolist() == [6] * 4
    for g in range(4):  # same groups up to renaming
        assert truth[labels == g].unique().numel() == 1
    assert labels[0] == 0  # canonical order: groups numbered by their first member
    with pytest.raises(M.MoEficationError, match="do not divide"):
        M.balanced_kmeans(points, 5)


def test_balanced_kmeans_keeps_groups_equal_when_clusters_are_not():
    points = torch.cat([torch.zeros(20, 2), torch.ones(4, 2)]) + torch.randn(24, 2) * 0.01
    assert torch.bincount(M.balanced_kmeans(points, 3)).tolist() == [8, 8, 8]


def test_mean_experts_and_set_top_k(built):
    moe, _ = built
    m = copy.deepcopy(moe)  # the fixture's model stays intact
    down0 = m.model.layers[0].mlp.experts.down_proj.clone()
    M.set_top_k(m, 3)
    torch.testing.assert_close(m.model.layers[0].mlp.experts.down_proj, down0 * 1.5)
    assert m.config.num_experts_per_tok == 3 and m.model.layers[0].mlp.gate.top_k == 3
    with pytest.raises(M.MoEficationError, match="top_k=5"):
        M.set_top_k(m, 5)
    M.mean_experts(m)
    w = m.model.layers[1].mlp.experts.gate_up_proj
    torch.testing.assert_close(w, w[:1].expand_as(w), atol=0, rtol=0)
    torch.testing.assert_close(w[0], moe.model.layers[1].mlp.experts.gate_up_proj.mean(dim=0))


def test_saved_moe_loads_with_auto_class(built, windows, tmp_path):
    moe, _ = built
    moe.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=windows).logits, moe(input_ids=windows).logits, atol=0, rtol=0)


def test_config_checks():
    for bad in ({"top_k": 9}, {"num_experts": 1}, {"router_logit_std": 0.0}, {"clustering": "graph"}):
        with pytest.raises(M.MoEficationError):
            M.MoEficationConfig(**bad)
    with pytest.raises(M.MoEficationError, match="task_limit"):
        M.TestbedConfig(task_limit=-1)


def test_cache_key_follows_settings_not_paths():
    base = M.TestbedConfig()
    key = M.cache_key(base, "abc")
    assert M.cache_key(dataclasses.replace(base, output="elsewhere", force=True), "abc") == key
    assert M.cache_key(dataclasses.replace(base, top_k=4), "abc") != key
    assert M.cache_key(base, "abd") != key  # another GGUF file


@pytest.mark.slow
def test_smollm2_gguf_config_maps_onto_mixtral():
    """The shipped GGUF's settings (tied embeddings, rope_theta 1e5, GQA 9/3, head_dim 64) survive the mapping."""
    try:
        path = M.smollm2_gguf()
    except M.GGUFMissingError as e:
        pytest.skip(str(e))
    dense_cfg = T.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    c = M.mixtral_config(dense_cfg, num_experts=8, top_k=2)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        576, 30, 9, 3, 64)
    assert c.rope_parameters["rope_theta"] == dense_cfg.rope_parameters["rope_theta"] == 1e5
    assert c.tie_word_embeddings and c.rms_norm_eps == dense_cfg.rms_norm_eps
    assert c.intermediate_size * 8 == dense_cfg.intermediate_size == 1536


def test_testbed_texts_are_jsonl_text_files(tmp_path):
    data = tmp_path / "shared"
    data.mkdir()
    out = tmp_path / "texts"
    assert M.write_testbed_text(data, out) == {"train": len(out.joinpath("train.jsonl").read_text().splitlines()),
                                                "heldout": None}
    assert not (out / "heldout.jsonl").exists()  # no WikiText-2 copy: no held-out file
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text"} and len(first["text"]) > 100
    docs = [" = A = \n first page .", " = B = \n second page ."]
    (data / M.WIKITEXT_FILE).write_text("".join(json.dumps({"page": d}) + "\n" for d in docs))
    assert M.write_testbed_text(data, out)["heldout"] == 2
    assert [json.loads(line)["text"] for line in (out / "heldout.jsonl").read_text().splitlines()] == docs
