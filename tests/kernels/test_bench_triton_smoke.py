"""``benchmarks/bench_triton.py --smoke``: the GPU benchmark's plumbing (cases, kernels,
dense baselines, tables, files) runs end to end on CPU under Triton's interpreter, so the
script a GPU owner runs is not first executed on their machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_triton_benchmark_smoke_writes_its_tables(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "bench_triton.py", "--smoke", "--out", str(tmp_path)], cwd=BENCHMARKS,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (report,) = tmp_path.glob("triton-smoke-*.md")
    text = report.read_text()
    for kernel in ("forward", "dX", "dW"):
        assert f"| Conv 32->32 k3 s1 d1 @8x8 | fp32 | 16 | {kernel} |" in text
    assert "Layout of a 512x4608 weight at 90%" in text
    (table,) = tmp_path.glob("triton-smoke-*.csv")
    assert len(table.read_text().strip().splitlines()) == 1 + 2 * 2 * 3  # header + 2 layers x 2 sparsities x 3
