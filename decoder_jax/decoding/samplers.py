"""Samplers: small frozen dataclasses mapping logits [batch, vocab] to tokens [batch].

They are hashable, so a sampler can be a static argument of a jit-compiled decode. Each
random sampler draws from categorical(filtered(logits)): `filtered` is the distribution
it samples (temperature applied, tokens outside top-k / top-p at -inf), which
speculative decoding needs for its acceptance rule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from decoder_jax.errors import ConfigError


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
      raise ConfigError(f"temperature must be > 0 (use Greedy for 0), got {self.temperature}")

  def filtered(self, logits):
    return logits.astype(jnp.float32) / self.temperature

  def __call__(self, logits, rng):
    return jax.random.categorical(rng, self.filtered(logits), axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
  """Samples among the k most likely tokens, at a temperature."""
  k: int
  temperature: float = 1.0

  def __post_init__(self):
    if self.k < 1:
      raise ConfigError(f"top_k must be >= 1, got {self.k}")
    Temperature(self.temperature)  # validates

  def filtered(self, logits):
    return _top_k_logits(logits.astype(jnp.float32) / self.temperature, self.k)

  def __call__(self, logits, rng):
    return jax.random.categorical(rng, self.filtered(logits), axis=-1).astype(jnp.int32)


def _top_k_logits(logits, k: int):
  """logits with everything below the k-th largest per row set to -inf."""
  k = min(k, logits.shape[-1])
  kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [batch, 1]
  return jnp.where(logits < kth, -jnp.inf, logits)


@dataclasses.dataclass(frozen=True)
class TopP:
  """Nucleus sampling: the smallest set of likeliest tokens whose probability reaches p,
  at a temperature, optionally after keeping only the top_k (None: no top-k)."""
  p: float
  temperature: float = 1.0
  top_k: int | None = None

  def __post_init__(self):
    if not 0.0 < self.p <= 1.0:
      raise ConfigError(f"top_p must be in (0, 1], got {self.p}")
    if self.top_k is not None and self.top_k < 1:
      raise ConfigError(f"top_k must be >= 1 (or None for no top-k), got {self.top_k}")
    Temperature(self.temperature)  # validates

  def __call__(self, logits, rng):
    return jax.random.categorical(rng, self.filtered(logits), axis=-1).astype(jnp.int32)

  def filtered(self, logits):
    logits = logits.astype(jnp.float32) / self.temperature
    if self.top_k:
      logits = _top_k_logits(logits, self.top_k)
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [batch, vocab], descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is below p (the first is always kept).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = mass_before < self.p
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def make_sampler(temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0):
  """The sampler for command-line style arguments: temperature 0 means greedy, top_k None
  and top_p 1 mean no truncation. Invalid values raise ValueError here, before any
  compilation."""
  if temperature < 0:
    raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if top_k is not None and top_k < 1:
    raise ConfigError(f"top_k must be >= 1 (or None for no top-k), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
  if temperature == 0:
    return Greedy()
  if top_p < 1.0:
    return TopP(top_p, temperature, top_k)
  if top_k is not None:
    return TopK(top_k, temperature)
  return Temperature(temperature)
