"""The architecture table and the surgery, checked for every supported family."""

import pytest
import torch
import transformers as T
from safetensors import safe_open

from conftest import FAMILIES, tiny_config, tiny_model
from moe_ds.arch import ARCHITECTURES, PROJECTIONS, UnsupportedModelError, get_architecture
from moe_ds.checkpoint import compress_model
from moe_ds.modeling_shared_core import find_experts
from moe_ds.shared_core import SharedCoreExperts


def test_table_covers_the_five_families():
    assert set(ARCHITECTURES) == set(FAMILIES)


def test_on_disk_expert_names_reproduce_the_in_memory_experts(family, tmp_path):
    """Per-expert tensors read lazily by the table's on-disk names, stacked into the fused layout, rebuild
    the module exactly (so its output); the table's router is what the MoE block routes with; non-expert
    on-disk keys map to in-memory names via disk_renames."""
    import copy

    model = tiny_model(family)
    arch = get_architecture(model.config.model_type)
    model.save_pretrained(tmp_path)
    e = getattr(model.config, arch.num_experts_key)
    k = getattr(model.config, arch.top_k_key)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        disk_keys = set(f.keys())
        for layer, name in find_experts(model).items():
            stock = model.get_submodule(name)
            assert stock.num_experts == e
            assert stock.intermediate_dim == getattr(model.config, arch.intermediate_size_key)
            w = {p: torch.stack([f.get_tensor(arch.expert_key(layer, i, p)) for i in range(e)]) for p in PROJECTIONS}
            rebuilt = copy.deepcopy(stock)
            with torch.no_grad():
                rebuilt.gate_up_proj.copy_(torch.cat([w["gate"], w["up"]], dim=1))
                rebuilt.down_proj.copy_(w["down"])
            x = torch.randn(16, model.config.hidden_size)
            idx = torch.stack([torch.randperm(e)[:k] for _ in range(16)])
            weights = torch.rand(16, k)
            torch.testing.assert_close(rebuilt(x, idx, weights), stock(x, idx, weights), rtol=0, atol=0)

            # The block calls the table's router, then the table's experts with the router's choice.
            block = model.get_submodule(name.rpartition(".")[0])
            seen = {}
            getattr(block, arch.router).register_forward_hook(lambda m, i, o: seen.update(router=o) and None)
            stock.register_forward_hook(lambda m, i, o: seen.update(experts=(i, o)) and None)
            with torch.no_grad():
                block(x.unsqueeze(0))
            (h, top_idx, top_w), out = seen["experts"]
            assert torch.equal(top_idx, seen["router"][-1])
            torch.testing.assert_close(stock(h, top_idx, top_w), out)
            for attr in arch.shared_experts:
                assert isinstance(getattr(block, attr), torch.nn.Module)
    memory_keys = set(model.state_dict())
    for key in disk_keys:
        if not any(arch.expert_key(layer, 0, "gate").rsplit(".experts.", 1)[0] + ".experts." in key
                   for layer in find_experts(model)):
            assert arch.disk_to_memory(key) in memory_keys, key


def test_surgery_replaces_only_the_experts(family):
    model = tiny_model(family)
    compressed = compress_model(model, {"gate": 2, "up": 2, "down": 2})
    arch = get_architecture(model.config.model_type)
    assert compressed.config.model_type == f"shared_core_{family}"
    layers = find_experts(model)
    assert find_experts(compressed) == layers
    for name in layers.values():
        assert isinstance(compressed.get_submodule(name), SharedCoreExperts)
    orig = dict(model.named_parameters())
    for key, p in compressed.named_parameters():
        if ".experts." in key and ".shared_expert" not in key:
            continue
        assert p is orig[key] or p.data_ptr() == orig[key].data_ptr(), key  # routers etc. untouched
    if family == "deepseek_v3":
        assert 0 not in layers  # first_k_dense_replace=1: the dense first layer is not touched
        b = [k for k, _ in compressed.named_buffers() if "e_score_correction_bias" in k]
        assert b and torch.equal(compressed.get_buffer(b[0]), model.get_buffer(b[0]))
    for attr in arch.shared_experts:
        assert any(f".{attr}." in k for k in orig) == (family in ("qwen2_moe", "deepseek_v3"))


def test_unsupported_model_type_lists_the_supported_ones():
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="supported MoE types: deepseek_v3, mixtral, olmoe, "
                                                    "qwen2_moe, qwen3_moe"):
        compress_model(model, {"gate": 1, "up": 1, "down": 1})


def test_model_without_moe_layers_is_an_error():
    cfg = tiny_config("qwen3_moe")
    cfg.mlp_only_layers = [0, 1]
    model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="no MoE layers"):
        find_experts(model)
