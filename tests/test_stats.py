"""Parameter and MAC accounting, checked by hand at Qwen3-30B-A3B's shape (meta device, no weights)."""

import pytest
import transformers as T
import yaml

from conftest import tiny_model
from moe_ds.checkpoint import compress_model, save_compressed, shared_core_config
from moe_ds.stats import compression_statistics, dtype_bytes, expert_bytes, expert_params, wrapper_params

QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False, dtype="bfloat16")


@pytest.mark.parametrize("r", [64, 207])
def test_qwen3_30b_a3b_by_hand(r):
    cfg = shared_core_config(T.Qwen3MoeConfig(**QWEN3_30B_A3B), {"gate": r, "up": r, "down": r})
    s = compression_statistics(cfg, tokens_per_forward=8192)
    L, E, k, d, I = 48, 128, 8, 2048, 768
    assert s["form"] == "shared_core"

    # Whole model, counted by hand: embeddings + lm_head, attention with q/k norms, 2 norms, router, experts.
    attention = d * 4096 + 2 * d * 512 + 4096 * d + 2 * 128
    per_layer_other = attention + 2 * d + E * d
    expert = 3 * d * I
    total = 2 * 151936 * d + d + L * (per_layer_other + E * expert)
    assert total == 30_532_122_624  # the published "30.5B"
    assert s["total_params"]["original"] == total
    assert s["active_params_per_token"]["original"] == total - L * (E - k) * expert == 3_353_032_704  # "A3B"

    wrapper = 3 * 2 * r * (d + I)  # per expert: U_in, V_in, U_out, V_out of the three projections
    comp_layer = 3 * d * I + E * wrapper
    assert s["expert_params"] == {"original": L * E * expert, "compressed": L * comp_layer,
                                  "ratio": comp_layer / (E * expert)}
    assert s["total_params"]["compressed"] == total - L * E * expert + L * comp_layer
    assert s["active_params_per_token"]["compressed"] == s["total_params"]["compressed"] - L * (E - k) * wrapper

    macs_orig = L * 3 * k * d * I
    macs_comp = L * (3 * d * I + k * 3 * r * (d + 3 * I) + E * d * I * 3 * r / 8192)
    assert s["expert_macs_per_token"]["original"] == macs_orig
    assert s["expert_macs_per_token"]["compressed"] == round(macs_comp)
    assert s["bytes"]["original"] == 2 * total and s["bytes"]["dtype"] == "bfloat16"
    assert s["bytes"]["experts_original"] == 2 * L * E * expert
    assert s["bytes"]["experts_compressed"] == 2 * L * comp_layer
    if r == 64:
        assert round(s["expert_params"]["ratio"], 4) == 0.2370
        assert round(s["expert_macs_per_token"]["ratio"], 3) == 0.427
    else:
        assert round(s["expert_params"]["ratio"], 4) == 0.7490


def test_statistics_file_is_written_beside_the_checkpoint(tmp_path):
    model = compress_model(tiny_model("qwen2_moe"), {"gate": 2, "up": 2, "down": 2})
    save_compressed(model, tmp_path / "c", statistics={"note": "extra entries are merged"})
    s = yaml.safe_load((tmp_path / "c" / "compression_statistics.yaml").read_text())
    n_params = sum(p.numel() for p in model.parameters())
    assert s["total_params"]["compressed"] == n_params  # matches the real module, shared expert included
    assert s["shape"] == {"moe_layers": 2, "num_experts": 6, "top_k": 2, "hidden_size": 32, "intermediate_size": 24}
    assert s["note"] == "extra entries are merged"


def test_one_expert_storage_formula():
    """Dense and shared-core expert parameters/bytes of one layer, against a real module's parameter count."""
    from moe_ds.shared_core import SharedCoreExperts

    ranks = {"gate": 3, "up": 5, "down": 0}
    module = SharedCoreExperts(6, 32, 24, ranks)
    assert expert_params(6, 32, 24, ranks) == sum(p.numel() for p in module.parameters())
    assert wrapper_params(32, 24, ranks) == 2 * 3 * (32 + 24) + 2 * 5 * (32 + 24)
    assert expert_params(6, 32, 24) == 6 * 3 * 32 * 24
    assert expert_params(6, 32, 24, 4) == expert_params(6, 32, 24, {"gate": 4, "up": 4, "down": 4})
    assert expert_params(6, 32, 24, 0) == 3 * 32 * 24  # the cores alone
    assert expert_bytes(6, 32, 24, ranks, "torch.bfloat16") == 2 * expert_params(6, 32, 24, ranks)
    assert expert_bytes(6, 32, 24) == 4 * expert_params(6, 32, 24)
    assert [dtype_bytes(t) for t in ("float32", "float16", None)] == [4, 2, 4]
