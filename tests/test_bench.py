"""The GPU step profile's code path, on the CPU with a tiny model (the timings themselves are not tested)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_step_smoke_prints_the_table3_layout():
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "bench/gpu_step.py", "--smoke", "--steps", "1", "--warmup", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    for phase in ("generation", "old_logps", "reference", "nthr", "update", "step"):
        assert any(line.startswith(phase) for line in lines), f"no {phase} row in:\n{out.stdout}"
    assert "ratio nthr/grpo" in out.stdout
    nthr_step = next(line for line in lines if line.startswith("nthr") and "step 0" in line)
    assert "selected" in nthr_step and "nan" not in nthr_step.split("selected")[1]  # NTHR really scored tokens
