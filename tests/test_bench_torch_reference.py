"""Smoke test of experiments/bench/bench_torch_reference.py (tiny sizes; no timing assertions).

PyTorch is a benchmark-only dependency (requirements-bench.txt): the test is skipped when it is not
installed. The benchmark runs in a subprocess, so torch is never imported into the test process
(the check below only looks the package up, as ``pytest.importorskip`` would without loading it).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("inversion_b150_q100", "inversion_b50_q20", "replay_meta_iteration", "kd_task")
ENV_FIELDS = {"device", "cores", "jax", "jaxlib", "torch", "torch_num_threads", "xla_flags",
              "xla_cpu_threads"}
ROW_FIELDS = {"row", "jax_ms", "torch_ms", "speedup", "jax_ms_rounds", "torch_ms_rounds", "check"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (benchmark-only: pip install -r requirements-bench.txt)")
    out = tmp_path_factory.mktemp("bench") / "ref.json"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench", "bench_torch_reference.py"),
           "--smoke", "--rounds", "1", "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = json.loads(res.stdout)
    assert json.loads(out.read_text()) == printed  # --out holds the JSON printed on stdout
    return printed


def test_structure(result):
    assert result["bench"] == "torch_reference" and result["smoke"] is True
    assert ENV_FIELDS <= set(result["environment"]), ENV_FIELDS - set(result["environment"])
    assert result["environment"]["torch_num_threads"] == result["environment"]["cores"]
    assert len(result["load_before"]) == 3 and len(result["load_after"]) == 3
    assert result["loaded"] == (max(result["load_before"][0], result["load_after"][0])
                                > result["environment"]["cores"])
    assert [r["row"] for r in result["rows"]] == list(ROWS)
    for r in result["rows"]:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert len(r["jax_ms_rounds"]) == len(r["torch_ms_rounds"]) == result["rounds"] == 1
        assert r["jax_ms"] > 0 and r["torch_ms"] > 0
        assert r["speedup"] == pytest.approx(r["torch_ms"] / r["jax_ms"], rel=1e-2)


def test_inversion_rows_compute_the_same(result):
    for r in result["rows"][:2]:
        c = r["check"]
        assert c["generator_output_max_abs_diff"] < 1e-5
        assert c["api_logits_max_abs_diff"] < 1e-4
        assert c["pullback_generator_grad_rel_err"] < 1e-4
        assert c["pullback_z_grad_rel_err"] < 1e-4
        assert c["generator_grad_shapes_equal"]
        for key in ("z_grad_shape", "image_grad_shape", "clean_ce_shape"):
            jax_shape, torch_shape = c[key]
            assert jax_shape == torch_shape, key
        assert r["queries_per_iteration"] == r["batch"] * (r["q"] + 1)
        assert r["chunk_size"] * r["numsplit"] == r["q"]


def test_inversion_rows_time_the_generator_alternatives(result):
    """Each generator variant is the same function (to float rounding), timed in the same
    rounds; the subpixel form computes fewer FLOPs than the literal upsample-then-conv."""
    for r in result["rows"][:2]:
        alts = r["alternatives"]
        assert set(alts) == {"generator_upsample=subpixel"}
        for a in alts.values():
            assert a["check"]["generator_output_max_abs_diff_vs_default"] < 1e-5
            assert a["check"]["inversion_images_max_abs_diff_vs_default"] < 1e-3
            assert len(a["jax_ms_rounds"]) == result["rounds"] and a["jax_ms"] > 0
            assert a["speedup"] == pytest.approx(r["torch_ms"] / a["jax_ms"], rel=1e-2)
            assert a["vs_default_jax"] == pytest.approx(r["jax_ms"] / a["jax_ms"], rel=1e-2)
        assert (alts["generator_upsample=subpixel"]["bound"]["gflop"] < r["bound"]["gflop"])



def test_meta_rows_time_the_meta_alternatives(result):
    """The unrolled inner loop, and the channel-major meta-model with it, compute the same loss
    and second-order gradient as the default step, with the same FLOPs."""
    assert result["environment"]["malloc"] == "glibc default"  # --malloc default
    for r in result["rows"][2:]:
        alts = r["alternatives"]
        assert set(alts) == {"inner_unroll=full", "meta_layout=CNHW,inner_unroll=full"}
        for a in alts.values():
            assert a["check"]["loss_rel_diff_vs_default"] < 1e-5
            assert a["check"]["grad_rel_err_vs_default"] < 1e-4
            assert a["speedup"] == pytest.approx(r["torch_ms"] / a["jax_ms"], rel=1e-2)
            assert len(a["jax_ms_rounds"]) == result["rounds"]
        for name in alts:
            assert alts[name]["bound"]["gflop"] == pytest.approx(r["bound"]["gflop"], rel=1e-6)


def test_meta_rows_agree_numerically(result):
    """Same weights (JAX init ported to PyTorch) and data: outer loss and full second-order
    gradient agree to float32 accuracy."""
    for r in result["rows"][2:]:
        c = r["check"]
        assert c["grad_shapes_equal"] and c["num_param_tensors"] == 18  # Conv4: 4 x 4 + Linear 2
        assert c["loss_rel_diff"] < 1e-4, c
        assert c["grad_rel_err"] < 1e-3, c
        assert r["second_order"] is True


@pytest.mark.parametrize("row_args", [["--row", "kd_task", "--unroll", "--layout", "CNHW"],
                                      ["--row", "generator_b50", "--upsample", "subpixel"]])
def test_profile_ops_attributes_the_trace_to_hlo_ops(tmp_path, row_args):
    """experiments/bench/profile_ops.py (tiny sizes): every kind it reports is an XLA op of the
    compiled step, the matmuls among them, with times that add up."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (benchmark-only: pip install -r requirements-bench.txt)")
    out = tmp_path / "prof.json"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench", "profile_ops.py"),
           *row_args, "--smoke", "--top", "100", "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    prof = json.loads(out.read_text())
    assert prof["row"] == row_args[1]
    if row_args[1] == "kd_task":
        assert prof["layout"] == "CNHW" and prof["unroll"] is True
    else:
        assert prof["upsample"] == "subpixel"
    kinds = {k["kind"]: k for k in prof["kinds"]}
    assert any("dot" in k for k in kinds), sorted(kinds)
    assert sum(k["ms"] for k in prof["kinds"]) == pytest.approx(prof["ops_ms"], abs=0.1 * len(kinds))
    assert prof["wall_ms"] > 0 and all(k["count"] >= 1 for k in prof["kinds"])
