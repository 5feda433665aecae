"""AdamW with a learning-rate schedule (linear warmup, then cosine or inverse-square-root
decay), masked weight decay and global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from decoder_jax.errors import ConfigError

SCHEDULES = ("cosine", "inverse_sqrt")


def learning_rate_schedule(train_config) -> optax.Schedule:
  """train.schedule: "cosine" (the default) or "inverse_sqrt"."""
  name = train_config.get("schedule") or "cosine"
  if name == "cosine":
    return cosine_schedule(train_config)
  if name == "inverse_sqrt":
    return inverse_sqrt_schedule(train_config.learning_rate, train_config.warmup_steps)
  raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}; got {name!r}")


def inverse_sqrt_schedule(learning_rate: float, warmup_steps: int) -> optax.Schedule:
  """Vaswani et al. (2017), peak-normalised: learning_rate * min(step / warmup_steps,
  sqrt(warmup_steps / step)) at update number step = count + 1 (their step_num), a linear
  warmup reaching learning_rate at step warmup_steps, then 1/sqrt decay."""
  warmup = float(max(warmup_steps, 1))

  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    return learning_rate * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))

  return schedule


def cosine_schedule(train_config) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine down to `min_learning_rate`."""
  decay_steps = train_config.get("decay_steps") or train_config.num_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=train_config.learning_rate / (train_config.warmup_steps + 1), peak_value=train_config.learning_rate,
      warmup_steps=train_config.warmup_steps, decay_steps=max(decay_steps, train_config.warmup_steps + 1),
      end_value=train_config.min_learning_rate)


def decay_mask(params):
  """True for matrices (kernels, embeddings); False for norm scales and biases (ndim < 2).

  With scan_layers every leaf gains a leading [layers] axis, so the test is on the
  parameter's name, not only its rank.
  """
  def is_decayed(path, leaf):
    # The last dict key names the parameter (flax boxes add attribute keys after it).
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return names[-1] not in ("bias", "scale")
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train_config.grad_clip),
      optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1, b2=train_config.b2,
                  eps=train_config.eps, weight_decay=train_config.weight_decay,
                  mask=decay_mask),
  )
