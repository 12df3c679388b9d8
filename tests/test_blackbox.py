"""The black-box API boundary: agreement of paths, exact counting, budgets, refusals, bad input."""
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.api import (BlackBoxAPI, BlackBoxError, BlackBoxGradientError, QueryBudgetExceeded,
                          surface_api_errors)

SHAPE = (4, 4, 3)
K = 5
W = np.random.RandomState(0).randn(int(np.prod(SHAPE)), K).astype(np.float32)


def host_logits(x):
    return x.reshape(len(x), -1) @ W


def jax_logits(x):
    return x.reshape(x.shape[0], -1) @ jnp.asarray(W)


def make(kind, **kw):
    if kind == "host":
        return BlackBoxAPI.from_host(host_logits, SHAPE, K, name="teacher", **kw)
    return BlackBoxAPI.from_jax(jax_logits, SHAPE, K, name="teacher", **kw)


def batch(*lead, seed=0):
    return jnp.asarray(np.random.RandomState(seed).rand(*lead, *SHAPE), jnp.float32)


@pytest.mark.parametrize("output,k", [("logits", None), ("probs", None), ("label", None), ("topk", 2)])
def test_host_and_jax_paths_agree(output, k):
    x = batch(7)
    a = make("host", output=output, k=k)(x)
    b = make("jax", output=output, k=k)(x)
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_output_modes_semantics():
    x = batch(6)
    logits = host_logits(np.asarray(x))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(make("host", output="probs")(x), p, rtol=1e-5)
    np.testing.assert_array_equal(make("host", output="label")(x), logits.argmax(1))
    top2 = np.asarray(make("host", output="topk", k=2)(x))
    assert ((top2 > 0).sum(1) == 2).all()
    np.testing.assert_allclose(top2.max(1), p.max(1), rtol=1e-5)
    rounded = np.asarray(make("host", output="probs", decimals=2)(x))
    np.testing.assert_allclose(rounded, np.round(p, 2), atol=1e-7)


@pytest.mark.parametrize("kind", ["host", "jax"])
def test_counting_exact_under_jit_vmap_scan_and_repeats(kind):
    api = make(kind)
    x = batch(3, 4)
    api(x)
    assert api.queries == 12
    jax.jit(api)(x).block_until_ready()
    assert api.queries == 24
    jax.jit(jax.vmap(jax.vmap(api)))(x).block_until_ready()  # nested vmap
    assert api.queries == 36

    def body(c, xi):
        return c + api(xi).sum(), None

    jax.jit(lambda xs: jax.lax.scan(body, 0.0, xs)[0])(x).block_until_ready()  # 3 steps of 4 samples
    assert api.queries == 48
    f = jax.jit(lambda x: api(x).sum())
    for _ in range(3):
        f(x).block_until_ready()
    assert api.queries == 84


@pytest.mark.parametrize("kind", ["host", "jax"])
def test_one_host_call_per_vmapped_batch(kind):
    api = make(kind)
    x = batch(6, 5, 2)
    calls = api.host_calls
    jax.jit(jax.vmap(jax.vmap(api)))(x).block_until_ready()
    assert api.host_calls - calls == 1
    assert api.queries == 60


def test_host_fn_receives_flattened_batch():
    seen = []

    def fn(x):
        seen.append(x.shape)
        return host_logits(x)

    api = BlackBoxAPI.from_host(fn, SHAPE, K)
    jax.jit(jax.vmap(api))(batch(3, 2, 5)).block_until_ready()
    assert seen == [(30,) + SHAPE]


def test_budget_refuses_without_partial_answers():
    api = make("host", budget=10)
    api(batch(6))
    with pytest.raises(QueryBudgetExceeded) as err:
        api(batch(6))
    assert (err.value.asked, err.value.answered, err.value.left) == (6, 6, 4)
    assert "asked for 6" in str(err.value) and "4 left" in str(err.value)
    assert api.queries == 6
    api(batch(4))
    assert api.queries == 10 and api.remaining == 0


@pytest.mark.parametrize("kind", ["host", "jax"])
def test_budget_inside_jit_surfaces_original_error(kind):
    api = make(kind, budget=5)
    step = surface_api_errors(jax.jit(lambda x: api(x).sum()))
    with pytest.raises(QueryBudgetExceeded):
        step(batch(8))
    assert api.queries == 0


def test_reservation_checks_at_step_boundary_and_releases_unused():
    api = make("host", budget=20)
    with pytest.raises(QueryBudgetExceeded):
        api.reserve(21)
    step = jax.jit(lambda x: api(x).sum())
    with api.reserve(12):
        assert api.remaining == 8
        step(batch(12)).block_until_ready()
    assert api.queries == 12 and api.remaining == 8
    with api.reserve(8):  # step that fails before querying: reservation is released
        pass
    assert api.remaining == 8
    # A reservation is taken out of what others may reserve; queries draw on it first.
    r = api.reserve(6)
    assert api.remaining == 2
    with pytest.raises(QueryBudgetExceeded):
        api.reserve(3)
    with pytest.raises(QueryBudgetExceeded):
        api(batch(9))  # more than reserved + unreserved
    with r:
        api(batch(3))
    assert api.queries == 15 and api.remaining == 5


def test_ledger_thread_safe():
    api = make("host")
    xs = np.asarray(batch(2))
    threads = [threading.Thread(target=lambda: [api._host_answer(xs) for _ in range(50)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert api.queries == 8 * 50 * 2


@pytest.mark.parametrize("kind", ["host", "jax"])
def test_gradient_refused_with_clear_error(kind):
    api = make(kind)
    with pytest.raises(BlackBoxGradientError, match="zero-order estimator"):
        jax.grad(lambda x: api(x).sum())(batch(2))
    with pytest.raises(BlackBoxGradientError):
        jax.jit(jax.grad(lambda x: api(x * 2.0).sum()))(batch(2))


def test_gradient_not_needed_through_api_is_fine():
    api = make("host", output="probs")
    x = batch(4)

    def kd(w):  # a student that learns from the API's answers: no gradient through the API
        return -jnp.sum(api(x) * jax.nn.log_softmax(x.reshape(4, -1) @ w))

    g = jax.jit(jax.grad(kd))(jnp.asarray(W))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


@pytest.mark.parametrize("kind", ["host", "jax"])
def test_wrong_shape_or_dtype_fails_at_trace_time(kind):
    api = make(kind)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(\.\.\., 4, 4, 3\).*\(2, 4, 4, 1\)"):
        jax.jit(api)(jnp.ones((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="floating-point.*uint8"):
        api(jnp.ones((2,) + SHAPE, jnp.uint8))
    with pytest.raises(ValueError, match="expects inputs"):
        api(jnp.ones((3,)))


@pytest.mark.parametrize("bad,match", [
    (lambda x: np.zeros((len(x), K + 1)), "shape"),
    (lambda x: np.full((len(x), K), np.nan), "NaN or inf"),
    (lambda x: np.full((len(x), K), np.inf), "NaN or inf"),
])
def test_bad_host_outputs_name_the_api_and_are_not_charged(bad, match):
    api = BlackBoxAPI.from_host(bad, SHAPE, K, name="flaky-service")
    with pytest.raises(BlackBoxError, match=f"flaky-service.*{match}|{match}"):
        api(batch(3))
    step = surface_api_errors(jax.jit(api))
    with pytest.raises(BlackBoxError, match="flaky-service"):
        step(batch(3))
    assert api.queries == 0


def test_host_fn_raising_surfaces_with_api_name_and_is_not_charged():
    def broken(x):
        raise ConnectionError("service unavailable")

    api = BlackBoxAPI.from_host(broken, SHAPE, K, name="remote-7")
    with pytest.raises(BlackBoxError, match="remote-7.*ConnectionError.*service unavailable"):
        api(batch(2))
    with pytest.raises(BlackBoxError, match="remote-7"):
        with surface_api_errors():
            jax.jit(api)(batch(2))
    assert api.queries == 0


def test_nan_from_in_graph_teacher_is_refused():
    api = BlackBoxAPI.from_jax(lambda x: jnp.full((x.shape[0], K), jnp.nan), SHAPE, K, name="nan-net")
    with pytest.raises(BlackBoxError, match="nan-net"):
        api(batch(2))
    assert api.queries == 0


def test_require_output_refuses_unsupported_modes():
    api = make("host", output="label")
    with pytest.raises(ValueError, match="DFME cannot work with API 'teacher'.*'label'"):
        api.require_output(("logits", "probs"), "DFME")
    api.require_output(("label", "probs"), "IDEAL")


def test_invalid_construction():
    with pytest.raises(ValueError, match="unknown output mode"):
        make("host", output="scores")
    with pytest.raises(ValueError, match="topk"):
        make("host", output="topk")
    with pytest.raises(ValueError, match="budget"):
        make("host", budget=-1)


@pytest.mark.parametrize("kind", ["host", "jax"])
def test_no_retracing_across_calls(kind):
    chex.clear_trace_counter()
    api = make(kind)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x):
        return api(x).sum()

    for s in range(3):
        step(batch(5, seed=s)).block_until_ready()
    assert api.queries == 15


def test_ledger_state_roundtrip():
    api = make("host", budget=100)
    api(batch(7))
    other = make("host", budget=100)
    other.ledger.load_state_dict(api.ledger.state_dict())
    assert other.queries == 7 and other.remaining == 93


# ----------------------------------------------------------------------------- API groups
from dfml_jax.api import APIGroup  # noqa: E402


def group_of(kind, n=3):
    ws = [W * (i + 1) for i in range(n)]
    if kind == "host":
        apis = [BlackBoxAPI.from_host((lambda w: lambda x: x.reshape(len(x), -1) @ w)(w), SHAPE, K,
                                      name=f"h{i}") for i, w in enumerate(ws)]
    else:
        shared = lambda p, x: x.reshape(x.shape[0], -1) @ p  # one architecture, many teachers
        apis = [BlackBoxAPI.from_jax(shared, SHAPE, K, params=jnp.asarray(w), name=f"j{i}")
                for i, w in enumerate(ws)]
    return APIGroup(apis), ws


@pytest.mark.parametrize("kind", ["host", "jax"])
def test_group_one_compile_serves_all_members_and_charges_each(kind):
    chex.clear_trace_counter()
    g, ws = group_of(kind)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(i, x, op):
        return jax.vmap(lambda xi: g(i, xi, op))(x)  # vmapped: still one host call per step

    x = batch(2, 4)
    for i in (2, 0, 2):
        out = step(i, x, g.operand)
        np.testing.assert_allclose(out, np.asarray(x).reshape(8, -1).dot(ws[i]).reshape(2, 4, K),
                                   rtol=1e-4, atol=1e-4)
    assert [a.queries for a in g.apis] == [8, 0, 16] and g.queries == 24
    with pytest.raises(BlackBoxGradientError):
        jax.grad(lambda x: g(1, x, g.operand).sum())(x)


def test_group_budget_and_bad_members():
    g, _ = group_of("host")
    g.apis[1].ledger.budget = 3
    with pytest.raises(QueryBudgetExceeded):
        with surface_api_errors():
            jax.jit(lambda i, x: g(i, x))(1, batch(4))
    assert g.queries == 0
    a = BlackBoxAPI.from_host(host_logits, SHAPE, K)
    b = BlackBoxAPI.from_host(host_logits, SHAPE, K, output="label")
    with pytest.raises(ValueError, match="share input shape, classes and output mode"):
        APIGroup([a, b])
    with pytest.raises(ValueError, match="from_jax"):
        APIGroup([a, make("jax")])
    single = APIGroup([make("jax")])
    assert single.kind == "single" and single(0, batch(3)).shape == (3, K)
