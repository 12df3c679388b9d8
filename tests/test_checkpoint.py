"""Run checkpoints: round-trip of arrays, keys, optimiser state and JSON metadata; clear errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfml_jax.checkpoint import CheckpointError, RunCheckpointer


def state():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    return {"params": params, "opt": optax.adam(1e-3).init(params), "key": jax.random.key(7),
            "step": jnp.int32(5), "bank": jnp.zeros((4, 2, 8, 8, 1), jnp.uint8)}


def test_roundtrip_and_keep_latest(tmp_path):
    s = state()
    with RunCheckpointer(str(tmp_path), max_to_keep=2) as ck:
        assert ck.restore_latest(s) is None
        for step in (1, 2, 3):
            ck.save(step, s, {"queries": 100 * step, "history": [1, 2]})
        ck.save(3, s, {"queries": 300, "history": [1, 2]})  # re-saving a step replaces it
        step, arrays, meta = ck.restore_latest(jax.tree.map(jnp.zeros_like, s))
    assert step == 3 and meta == {"queries": 300, "history": [1, 2]}
    np.testing.assert_array_equal(arrays["params"]["w"], s["params"]["w"])
    assert jnp.array_equal(jax.random.key_data(arrays["key"]), jax.random.key_data(s["key"]))
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [2, 3]


def test_structure_mismatch_is_a_clear_error(tmp_path):
    with RunCheckpointer(str(tmp_path)) as ck:
        ck.save(1, {"w": jnp.ones(3)})
        with pytest.raises(CheckpointError, match="different configuration"):
            ck.restore(1, {"w": jnp.ones(3), "extra": jnp.ones(2)})
        with pytest.raises(CheckpointError, match="no checkpoint for step 9"):
            ck.restore(9, {"w": jnp.ones(3)})
