"""The FLOP counter behind the benchmarks' bounds (experiments/bench/flops.py)."""
import importlib.util
import os

import jax
import jax.numpy as jnp

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "bench", "flops.py")
_spec = importlib.util.spec_from_file_location("bench_flops", _PATH)
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)


def test_dot_and_conv_flops_are_two_multiply_adds_per_term():
    a, w = jnp.ones((6, 5)), jnp.ones((5, 7))
    assert flops.step_flops(lambda a, w: a @ w, a, w) == (2.0 * 6 * 5 * 7, True)
    x, k = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 4))
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.step_flops(conv, x, k) == (2.0 * (2 * 9 * 9 * 4) * (3 * 3 * 3), True)


def test_scan_counts_its_length_and_gradients_count_the_backward_pass():
    a, w = jnp.ones((8, 4)), jnp.ones((4, 4))
    body = lambda c, _: (c @ w, None)  # noqa: E731
    f = lambda c: jax.lax.scan(body, c, None, length=10)[0]  # noqa: E731
    one = 2.0 * 8 * 4 * 4
    assert flops.step_flops(jax.jit(f), a) == (10 * one, True)
    # the gradient w.r.t. the carry: forward + one transposed matmul per step
    g, exact = flops.step_flops(jax.grad(lambda c: jnp.sum(f(c))), a)
    assert exact and g == 20 * one


def test_while_loop_is_counted_once_and_flagged():
    a, w = jnp.ones((8, 4)), jnp.ones((4, 4))
    f = lambda c: jax.lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, s[1] @ w), (0, c))[1]  # noqa: E731,E501
    assert flops.step_flops(f, a) == (2.0 * 8 * 4 * 4, False)
