"""benchmarks/env_throughput.py: a smoke run writes the figures later runs are compared by."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_records_the_comparable_figures(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "benchmarks/env_throughput.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "env_throughput.json").read_text())
    assert result["machine"] and result["command"] and result["date"]
    assert result["env_steps_per_s_gymnasium_api"] > 0 and result["ratio_step_to_fastest_forward"] > 0
    for mode in result["modes"].values():
        resets = mode["raw"]["cold_resets"]
        # the process's first reset (one-time work: compilation, memory pools) is kept apart from the cold median
        assert mode["env_reset_first_ms"] == pytest.approx(resets[0] * 1e3)
        assert mode["env_reset_cold_ms"] == pytest.approx(float(np.median(resets[1:] or resets)) * 1e3)
        # how warm the "warm" resets were: the share of their rows the reference cache held
        assert 0 <= mode["env_reset_warm_cache_hit_fraction"] <= 1


@pytest.mark.parametrize(("train", "num_envs", "limit", "batches"), [
    (5, 4, None, [[0, 1, 2, 3], [4, 0, 1, 2]]),
    (3, 8, None, [[0, 1, 2, 0, 1, 2, 0, 1]]),  # fewer train sequences than envs
    (10, 4, 6, [[0, 1, 2, 3], [4, 5, 0, 1]]),
])
def test_prefill_resets_over_the_train_split_in_whole_batches(train, num_envs, limit, batches):
    """Every train sequence (up to the limit) is reset once, in whole batches of num_envs: the last batch is topped
    up from the start of the split, also when the split is smaller than one batch."""
    from types import SimpleNamespace

    import benchmarks.env_throughput as env_throughput  # the repository root is on sys.path under `python -m pytest`

    resets = []
    venv = SimpleNamespace(corpus=SimpleNamespace(train=range(train)), num_envs=num_envs,
                           batch=SimpleNamespace(reset=lambda indices: resets.append(indices.tolist())))
    assert len(env_throughput.prefill(venv, limit)) == len(batches)
    assert resets == batches
