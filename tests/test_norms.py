"""decoder_jax.model.norms against flax.linen's LayerNorm and RMSNorm: same parameters,
same values, same gradients (the backward pass is written out by hand)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_jax.model import norms

CASES = {
    "layernorm": (lambda **kw: nn.LayerNorm(**kw), lambda **kw: norms.LayerNorm(**kw)),
    "layernorm_no_bias": (lambda **kw: nn.LayerNorm(use_bias=False, **kw),
                          lambda **kw: norms.LayerNorm(use_bias=False, **kw)),
    "rmsnorm": (lambda **kw: nn.RMSNorm(**kw), lambda **kw: norms.RMSNorm(**kw)),
}


def _inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  # Rows far from mean 0 / variance 1, so the statistics matter.
  x = jnp.asarray(rng.standard_normal((3, 5, 48)) * 3.0 + 1.5, dtype)
  cotangent = jnp.asarray(rng.standard_normal((3, 5, 48)), jnp.float32)
  return x, cotangent, rng


def _perturbed(params, rng):
  # Away from the ones/zeros init, so a wrong scale or bias gradient shows.
  return jax.tree.map(lambda p: p * 1.3 + 0.2 + jnp.asarray(
      rng.standard_normal(p.shape) * 0.1, p.dtype), params)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_values_and_gradients_equal_flax_in_float32(case):
  make_flax, make_ours = case
  x, cotangent, rng = _inputs(jnp.float32)
  theirs, ours = make_flax(epsilon=1e-5), make_ours(epsilon=1e-5)
  params = _perturbed(theirs.init(jax.random.key(0), x), rng)
  assert (jax.tree.map(jnp.shape, params)
          == jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)))

  def loss(module):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * cotangent),
                            argnums=(0, 1)))

  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=2e-5)
  (ours_dp, ours_dx), (their_dp, their_dx) = loss(ours)(params, x), loss(theirs)(params, x)
  np.testing.assert_allclose(ours_dx, their_dx, rtol=1e-4, atol=1e-5)
  for name in their_dp["params"]:
    np.testing.assert_allclose(ours_dp["params"][name], their_dp["params"][name], rtol=1e-4,
                               atol=1e-5, err_msg=name)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bfloat16_compute_keeps_dtypes_and_stays_close(case):
  make_flax, make_ours = case
  x, cotangent, rng = _inputs(jnp.bfloat16)
  theirs, ours = make_flax(dtype=jnp.bfloat16), make_ours(dtype=jnp.bfloat16)
  params = _perturbed(theirs.init(jax.random.key(0), x), rng)
  y = ours.apply(params, x)
  assert y.dtype == jnp.bfloat16
  # Both compute in float32 and round once: equal up to one bfloat16 rounding step.
  np.testing.assert_allclose(np.float32(y), np.float32(theirs.apply(params, x)), rtol=1e-2,
                             atol=1e-2)
  dp, dx = jax.grad(lambda p, x: jnp.sum(ours.apply(p, x).astype(jnp.float32) * cotangent),
                    argnums=(0, 1))(params, x)
  assert dx.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(dp))
  _, their_dx = jax.grad(
      lambda p, x: jnp.sum(theirs.apply(p, x).astype(jnp.float32) * cotangent),
      argnums=(0, 1))(params, x)
  np.testing.assert_allclose(np.float32(dx), np.float32(their_dx), rtol=3e-2, atol=3e-2)


def test_layernorm_output_is_normalised_before_scale_and_bias():
  x, _, _ = _inputs(jnp.float32)
  module = norms.LayerNorm()
  params = module.init(jax.random.key(0), x)  # scale 1, bias 0
  y = np.asarray(module.apply(params, x))
  np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-3)
  rms = norms.RMSNorm()
  y = np.asarray(rms.apply(rms.init(jax.random.key(0), x), x))
  np.testing.assert_allclose(np.sqrt((y ** 2).mean(-1)), 1.0, rtol=1e-3)
