"""Tests of dfml_jax.estimators: query accounting, unbiasedness, cosine vs theory, wrappers."""
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.api import BlackBoxAPI, BlackBoxGradientError, surface_api_errors
from dfml_jax.estimators import (DIRECTION_FAMILIES, ESTIMATOR_SPECS, ESTIMATORS, ZeroDifferenceError,
                                 ZeroDifferenceWarning, num_queries, probe_differences, probe_grad,
                                 probe_vjp, sample_directions, smoothing_for_precision, zo_api,
                                 zo_api_outputs, zo_gradient, zo_objective)

NAMES = sorted(ESTIMATORS)
SHAPE = (4, 4, 2)            # d = 32 for cheap accounting tests
D = math.prod(SHAPE)
K = 5


def _weights(d=D, k=K, seed=0):
    return np.random.default_rng(seed).normal(size=(d, k)).astype(np.float32) / np.sqrt(d)


def _host_api(shape=SHAPE, **kw):
    w = _weights(math.prod(shape))
    return BlackBoxAPI.from_host(lambda x: np.tanh(x.reshape(len(x), -1)) @ w * 3.0, shape, K, **kw)


def _jax_logits(shape=SHAPE, seed=0):
    w = jnp.asarray(_weights(math.prod(shape), seed=seed))
    return lambda x: jnp.tanh(x.reshape(x.shape[0], -1)) @ w * 3.0


def _ce(logits, y):
    return -jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), y]


def _close(a, b, tol=1e-4):
    """Equal up to fp32 finite-difference rounding (differences divided by a small step)."""
    err = float(jnp.linalg.norm(jnp.ravel(a - b)) / jnp.linalg.norm(jnp.ravel(b)))
    assert err < tol, err


def _cos(a, b):
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))


# ----------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("name", NAMES)
def test_query_count_matches_ledger(name):
    api = _host_api()
    b, q, chunk = 3, 7, 3                      # 3 chunks: 2 in the scan + a remainder of 1
    x = jax.random.normal(jax.random.key(0), (b,) + SHAPE)
    y = jnp.arange(b) % K
    f = lambda p: _ce(api(p), y)               # noqa: E731
    est = jax.jit(lambda x, k: ESTIMATORS[name](f, x, k, num_directions=q, smoothing=0.05,
                                                chunk_size=chunk))
    grad, nq = est(x, jax.random.key(1))
    assert grad.shape == x.shape
    expected = 2 * b * q if ESTIMATOR_SPECS[name].scheme == "central" else b * (q + 1)
    assert int(nq) == expected == api.queries == num_queries(name, b, q)
    clean_call = ESTIMATOR_SPECS[name].scheme == "forward"
    assert api.host_calls == 3 + clean_call     # one host call per chunk (+ the clean batch)
    est(x, jax.random.key(2))                   # same compiled code, counted again
    assert api.queries == 2 * expected


def test_precomputed_values_save_clean_queries():
    api = _host_api()
    x = jnp.ones((2,) + SHAPE)
    f = lambda p: api(p)[:, 0]                  # noqa: E731
    r = jax.jit(lambda x, k, fx: zo_gradient(f, x, k, num_directions=4, smoothing=0.1, fx=fx))(
        x, jax.random.key(0), f(x))
    assert int(r.num_queries) == 2 * 4 == api.queries - 2
    assert num_queries("sphere-forward", 2, 4, include_clean=False) == 8


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("name", NAMES)
def test_unbiased_on_linear_function(name):
    """Mean of many independent estimates of a linear function -> the true gradient."""
    d, q, n, chunk = 16, 4, 4000, 2   # blockwise families: orthonormal within a chunk of 2
    a = jax.random.normal(jax.random.key(5), (d,))
    f = lambda p: p.reshape(p.shape[0], -1) @ a          # noqa: E731
    x = jnp.zeros((n, d))                                 # n samples = n independent estimates
    grad, _ = jax.jit(lambda k: ESTIMATORS[name](f, x, k, num_directions=q, smoothing=0.3,
                                                 chunk_size=chunk))(jax.random.key(6))
    mean = grad.mean(axis=0)
    fam = ESTIMATOR_SPECS[name].family
    rel_mse = {"gaussian": (d + 1) / q, "sphere": (d - 1) / q, "rademacher": (d - 1) / q}.get(
        fam, (d - chunk) / q)
    err = float(jnp.linalg.norm(mean - a) / jnp.linalg.norm(a))
    assert err < 4 * math.sqrt(rel_mse / n), (err, rel_mse)
    # and the spread matches the relative MSE (scale check: catches missing d/q factors)
    emp = float(jnp.mean(jnp.sum((grad - a) ** 2, -1)) / jnp.sum(a ** 2))
    assert emp == pytest.approx(rel_mse, rel=0.15)


@pytest.mark.parametrize("name", NAMES)
def test_cosine_to_true_gradient_matches_theory(name):
    """Smooth differentiable stand-in: E[cos^2] = q/(q+d-1) (i.i.d.) or q/d (orthogonal, coordinate)."""
    shape, q, b = (8, 8, 2), 16, 256
    d = math.prod(shape)
    logits = _jax_logits(shape, seed=3)
    y = jnp.arange(b) % K
    f = lambda p: _ce(logits(p), y)                        # noqa: E731
    x = jax.random.normal(jax.random.key(7), (b,) + shape)
    g = jax.grad(lambda p: f(p).sum())(x)
    grad, _ = jax.jit(lambda k: ESTIMATORS[name](f, x, k, num_directions=q, smoothing=1e-2))(
        jax.random.key(8))
    cos = _cos(grad, g)
    fam = ESTIMATOR_SPECS[name].family
    theory = q / d if fam in ("orthogonal", "coordinate") else q / (q + d - 1)
    assert float(jnp.mean(cos ** 2)) == pytest.approx(theory, rel=0.12)
    if name == "sphere-forward":                           # the spec's rule of thumb
        assert float(jnp.mean(cos)) == pytest.approx(math.sqrt(q / (d + q)), rel=0.1)


def test_central_beats_forward_on_quadratic_near_optimum():
    """Near a stationary point the forward curvature term swamps the gradient; central cancels it."""
    d, b, q, mu = 64, 128, 16, 0.1
    lam = jnp.linspace(1.0, 100.0, d)
    f = lambda p: 0.5 * jnp.sum(lam * p ** 2, axis=-1)    # noqa: E731  optimum at 0
    x = 1e-3 * jax.random.normal(jax.random.key(0), (b, d))
    g = lam * x
    cos = {}
    for name, qq in [("sphere-forward", 2 * q - 1), ("sphere-central", q),
                     ("gaussian-forward", 2 * q - 1), ("gaussian-central", q)]:   # equal queries
        grad, nq = jax.jit(lambda x, k: ESTIMATORS[name](f, x, k, num_directions=qq, smoothing=mu,
                                                         on_zero_differences="ignore"))(
            x, jax.random.key(1))
        assert int(nq) == 2 * q * b
        cos[name] = float(jnp.mean(_cos(grad, g)))
    for fam in ("sphere", "gaussian"):
        assert cos[f"{fam}-central"] > 0.3 > abs(cos[f"{fam}-forward"]) + 0.2, cos
    # exact for a quadratic: full coordinate central differences recover the gradient
    grad, _ = jax.jit(lambda x, k: ESTIMATORS["coordinate-central"](f, x, k, num_directions=d,
                                                                    smoothing=mu))(
        x, jax.random.key(2))
    np.testing.assert_allclose(grad, g, rtol=2e-3, atol=2e-6)


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", [n for n in NAMES if not DIRECTION_FAMILIES[
    ESTIMATOR_SPECS[n].family].blockwise])
def test_chunking_does_not_change_iid_estimates(name):
    logits = _jax_logits()
    x = jax.random.normal(jax.random.key(0), (3,) + SHAPE)
    f = lambda p: logits(p)[:, 1]                          # noqa: E731
    outs = jax.jit(lambda x, k: [ESTIMATORS[name](f, x, k, num_directions=7, smoothing=0.05,
                                                  chunk_size=c)[0] for c in (None, 3, 1)])(
        x, jax.random.key(1))
    for o in outs[1:]:
        _close(o, outs[0])


def test_no_retracing_across_calls():
    logits = _jax_logits()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, key, mu):
        return ESTIMATORS["sphere-forward"](lambda p: logits(p)[:, 0], x, key, num_directions=5,
                                            smoothing=mu, chunk_size=2)[0]

    for i in range(3):
        step(jax.random.normal(jax.random.key(i), (2,) + SHAPE), jax.random.key(10 + i),
             jnp.float32(0.01 * (i + 1)))


def test_direction_families():
    b, d = 3, 6

    @jax.jit
    def draw(key):   # 8 > d directions: two blocks for blockwise families
        out = {n: sample_directions(n, key, 0, 0, 8, b, d) for n in DIRECTION_FAMILIES}
        out["many"] = sample_directions("sphere", key, 0, 0, 4000, 1, d)[:, 0]
        return out

    us = draw(jax.random.key(0))
    for name, fam in DIRECTION_FAMILIES.items():
        u = us[name]
        assert u.shape == (8, b, d)
        np.testing.assert_allclose(jnp.mean(jnp.sum(u ** 2, -1)), 1.0, rtol=0.5)
        if fam.blockwise:   # first block of d directions: orthonormal per sample
            blk = jnp.swapaxes(u[:d], 0, 1)                     # (b, d, d)
            np.testing.assert_allclose(blk @ jnp.swapaxes(blk, 1, 2), jnp.broadcast_to(
                jnp.eye(d), (b, d, d)), atol=1e-5)
    u = us["many"]                                              # E[d u u^T] = I
    np.testing.assert_allclose(d * (u.T @ u) / 4000, jnp.eye(d), atol=0.1)


@pytest.mark.parametrize("family", sorted(DIRECTION_FAMILIES))
def test_directions_are_shard_invariant(family):
    """A device holding samples 2..3 of a batch of 4 draws exactly their rows (per-sample keys)."""
    key = jax.random.key(3)
    full = sample_directions(family, key, 1, 4, 5, 4, 7)
    tail = sample_directions(family, key, 1, 4, 5, 2, 7, sample_offset=2)
    np.testing.assert_array_equal(np.asarray(full[:, 2:]), np.asarray(tail))


# ----------------------------------------------------------------------------- API side
@pytest.mark.parametrize("name", ["sphere-forward", "orthogonal-central"])
def test_probe_grad_equals_scalar_estimator_without_new_queries(name):
    api = _host_api(output="probs")
    b, q = 4, 6
    x = jax.random.normal(jax.random.key(0), (b,) + SHAPE)
    y = jnp.arange(b) % K
    c = jax.random.normal(jax.random.key(4), (b, K))
    ce_probs = lambda p, y: -jnp.log(p[jnp.arange(p.shape[0]), y])   # noqa: E731

    @jax.jit
    def run(x, key):
        probe = zo_api_outputs(api, x, key, estimator=name, num_directions=q, smoothing=0.05,
                               chunk_size=4)
        grads = (probe_grad(probe, ce_probs, y), probe_vjp(probe, c),
                 probe_grad(probe, lambda o: jnp.sum(o * c, -1)))   # all from the same queries
        direct = zo_gradient(lambda p: ce_probs(api(p), y), x, key, estimator=name,
                             num_directions=q, smoothing=0.05, chunk_size=4)
        return probe, grads, direct

    probe, (g_ce, g_vjp, g_lin), direct = run(x, jax.random.key(3))
    clean = b if name.endswith("central") else 0            # central probes add the clean outputs
    assert probe.num_queries == num_queries(name, b, q) + clean
    assert probe.outputs_plus.shape == (b, q, K)
    # the probe's queries plus the direct estimate's, nothing for the three gradients
    assert api.queries == probe.num_queries + int(direct.num_queries)
    _close(g_ce, direct.grad)
    # linear chain rule through the probed Jacobian == loss differences for a linear loss
    _close(g_vjp, g_lin)


def test_boundary_term_masked_l1_from_one_probe():
    """BiDf-MKD: CE + masked L1 boundary term (mask recomputed at perturbed outputs), one probe."""
    api = _host_api()
    b, q = 6, 8
    x = jax.random.normal(jax.random.key(0), (b,) + SHAPE)
    y = jnp.arange(b) % K
    s = jax.random.normal(jax.random.key(1), (b, K))                  # student logits at x

    def boundary(t, s):
        mask = (jnp.argmax(t, -1) == jnp.argmax(s, -1)).astype(t.dtype)
        return -mask * jnp.sum(jnp.abs(t - s), -1)

    def f(p):                                          # the scalar objective, queried directly
        t = api(p)
        return _ce(t, y) + boundary(t, s)

    @jax.jit
    def run(x, key, y, s):
        probe = zo_api_outputs(api, x, key, num_directions=q, smoothing=0.05)
        total = probe_grad(probe, lambda t, y, s: _ce(t, y) + boundary(t, s), y, s)
        parts = probe_grad(probe, _ce, y) + probe_grad(probe, boundary, s)
        return total, parts, zo_gradient(f, x, key, num_directions=q, smoothing=0.05).grad

    total, parts, direct = run(x, jax.random.key(2), y, s)
    _close(total, direct)
    _close(total, parts)
    assert api.queries == 2 * b * (q + 1)                  # probe + the direct check only


def test_label_api_refused():
    api = _host_api(output="label")
    with pytest.raises(ValueError, match="label"):
        zo_api_outputs(api, jnp.zeros((1,) + SHAPE), jax.random.key(0), num_directions=2,
                       smoothing=0.1)


# ----------------------------------------------------------------------------- custom_vjp
@pytest.mark.parametrize("name", ["sphere-forward", "gaussian-central"])
def test_zo_objective_matches_direct_estimate_through_generator(name):
    api = _host_api()
    b, q, nz = 5, 6, 3
    y = jnp.arange(b) % K
    objective = zo_objective(api, _ce, estimator=name, num_directions=q, smoothing=0.05,
                             chunk_size=4)
    gen = lambda w, z: jnp.tanh(z @ w).reshape((-1,) + SHAPE)       # noqa: E731
    w = 0.3 * jax.random.normal(jax.random.key(0), (nz, D))
    z = jax.random.normal(jax.random.key(1), (b, nz))
    key = jax.random.key(2)
    loss = lambda w, z: jnp.mean(objective(gen(w, z), key, y))    # noqa: E731

    @jax.jit
    def run(w, z):
        val, grads = jax.value_and_grad(loss, argnums=(0, 1))(w, z)
        # direct: estimate dL/dx, pull back through the generator with the exact VJP
        x, vjp = jax.vjp(gen, w, z)
        direct = zo_gradient(lambda p: _ce(api(p), y), x, key, estimator=name,
                             num_directions=q, smoothing=0.05, chunk_size=4)
        return val, grads, vjp(direct.grad / b), direct.num_queries, jnp.mean(direct.values) if (
            direct.values is not None) else val

    val, (gw, gz), (gw_d, gz_d), nq_direct, val_d = run(w, z)
    assert api.queries - int(nq_direct) == objective.num_queries(b)
    assert objective.num_queries(b) == (b * (2 * q + 1) if name.endswith("central") else b * (q + 1))
    _close(gw, gw_d)
    _close(gz, gz_d)
    np.testing.assert_allclose(val, val_d, rtol=1e-6)


def test_zo_objective_exact_gradient_wrt_loss_args():
    logits = _jax_logits()
    objective = zo_objective(logits, lambda t, s: jnp.sum((t - s) ** 2, -1), num_directions=3,
                             smoothing=0.05)
    x = jax.random.normal(jax.random.key(0), (2,) + SHAPE)
    s = jax.random.normal(jax.random.key(1), (2, K))
    gs = jax.jit(jax.grad(lambda s: objective(x, jax.random.key(2), s).sum()))(s)
    np.testing.assert_allclose(gs, -2 * (logits(x) - s), rtol=1e-4, atol=1e-5)


def test_zo_api_vjp_matches_probe_vjp_and_vmaps():
    api = _host_api()
    b, q, v = 3, 5, 4
    outputs = zo_api(api, num_directions=q, smoothing=0.05, chunk_size=2)
    x = jax.random.normal(jax.random.key(0), (b,) + SHAPE)
    c = jax.random.normal(jax.random.key(1), (b, K))
    key = jax.random.key(2)
    g = jax.jit(jax.grad(lambda x: jnp.sum(outputs(x, key) * c)))(x)
    pv = jax.jit(lambda x: probe_vjp(zo_api_outputs(api, x, key, num_directions=q, smoothing=0.05,
                                                    chunk_size=2), c))(x)
    _close(g, pv)
    # jit(vmap(grad)) over v independent problems: one host call per chunk for all of them
    api.ledger._answered = api.ledger._calls = 0
    xs = jax.random.normal(jax.random.key(3), (v, b) + SHAPE)
    keys = jax.random.split(jax.random.key(4), v)
    gs = jax.jit(jax.vmap(jax.grad(lambda x, k: jnp.sum(outputs(x, k) ** 2))))(xs, keys)
    assert gs.shape == xs.shape
    assert api.queries == v * outputs.num_queries(b) == v * b * (q + 1)
    assert api.host_calls == 1 + 3                        # clean batch + 3 chunks (2 + 2 + 1)


def test_zo_objective_under_vmap_and_scan():
    api = _host_api()
    b, q, v = 2, 4, 3
    objective = zo_objective(api, _ce, num_directions=q, smoothing=0.05)
    y = jnp.arange(b)

    def train(x0, key):      # a few gradient steps on the inputs themselves, inside scan
        def step(x, k):
            g = jax.grad(lambda x: objective(x, k, y).mean())(x)
            return x - 0.5 * g, objective(x, k, y).mean()
        return jax.lax.scan(step, x0, jax.random.split(key, 3))

    xs = jax.random.normal(jax.random.key(0), (v, b) + SHAPE)
    xT, losses = jax.jit(jax.vmap(train))(xs, jax.random.split(jax.random.key(1), v))
    assert losses.shape == (v, 3) and bool(jnp.all(jnp.isfinite(losses)))
    assert api.queries == v * 3 * (b * (q + 1) + b)        # grad step + the logged value


def test_differentiating_api_directly_still_refused():
    api = _host_api()
    with pytest.raises(BlackBoxGradientError):
        jax.grad(lambda x: api(x).sum())(jnp.zeros((1,) + SHAPE))


# ----------------------------------------------------------------------------- precision
def test_zero_differences_detected_on_rounded_probabilities():
    api = _host_api(output="probs", decimals=4)
    b, q = 4, 8
    x = jax.random.normal(jax.random.key(0), (b,) + SHAPE)
    y = jnp.arange(b) % K
    f = lambda p: -jnp.log(api(p)[jnp.arange(b), y] + 1e-6)       # noqa: E731
    with pytest.warns(ZeroDifferenceWarning, match="smoothing"):
        r = jax.jit(lambda x, k: zo_gradient(f, x, k, num_directions=q, smoothing=1e-6))(
            x, jax.random.key(1))
        jax.block_until_ready(r)
    assert float(r.zero_difference_fraction) == 1.0 and float(jnp.abs(r.grad).max()) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroDifferenceWarning)     # a large step: no warning
        r = jax.jit(lambda x, k: zo_gradient(f, x, k, num_directions=q,
                                             smoothing=smoothing_for_precision(1e-4, D)))(
            x, jax.random.key(1))
        jax.block_until_ready(r)
        assert float(r.zero_difference_fraction) < 0.5
    with pytest.raises(ZeroDifferenceError), surface_api_errors():
        probe = jax.jit(lambda x, k: zo_api_outputs(api, x, k, num_directions=q, smoothing=1e-6,
                                                    on_zero_differences="raise"))(
            x, jax.random.key(1))
        jax.block_until_ready(probe)
    probe = jax.jit(lambda x, k: zo_api_outputs(api, x, k, num_directions=q, smoothing=1e-6,
                                                on_zero_differences="ignore"))(x, jax.random.key(1))
    assert float(probe.zero_difference_fraction) == 1.0
    assert float(jnp.mean(jax.jit(lambda p: probe_differences(p, lambda o: o[:, 0]))(probe) == 0)) == 1.0


def test_invalid_arguments():
    f = lambda p: p.sum(axis=(1, 2, 3))                             # noqa: E731
    x = jnp.zeros((2,) + SHAPE)
    with pytest.raises(ValueError, match="unknown estimator"):
        zo_gradient(f, x, jax.random.key(0), estimator="nope", num_directions=2, smoothing=0.1)
    with pytest.raises(ValueError, match="num_directions"):
        zo_gradient(f, x, jax.random.key(0), num_directions=0, smoothing=0.1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        zo_gradient(lambda p: p, x, jax.random.key(0), num_directions=2, smoothing=0.1)


# ----------------------------------------------------------------------------- low-resolution
def test_lowres_directions_estimate_the_projected_gradient():
    """AutoZOOM subspace: same queries, unbiased for P grad (linear f), cosine ~ sqrt(q / d')."""
    from dfml_jax.estimators import upsample, zo_gradient_lowres

    b, h, r, q = 4, 8, 2, 3
    g = jax.random.normal(jax.random.key(0), (b, h, h, 2))
    f = lambda p: jnp.sum(p * g, axis=(1, 2, 3))
    x = jnp.zeros((b, h, h, 2))
    pg = upsample(g.reshape(b, r, h // r, r, h // r, 2).mean(axis=(2, 4)), (h, h))  # P g
    est = jax.jit(lambda k: zo_gradient_lowres(f, x, k, resolution=r, num_directions=q,
                                                smoothing=0.01, chunk_size=2).grad)
    one = zo_gradient_lowres(f, x, jax.random.key(1), resolution=r, num_directions=q, smoothing=0.01,
                             chunk_size=2)
    assert one.grad.shape == x.shape and one.differences.shape == (b, q)
    assert one.num_queries == b * (q + 1)              # the full-resolution estimate's cost
    # piecewise constant on 4x4 blocks: the estimate lies in the upsampled subspace
    np.testing.assert_allclose(one.grad, upsample(one.grad[:, ::4, ::4], (h, h)), atol=1e-6)
    # q = d' distinct coordinates (central): the back-map gives exactly P g (scaling d'/q, 1/s^2)
    exact = zo_gradient_lowres(f, x, jax.random.key(3), resolution=r, estimator="coordinate-central",
                               num_directions=r * r * 2, smoothing=0.01)
    np.testing.assert_allclose(exact.grad, pg, rtol=1e-3, atol=1e-3)
    # sphere directions: E[g_hat] = P g (d' = 8, q = 3: relative error of a 300-mean ~ 0.09)
    mean = jnp.mean(jax.vmap(est)(jax.random.split(jax.random.key(2), 300)), axis=0)
    assert float(jnp.linalg.norm(mean - pg) / jnp.linalg.norm(pg)) < 0.25
    # E[u u^T] scaling: the perturbation of a unit low-res direction has length mu in image units
    v = jnp.zeros((1, r, r, 2)).at[0, 0, 0, 0].set(1.0)
    assert float(jnp.linalg.norm(upsample(v, (h, h)) / (h / r))) == pytest.approx(1.0)
    # nearest needs a divisor; bilinear does not; bad values are named
    with pytest.raises(ValueError, match="multiple of the direction resolution"):
        zo_gradient_lowres(f, x, jax.random.key(0), resolution=3, num_directions=q, smoothing=0.01)
    assert zo_gradient_lowres(f, x, jax.random.key(0), resolution=3, method="bilinear",
                              num_directions=q, smoothing=0.01).grad.shape == x.shape
    with pytest.raises(ValueError, match="direction resolution"):
        zo_gradient_lowres(f, x, jax.random.key(0), resolution=0, num_directions=q, smoothing=0.01)
