"""Every benchmark script runs and prints its side-by-side table (tiny sizes: behaviour, not speed)."""

import subprocess
import sys

import pytest

from conftest import REPO

# script -> (tiny arguments, substrings every one of which the printed table must contain)
BENCHES = {
    "experts_forward.py": (["--experts", "8", "--hidden", "64", "--intermediate", "32", "--tokens", "64",
                            "--ranks", "4", "16", "--repeats", "1", "--dtypes", "float32"],
                           ["| 64 | float32 | fwd | stock (grouped_mm)", "| 64 | float32 | fwd+bwd | shared-core | 16 |"]),
    "fit.py": (["--experts", "4", "--d-out", "32", "--d-in", "48", "--rank", "4", "--steps", "20"],
               ["| 0 |", "| 20 |", "rank-2r SVD bound"]),
    "teacher_cache.py": (["--sequences", "8", "--seq-len", "16", "--top-k", "8", "--vocab", "1000"],
                         ["dense fp16", "none", "lzf", "gzip"]),
    "kd_loss.py": (["--vocab", "512", "--positions", "64", "--k", "8", "--chunk", "16", "--repeats", "1"],
                   ["top-k KD, tail category (ours)", "top-k KD, renormalised (ours)", "dense full-vocabulary KL"]),
}


@pytest.mark.parametrize("script", sorted(BENCHES))
def test_benchmark_prints_its_table(script):
    args, expected = BENCHES[script]
    out = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for text in expected:
        assert text in out.stdout, (text, out.stdout)
