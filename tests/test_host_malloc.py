"""dfml_jax.training.host_malloc: the allocator setting is applied once, can be opted out of, and
leaves results bit-identical."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from dfml_jax.training import host_malloc
applied = False
if sys.argv[1] == "reuse":
    applied = host_malloc.reuse_freed_memory()
    assert host_malloc.reuse_freed_memory() == applied  # idempotent
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0) * 2.0 + x.mean())
x = jnp.asarray(np.random.default_rng(0).standard_normal((3000, 1500)), jnp.float32)  # 18 MB
ys = [np.asarray(f(x)) for _ in range(3)]
np.save(sys.argv[2], ys[-1])
print(applied)
"""


def run(mode, out, **env):
    res = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(out)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env))
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1] == "True"


def test_reuse_freed_memory_is_bit_identical_and_opt_out(tmp_path):
    import numpy as np
    glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    assert run("reuse", tmp_path / "a.npy") == glibc
    assert run("plain", tmp_path / "b.npy") is False
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert run("reuse", tmp_path / "c.npy", DFML_JAX_KEEP_MALLOC="1") is False
