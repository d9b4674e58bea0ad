"""moe-ds: shared-core compression of Mixture-of-Experts language models, recovered by distillation."""

import logging

# bitsandbytes >= 0.49, imported by transformers and DeepSpeed whenever it is installed, warns on every import
# on CPUs with AVX512-BF16 that it cannot fetch an optional 4-bit CPU kernel from the Hub ("Failed to load CPU
# gemm_4bit_forward from kernels-community"). moe-ds never runs 4-bit matmuls on a CPU, and on such a machine
# the line lands before every launcher's one-line error; keep that one logger to errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
