"""Scale-out on 8 emulated CPU devices: sharded inversion, meta-batch and loop equal 1 device,
query counts are identical, each device's callback answers only its shard, checkpoints move
between device counts, bad device counts are clear errors."""
import dataclasses
import threading
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfml_jax.api import APIGroup, BlackBoxAPI
from dfml_jax.bidf_mkd import InversionConfig, KDTask, ReplayTasks, inversion_queries, make_inverter
from dfml_jax.bidf_mkd.metastep import make_meta_steps
from dfml_jax.bidf_mkd.train import LoopState, train_bidf_mkd
from dfml_jax.checkpoint import RunCheckpointer
from dfml_jax.models import create_model, functional
from dfml_jax.parallel import (check_divisible, make_mesh, replicate, replicated_sharding,
                               shard_batch)

from test_bidf_train import CFG, K as TK, make_pool, parts, tasks

SIZE, K = 8, 4
GEN = functional(create_model("dcgan", nz=8, ngf=4, img_size=SIZE, nc=1, rngs_or_key=0))
# B = 4 classes x 4 per class = 16 samples: 2 per device on 8 devices
INV = InversionConfig(iterations=2, per_class=4, lr=0.05, num_directions=4, smoothing=0.01,
                      chunk_size=2, pad=1)


class HostTeachers:
    """Linear host teachers that log (teacher, batch size) of every host call (thread-safe)."""

    def __init__(self, n=1):
        self.calls, self.lock = [], threading.Lock()
        self.w = [np.asarray(jax.random.normal(jax.random.key(i), (SIZE * SIZE, K))) for i in range(n)]
        self.apis = [BlackBoxAPI.from_host(self._fn(i), (SIZE, SIZE, 1), K, name=f"t{i}")
                     for i in range(n)]

    def _fn(self, i):
        def answer(x):
            with self.lock:
                self.calls.append((i, len(x)))
            return x.reshape(len(x), -1) @ self.w[i]
        return answer


def invert(mesh, teachers=None, cfg=INV, shard="samples"):
    t = teachers or HostTeachers()
    inv = make_inverter(APIGroup(t.apis), GEN.apply_batchstats, nz=8, cfg=cfg, mean=(0.5,),
                        std=(0.5,), image_size=SIZE, mesh=mesh, shard=shard)
    res = jax.block_until_ready(inv(jax.random.key(1), 0, GEN.init(jax.random.key(2))[0], None))
    return t, res


def test_sharded_inversion_equals_one_device_and_callbacks_get_shards():
    t1, r1 = invert(None)
    t8, r8 = invert(make_mesh(8))
    b = K * INV.per_class
    assert t1.apis[0].queries == t8.apis[0].queries == inversion_queries(INV, K)
    # one device: per iteration 1 clean call (B) + 2 chunk calls (2 directions x B)
    assert Counter(n for _, n in t1.calls) == {b: 2, 2 * b: 4}
    # 8 devices: the same calls, once per device, each on its B/8 samples only
    assert Counter(n for _, n in t8.calls) == {b // 8: 2 * 8, 2 * b // 8: 4 * 8}
    assert r8.images.sharding.spec[0] == "data"  # the recovered batch stays sharded
    for a, c in zip(r1, r8):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-4)


def test_direction_sharded_inversion_equals_one_device():
    """q = 8 directions over 4 devices: each device's callback answers B x 2 perturbed samples
    (its own directions), the clean batch is queried once per iteration, results match 1 device."""
    cfg = InversionConfig(iterations=2, per_class=4, lr=0.05, num_directions=8, smoothing=0.01,
                          chunk_size=2, pad=1)
    b = K * cfg.per_class
    t1, r1 = invert(None, cfg=cfg)
    t4, r4 = invert(make_mesh(4), cfg=cfg, shard="directions")
    assert t1.apis[0].queries == t4.apis[0].queries == inversion_queries(cfg, K)
    assert Counter(n for _, n in t1.calls) == {b: 2, 2 * b: 8}
    assert Counter(n for _, n in t4.calls) == {b: 2, 2 * b: 8}   # 1 chunk call per device
    for a, c in zip(r1, r4):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"zero-order directions q of 8 .* 3 devices"):
        invert(make_mesh(3), cfg=cfg, shard="directions")
    ortho = InversionConfig(iterations=1, per_class=4, num_directions=8, estimator=
                            "orthogonal-forward", chunk_size=None, pad=1)
    with pytest.raises(ValueError, match="chunk_size that divides num_directions"):
        invert(make_mesh(4), cfg=ortho, shard="directions")


def test_sharded_low_resolution_inversion_equals_one_device():
    cfg = InversionConfig(**{**INV.__dict__, "direction_resolution": 4})
    t1, r1 = invert(None, cfg=cfg)
    t8, r8 = invert(make_mesh(8), cfg=cfg)
    t2, r2 = invert(make_mesh(2), cfg=cfg, shard="directions")
    assert (t1.apis[0].queries == t8.apis[0].queries == t2.apis[0].queries
            == inversion_queries(INV, K))
    for a, c, e in zip(r1, r8, r2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-4)


def test_several_apis_inverted_at_once_charge_each_member():
    t = HostTeachers(3)
    g = APIGroup(t.apis)
    inv = make_inverter(g, GEN.apply_batchstats, nz=8, cfg=INV, mean=(0.5,), std=(0.5,),
                        image_size=SIZE, mesh=make_mesh(4))
    many = jax.jit(jax.vmap(inv, in_axes=(0, 0, 0, None)))
    keys = jax.random.split(jax.random.key(1), 2)
    gens = jax.vmap(lambda k: GEN.init(k)[0])(keys)
    both = jax.block_until_ready(many(keys, jnp.array([2, 0]), gens, None))
    per_call = inversion_queries(INV, K)
    assert [a.queries for a in t.apis] == [per_call, 0, per_call]
    # each host call of a device shard answered both members, each on its own samples
    assert Counter(i for i, _ in t.calls) == {0: 4 * 3 * INV.iterations, 2: 4 * 3 * INV.iterations}
    assert len(set(n for _, n in t.calls)) == 2      # B/4 (clean) and 2 B/4 (chunks of 2)
    # the inversions are independent: swapping the pairs swaps the results
    swapped = jax.block_until_ready(many(keys[::-1], jnp.array([0, 2]),
                                         jax.tree.map(lambda a: a[::-1], gens), None))
    np.testing.assert_allclose(np.asarray(both.images[0]), np.asarray(swapped.images[1]), atol=1e-6)
    assert [a.queries for a in t.apis] == [2 * per_call, 0, 2 * per_call]


def _meta_batch():
    x = jax.random.uniform(jax.random.key(0), (8, 4 * K, SIZE, SIZE, 1))
    y = jnp.tile(jnp.repeat(jnp.arange(K), 4)[None], (8, 1))
    replay = ReplayTasks(x[:, :K], y[:, :K], x[:, K:], y[:, K:])
    kx = jax.random.uniform(jax.random.key(3), (2, 2, 12, SIZE, SIZE, 1))
    kp = jax.nn.softmax(jax.random.normal(jax.random.key(4), (2, 2, 12, K)))
    kd = KDTask(kx[:, 0], kp[:, 0], kx[:, 1], kp[:, 1], jnp.tile(jnp.arange(12) % K, (2, 1)))
    return replay, kd


def test_sharded_meta_batch_equals_one_device():
    meta = functional(create_model("mlp", num_classes=K, input_shape=(SIZE, SIZE, 1),
                                   rngs_or_key=0, hidden=(16,)))
    replay, kd = _meta_batch()
    out = {}
    for name, mesh in (("one", None), ("eight", make_mesh(8))):
        # plain SGD: parameter differences are gradient differences (Adam would amplify
        # float-order noise on near-zero gradients into +-lr steps)
        st = make_meta_steps(meta.apply_batchstats, optax.sgd(0.1), replay_steps=2, kd_steps=2,
                             inner_lr=0.1, mesh=mesh)
        p, o = meta.params, optax.sgd(0.1).init(meta.params)
        p, o, l1, _ = st.replay(p, o, replay)                       # 8 tasks: 1 per device
        p, o, l2, acc = st.kd_replay(p, o, kd, jax.tree.map(lambda a: a[:3], replay))  # 2 KD + 3
        out[name] = (jax.block_until_ready(p), float(l1), float(l2), acc.shape)
    (p1, *r1), (p8, *r8) = out["one"], out["eight"]
    assert r1[2] == r8[2] == (5,)
    np.testing.assert_allclose(r1[:2], r8[:2], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_loop_on_8_devices_visits_two_apis_and_resumes_on_1(tmp_path):
    # B = 5 classes x 8 = 40 samples: 5 per device; two APIs inverted at once per visit
    cfg = CFG.__class__(**{**CFG.__dict__, "inversion": dataclasses.replace(CFG.inversion,
                                                                             per_class=8),
                           "meta_iterations": 4,
                           "meta_batch": 3, "apis_per_visit": 2, "boundary_start": 0,
                           "eval_every": 4, "checkpoint_every": 2})
    d = str(tmp_path / "run")
    pool = make_pool()
    part = train_bidf_mkd(cfg, pool=pool, val_tasks=tasks(jax.random.key(0)),
                          progress=False, checkpoint_dir=d, stop_after=2, mesh=make_mesh(8),
                          **parts())
    per_api = 2 * (inversion_queries(cfg.inversion_config(), TK) + TK * cfg.inversion.per_class)
    visits = [h for h in part.history if h["event"] == "visit"]
    assert sorted(visits[0]["api"]) == [0, 1] and visits[0]["boundary"]
    assert [a.queries for a in pool.apis] == [per_api * len(visits)] * 2
    assert part.visits == 2 * len(visits)
    assert jax.tree.leaves(part.final_params)[0].sharding.num_devices == 8
    like = jax.tree.map(jnp.zeros_like, parts()["meta_init_params"])
    with RunCheckpointer(d) as ck:   # the 8-device checkpoint, read back on one device
        step, arrays, meta = ck.restore_latest(
            LoopState(like, optax.adam(cfg.outer_lr).init(like), *_loop_state_tail(cfg)))
    assert step == 2 and meta["iteration"] == 2
    for a, b in zip(jax.tree.leaves(part.final_params), jax.tree.leaves(arrays[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pool = make_pool()
    resumed = train_bidf_mkd(cfg, pool=pool, val_tasks=tasks(jax.random.key(0)), progress=False,
                             checkpoint_dir=d, **parts())
    assert resumed.api_queries == per_api * resumed.visits   # ledgers restored, none re-bought
    assert resumed.history[:len(part.history)] == part.history
    # iteration 0 (the initial parameters, scored before the kill) and 4; not re-scored on resume
    assert [h["iteration"] for h in resumed.history if h["event"] == "eval"] == [0, 4]
    assert jax.tree.leaves(resumed.final_params)[0].sharding.num_devices == 1


def _loop_state_tail(cfg):
    """Abstract memory, key and best-params of the loop state (as train_bidf_mkd builds them)."""
    from dfml_jax.memory import init_memory

    pool = make_pool()
    rows = len(np.unique(np.concatenate([np.asarray(c) for c in pool.classes])))
    mem = init_memory(rows, cfg.memory_slots, cfg.inversion.per_class, (8, 8, 1))
    return mem, jax.random.key(0), jax.tree.map(jnp.zeros_like, parts()["meta_init_params"])


def test_checkpoint_written_on_8_devices_restores_on_1(tmp_path):
    mesh = make_mesh(8)
    state = {"w": shard_batch(jnp.arange(16.0).reshape(8, 2), mesh),
             "b": replicate(jnp.ones(3), mesh), "key": replicate(jax.random.key(3), mesh)}
    with RunCheckpointer(str(tmp_path)) as ck:
        ck.save(1, state, {"n": 1})
    like = {"w": jnp.zeros((8, 2)), "b": jnp.zeros(3), "key": jax.random.key(0)}
    with RunCheckpointer(str(tmp_path)) as ck:
        _, arrays, _ = ck.restore_latest(like)                            # host/1-device arrays
        _, on2, _ = ck.restore_latest(like, sharding=replicated_sharding(make_mesh(2)))
    np.testing.assert_array_equal(arrays["w"], np.arange(16.0).reshape(8, 2))
    assert len(arrays["w"].sharding.device_set) == 1
    assert len(on2["b"].sharding.device_set) == 2
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(arrays["key"])),
                                  np.asarray(jax.random.key_data(state["key"])))


def test_bad_device_counts_are_clear_errors():
    with pytest.raises(ValueError, match=r"asked for 9 devices but only 8 exist: 8 cpu"):
        make_mesh(9)
    with pytest.raises(ValueError, match=r"must be >= 1"):
        make_mesh(0)
    with pytest.raises(ValueError, match=r"batch of 6 .* over 4 devices .*Valid device counts "
                                         r"for 6: \[1, 2, 3, 6\]"):
        check_divisible(6, make_mesh(4))
    cfg = InversionConfig(iterations=1, per_class=3, num_directions=2, pad=1)   # B = 12
    with pytest.raises(ValueError, match=r"inversion batch B = classes x per_class = 4 x 3 of "
                                         r"12 .* 8 devices .*\[1, 2, 3, 4, 6\]"
                                         r".*inversion\.per_class"):
        make_inverter(HostTeachers().apis[0], GEN.apply_batchstats, nz=8, cfg=cfg, mean=(0.5,),
                      std=(0.5,), image_size=SIZE, mesh=make_mesh(8))


def test_script_device_choice():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    from bidf_mkd import choose_mesh
    from configs.bidf_mkd_configs import get_config

    cfg = get_config("smoke")                        # B = 5 ways x 4 per class = 20
    assert choose_mesh(None, cfg).shape["data"] == 5  # all 8 devices reduced to divide 20
    assert choose_mesh(1, cfg) is None                # one device: the unchanged computation
    assert choose_mesh(2, cfg).shape["data"] == 2
    with pytest.raises(ValueError, match=r"5 x 4 of 20 .* 8 devices .*\[1, 2, 4, 5\].*--devices"):
        choose_mesh(8, cfg)
    with pytest.raises(ValueError, match="asked for 16 devices but only 8 exist"):
        choose_mesh(16, cfg)
    by_dirs = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, inv_shard="directions"))
    assert choose_mesh(None, by_dirs).shape["data"] == 4
    with pytest.raises(ValueError, match=r"num_directions = 4 of 4 .* 8 devices|num_directions = 4"):
        choose_mesh(8, by_dirs)
