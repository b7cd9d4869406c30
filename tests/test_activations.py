"""repjax.nn.activations.gelu: the exact (erf) GELU, against a float64 reference and jax.nn.gelu(approximate=False),
values and derivative, float32 on N(0, 4) inputs plus the tails; absolute tolerance 2e-6 (float32 rounding of
values up to ~8 in magnitude)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from repjax.nn.activations import gelu


def _inputs():
    x = np.random.default_rng(0).normal(scale=2.0, size=4096)
    return np.concatenate([x, [-30.0, -8.0, -5.5, -1e-3, 0.0, 1e-3, 5.5, 8.0, 30.0]]).astype(np.float32)


def test_gelu_matches_float64_erf_form_and_jax():
    x = _inputs()
    ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(gelu(jnp.asarray(x)), ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(gelu(jnp.asarray(x)), jax.nn.gelu(jnp.asarray(x), approximate=False), rtol=0,
                               atol=2e-6)
    assert not np.allclose(gelu(jnp.asarray(x)), jax.nn.gelu(jnp.asarray(x), approximate=True), rtol=0, atol=2e-6)


def test_gelu_derivative():
    x = _inputs()
    ref = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
                    for v in x.astype(np.float64)])
    np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(jnp.asarray(x)), ref, rtol=0, atol=2e-6)


def test_gelu_keeps_the_input_dtype():
    assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
