"""Samplers: small frozen dataclasses mapping logits [batch, vocab] to tokens [batch].

They are hashable, so a sampler can be a static argument of a jit-compiled decode.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Greedy:
  def __call__(self, logits, rng):  # logits: [batch, vocab] -> int32 [batch]
    del rng
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
  temperature: float = 1.0

  def __post_init__(self):
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (use Greedy for 0), got {self.temperature}")

  def __call__(self, logits, rng):
    scaled = logits.astype(jnp.float32) / self.temperature
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
  """Samples among the k most likely tokens, at a temperature."""
  k: int
  temperature: float = 1.0

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.k}")
    Temperature(self.temperature)  # validates

  def __call__(self, logits, rng):
    logits = logits.astype(jnp.float32) / self.temperature
    k = min(self.k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [batch, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def make_sampler(temperature: float = 1.0, top_k: int = 0):
  """The sampler for command-line style arguments: temperature 0 means greedy."""
  if temperature == 0:
    return Greedy()
  if top_k and top_k > 0:
    return TopK(top_k, temperature)
  return Temperature(temperature)
