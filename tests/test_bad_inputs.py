"""Every user error a stage can meet ends in exactly one line, ``STAGE: error: MESSAGE``, and exit code 2, and
writes nothing. Each case runs the launcher's own ``main`` through ``moe_ds.cli.run``, as ``python launch/X.py``
does (tests/test_launchers.py checks the same through real processes)."""

import json
import os
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from conftest import load_launcher, tiny_model
from moe_ds.cli import run


launcher = load_launcher


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny MoE, a dense (non-MoE) model, a truncated and a corrupted copy of the MoE, an empty folder, a file."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tiny_model("qwen3_moe").save_pretrained(root / "moe")
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(root / "dense")
    weights = (root / "moe" / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("corrupted", b"\xff" * 8 + weights[8:])):
        (root / name).mkdir()
        (root / name / "config.json").write_bytes((root / "moe" / "config.json").read_bytes())
        (root / name / "model.safetensors").write_bytes(data)
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_bytes((root / "moe" / "config.json").read_bytes())
    (root / "bad_config").mkdir()
    (root / "bad_config" / "config.json").write_text("{not json")
    (root / "fp8").mkdir()  # a DeepSeek-V3-style block-wise FP8 checkpoint, in miniature
    config = json.loads((root / "moe" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (root / "fp8" / "config.json").write_text(json.dumps(config))
    tensors = load_file(root / "moe" / "model.safetensors")
    tensors["model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, root / "fp8" / "model.safetensors")
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a folder")
    return root


# (arguments after --model, the one-line message after "compress: error: "); {m} is the models folder
COMPRESS = {
    "missing model folder": (["{m}/nope", "--rank", "2"],
                             "model '{m}/nope' is not a directory (and not a Hub id of the form org/name)"),
    "empty model folder": (["{m}/empty", "--rank", "2"], "{m}/empty has no config.json: not a model directory"),
    "unparsable config": (["{m}/bad_config", "--rank", "2"], "{m}/bad_config/config.json is not valid JSON (Expecting "
                          "property name enclosed in double quotes: line 1 column 2 (char 1))"),
    "non-MoE model": (["{m}/dense", "--rank", "2"], "model type 'llama' is not supported by moe-ds; supported MoE "
                      "types: deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe"),
    "no weights": (["{m}/no_weights", "--rank", "2"], "{m}/no_weights holds no model.safetensors or "
                   "model.safetensors.index.json"),
    "truncated safetensors": (["{m}/truncated", "--rank", "2"], "{m}/truncated/model.safetensors is not a readable "
                              "safetensors file (Error while deserializing header: incomplete metadata, file not "
                              "fully covered); it may be truncated or corrupted: re-download or re-save it"),
    "corrupted safetensors": (["{m}/corrupted", "--rank", "2"], "{m}/corrupted/model.safetensors is not a readable "
                              "safetensors file (Error while deserializing header: header too large); it may be "
                              "truncated or corrupted: re-download or re-save it"),
    "FP8 checkpoint": (["{m}/fp8", "--rank", "2"], "{m}/fp8 stores quantized weights (quant_method='fp8', 1 "
                       "*weight_scale_inv tensors); the fit needs the experts in bf16/fp16/fp32: dequantize the "
                       "checkpoint first"),
    "negative rank": (["{m}/moe", "--rank", "-1"], "rank must be >= 0, got -1"),
    "rank and ratio": (["{m}/moe", "--rank", "2", "--target-ratio", "0.3"],
                       "give exactly one of rank and target_ratio (got rank=2, target_ratio=0.3)"),
    "ratio above 1": (["{m}/moe", "--target-ratio", "2"], "target_ratio must be in (0, 1], got 2.0"),
    "ratio below the cores": (["{m}/moe", "--target-ratio", "0.01"],
                              "target ratio 0.01 is below the cores' own share 0.1667"),
    "rank beyond the shape": (["{m}/moe", "--rank", "25"],
                              "rank 25 is too large for the layer shape (d=32, I=24): at most 24"),
    "rank larger than the original": (["{m}/moe", "--rank", "20"],
                                      "rank 20 stores 3.08x the original expert parameters (E=6, d=32, I=24); pick a "
                                      "smaller --rank or a --target-ratio, or pass --allow-larger"),
    "output is a file": (["{m}/moe", "--rank", "2", "--output", "{m}/a_file"], "output {m}/a_file is a file, not a "
                         "folder"),
    "output below a file": (["{m}/moe", "--rank", "2", "--output", "{m}/a_file/out"],
                            "cannot create output folder {m}/a_file/out: {m}/a_file is a file"),
}


@pytest.mark.parametrize("case", sorted(COMPRESS))
def test_compress(case, models, tmp_path, capsys):
    args, message = COMPRESS[case]
    args = [a.format(m=models) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    code = run("compress", lambda: launcher("compress").main(["--model", *args, "--steps", "2"]),
               errors=launcher("compress").ERRORS)
    err = capsys.readouterr().err
    assert (code, err.splitlines()) == (2, [f"compress: error: {message.format(m=models)}"])
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_compress_read_only_output(models, tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        code = run("compress", lambda: launcher("compress").main(
            ["--model", str(models / "moe"), "--rank", "2", "--output", str(tmp_path / "out")]),
            errors=launcher("compress").ERRORS)
    finally:
        tmp_path.chmod(0o700)
    assert code == 2
    assert capsys.readouterr().err.startswith(f"compress: error: cannot write output folder {tmp_path / 'out'}: "
                                              "Permission denied")
