"""`python -m benchmarks.gpu --dry-run`: the GPU check's wiring, run on the CPU as a user would.

Every measurement runs in its own process on a one-layer Qwen2.5-VL-3B-shaped model; the figures are the CPU's
and mean nothing for a GPU, so only their presence and sanity are checked. The GPU run itself needs a GPU machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_the_gpu_check_runs_its_whole_wiring_on_the_cpu_in_dry_run_mode():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["device"], result["dry_run"], result["architecture"]) == ("cpu", True, "qwen2.5-vl-3b")
    for name in ("trainer_step_s", "trainer_tokens_per_s_per_gpu", "trl_step_s", "trl_tokens_per_s_per_gpu",
                 "step_time_ratio_vs_trl", "reload_s", "peak_memory_mb_full", "peak_memory_mb_lora"):
        assert math.isfinite(result[name]) and result[name] > 0, name
    assert result["peak_memory_mb_lora"] < result["peak_memory_mb_full"], "the adapter saves the optimiser's memory"
    assert result["vllm_rollout_tokens_per_s"] is None and result["vllm_skipped"] == "dry run (CPU)"
    assert "GPU check" in done.stderr
