"""LayerNorm and RMSNorm over the last axis, with written-out backward passes.

Same parameters (`scale`, and `bias` when used) and the same values as flax.linen's
LayerNorm and RMSNorm, statistics in float32 whatever the input dtype. The backward pass
is written out (jax.custom_vjp): two row means, a column sum and one elementwise pass
(differentiating flax's norms gave the shakespeare CPU train step 678 operations, these
654). On the 2-core CPU, whose speed swings by a third within minutes, that step with
flax's norms ran 35-42 ms (medians; quartiles as wide as 27-44) in four of six
same-process comparisons and with these 26-27 ms (quartiles 24-28); in the other two the
two ran alike (benchmarks/RESULTS.md). The two forms agree to float32 rounding
(tests/test_norms.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def _stats(x32, eps: float, centered: bool):
  """Per-row mean (0 for RMSNorm) and 1/sqrt(variance + eps), each [..., 1] float32."""
  mean = jnp.mean(x32, axis=-1, keepdims=True) if centered else jnp.zeros((), jnp.float32)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize(x, scale, bias, eps: float, centered: bool, dtype):
  """(x - mean) / std * scale + bias over the last axis (mean 0 and no bias for RMSNorm).

  x: [..., d]; scale: [d]; bias: [d] or None. Returns `dtype`.
  """
  return _normalize_fwd(x, scale, bias, eps, centered, dtype)[0]


def _normalize_fwd(x, scale, bias, eps, centered, dtype):
  mean, rstd = _stats(x.astype(jnp.float32), eps, centered)
  y = (x.astype(jnp.float32) - mean) * rstd * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  # Saved: the input (the residual stream keeps it anyway) and two floats per row.
  return y.astype(dtype), (x, mean, rstd, scale, bias)


def _normalize_bwd(eps, centered, dtype, saved, g):
  del eps, dtype
  x, mean, rstd, scale, bias = saved
  g = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd  # [..., d]
  gs = g * scale.astype(jnp.float32)
  # d/dx of xhat * gs, with the row statistics' own dependence on x.
  along_xhat = jnp.mean(gs * xhat, axis=-1, keepdims=True)
  dx = gs - xhat * along_xhat
  if centered:
    dx = dx - jnp.mean(gs, axis=-1, keepdims=True)
  dx = dx * rstd
  rows = tuple(range(x.ndim - 1))
  dscale = jnp.sum(g * xhat, axis=rows).astype(scale.dtype)
  dbias = None if bias is None else jnp.sum(g, axis=rows).astype(bias.dtype)
  return dx.astype(x.dtype), dscale, dbias


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class LayerNorm(nn.Module):
  """flax.linen.LayerNorm's parameters and values (last axis, scale, optional bias)."""
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones_init()
  bias_init: Callable = nn.initializers.zeros_init()
  centered = True  # subtract the mean (RMSNorm: no)

  @nn.compact
  def __call__(self, x):  # [..., d] -> [..., d] in self.dtype
    width = x.shape[-1]
    scale = self.param("scale", self.scale_init, (width,), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (width,), self.param_dtype)
            if self.use_bias else None)
    return normalize(x, scale, bias, self.epsilon, self.centered, jnp.dtype(self.dtype))


class RMSNorm(LayerNorm):
  """flax.linen.RMSNorm's parameters and values: x / rms(x) * scale."""
  use_bias: bool = False
  centered = False
