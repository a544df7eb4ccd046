"""Shared layers: `dense` is a matmul with a CPU-friendly kernel gradient, nothing else;
`reuse_freed_memory` takes effect in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hellochat_jax.core.layers import dense


@pytest.mark.parametrize("x_shape", [(6, 5), (2, 3, 5)])
def test_dense_equals_dot_with_the_same_gradients(x_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(x_shape[:-1] + (4,)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * dy)

    np.testing.assert_allclose(dense(x, w), jnp.dot(x, w), rtol=1e-6, atol=1e-6)
    got = jax.jit(jax.grad(loss(dense), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_dense_gradient_of_a_transposed_kernel_is_the_tied_embedding_gradient():
    # Embed.attend: logits = x @ table.T
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((7, 3)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((11, 3)), jnp.float32)
    got = jax.grad(lambda t: jnp.sum(jnp.tanh(dense(x, t.T))))(table)
    want = jax.grad(lambda t: jnp.sum(jnp.tanh(x @ t.T)))(table)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_freed_memory_takes_effect_first_thing_in_a_process_and_can_be_turned_off():
    code = "from hellochat_jax.core.host_memory import reuse_freed_memory as r; print(r(), r())"
    env = {k: v for k, v in os.environ.items() if k != "HELLOCHAT_MALLOC"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
    off = subprocess.run([sys.executable, "-c", code], env={**env, "HELLOCHAT_MALLOC": "default"},
                         capture_output=True, text=True, check=True)
    assert off.stdout.split() == ["False", "False"]
