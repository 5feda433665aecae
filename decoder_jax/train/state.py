"""Train state creation: shapes from eval_shape, values initialised under jit, sharded."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from decoder_jax import sharding


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def apply_gradients(self, grads):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)


def _init_boxed(model: nn.Module, tx, seq_len: int, rng) -> TrainState:
  dummy = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(rng, dummy)["params"]  # leaves are nn.Partitioned boxes
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    tx=tx)


def abstract_state(model, tx, seq_len: int, mesh):
  """(ShapeDtypeStructs of the unboxed state, its NamedShardings)."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, model, tx, seq_len), jax.random.key(0))
  shardings = sharding.shardings_for(boxed, mesh)
  shapes = nn.unbox(boxed)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings


def create_train_state(model, tx, seq_len: int, mesh, rng):
  """Initialises parameters and optimizer state directly into their shards."""
  _, shardings = abstract_state(model, tx, seq_len, mesh)
  init = jax.jit(lambda r: nn.unbox(_init_boxed(model, tx, seq_len, r)), out_shardings=shardings)
  # No mesh context here: flax's DenseGeneral would constrain its flat pre-reshape kernel
  # with the reshaped kernel's axis names. out_shardings alone places every leaf.
  return init(rng), shardings


def state_from_params(params, tx, shardings) -> TrainState:
  """A step-0 state around existing (e.g. pretrained) params, placed by `shardings`."""
  start = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                       opt_state=tx.init(p), tx=tx), out_shardings=shardings)
  return start(params)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
