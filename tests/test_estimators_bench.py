"""Smoke test of experiments/bench/bench_estimators.py (--quick, tiny grid; no timing assertions)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"estimator", "d", "q", "batch", "cosine_mean", "cosine_std", "rel_error",
          "ms_per_estimate", "queries_per_s", "compile_s", "peak_mem_mb", "overhead_vs_api_forward"}


def test_bench_estimators_quick(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench", "bench_estimators.py"),
           "--quick", "--qs", "1", "4", "--ds", "64", "--estimators", "sphere-forward",
           "gaussian-central", "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in rows if "estimator" in r]
    assert len(rows) == 2 * 2 + 2                        # grid 1 d x 2 q x 2 estimators + protocol
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert -1.0 <= r["cosine_mean"] <= 1.0 and r["overhead_vs_api_forward"] > 0
    assert (out / "bench_estimators.md").read_text().count("\n| ") >= len(rows)
    assert (out / "cosine_vs_q.png").stat().st_size > 1000
