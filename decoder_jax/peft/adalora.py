"""AdaLoRA (Zhang et al., 2023): low-rank updates P diag(E) Q whose rank is allocated by
importance during training.

The model holds the triplets (layers.Dense adds adalora_p [n_in, r], adalora_e [r],
adalora_q [r, n_out] where config.adalora targets it). This module holds the rest:

  * `orthogonality_loss`, the regulariser ||P^T P - I||^2 + ||Q Q^T - I||^2 that keeps
    P and Q near orthogonal, so E acts as singular values (the train step adds
    orth_reg times it to the loss);
  * `budget_schedule`, the paper's cubic schedule of how many singular values stay live
    (eq. 12), computed on the host as one integer per step;
  * `allocator`, an optax wrapper that tracks each weight's importance and prunes E
    inside the jitted step: sensitivity I = |w * grad|, smoothed by an EMA (beta1), times
    the EMA of its uncertainty |I - EMA| (beta2); a triplet's score is its E's score plus
    the mean score of its P column and of its Q row (eq. 11); the budget's highest-scoring
    triplets across all modules stay, the others have E set to zero. Shapes never change
    (a mask, not a resize), so nothing recompiles;
  * merge (P diag(E) Q folded into the kernel), targets check and init, as for LoRA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from decoder_jax.errors import ConfigError
from decoder_jax.model.config import AdaLoraConfig, ModelConfig
from decoder_jax.peft.common import (abstract_params, add_fresh_leaves, check_dense_targets,
                                     name_of)

LEAVES = ("adalora_p", "adalora_e", "adalora_q")


def is_param(path, leaf: Any = None) -> bool:
  del leaf
  return bool(path) and name_of(path[-1]) in LEAVES


def check_targets(config: ModelConfig, base_params=None) -> list[str]:
  return check_dense_targets(config, "adalora", base_params)


def init_params(config: ModelConfig, base_params, rng):
  """`base_params` plus fresh triplets (E at zero: the model starts as the base)."""
  check_targets(config, base_params)
  return add_fresh_leaves(config, base_params, is_param, rng)


def _modules(flat: dict) -> list[tuple]:
  """Module paths holding a triplet, in a fixed order."""
  return sorted({path[:-1] for path in flat if name_of(path[-1]) == "adalora_e"})


def _flat(tree) -> dict:
  """{path of names: leaf}, from a plain dict tree or one with boxes."""
  return {tuple(name_of(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]}


def orthogonality_loss(params) -> jax.Array:
  """Mean over modules (and layers, when stacked) of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2
  (float32 scalar); 0 for a tree without triplets."""
  flat = _flat(params)
  total, count = jnp.zeros((), jnp.float32), 0
  for m in _modules(flat):
    p = flat[m + ("adalora_p",)].astype(jnp.float32)  # [(layers,) n_in, r]
    q = flat[m + ("adalora_q",)].astype(jnp.float32)  # [(layers,) r, n_out]
    eye = jnp.eye(p.shape[-1], dtype=jnp.float32)
    ptp = jnp.swapaxes(p, -1, -2) @ p  # [(layers,) r, r]
    qqt = q @ jnp.swapaxes(q, -1, -2)
    per = ((ptp - eye) ** 2).sum(axis=(-1, -2)) + ((qqt - eye) ** 2).sum(axis=(-1, -2))
    total, count = total + per.sum(), count + per.size
  return total / max(count, 1)


def regularizer(config: ModelConfig):
  """params -> orth_reg * orthogonality_loss(params), for the train step's loss; None
  when the config has no AdaLoRA or orth_reg is 0."""
  if config.adalora is None or not config.adalora.orth_reg:
    return None
  weight = config.adalora.orth_reg
  return lambda params: weight * orthogonality_loss(params)


def num_triplets(config: ModelConfig) -> int:
  """Modules (times layers) holding a triplet: the budget counts init_rank per one."""
  flat = abstract_params(config)
  return sum(int(np.prod(flat[m + ("adalora_e",)].shape[:-1], dtype=np.int64))
             for m in _modules(flat))


def budget_schedule(ada: AdaLoraConfig, num_modules: int, total_steps: int) -> np.ndarray:
  """int64 [total_steps]: live singular values allowed at each step (eq. 12 of the paper).

  b(t) = b0 for t < t_init; b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_init - t_final))^3
  (rounded down) until T - t_final; b_T after; b0 = init_rank * modules, b_T = target_rank *
  modules. Integer arithmetic, so no rounding differs between host and device.
  """
  check_schedule(ada, total_steps)
  b0, bt = ada.init_rank * num_modules, ada.target_rank * num_modules
  span = total_steps - ada.t_init - ada.t_final
  steps = np.arange(total_steps, dtype=np.int64)
  left = np.clip(span - (steps - ada.t_init), 0, span)  # span .. 0 over the middle phase
  middle = bt + (b0 - bt) * left ** 3 // span ** 3
  return np.where(steps < ada.t_init, b0,
                  np.where(steps >= total_steps - ada.t_final, bt, middle))


def mask_steps(ada: AdaLoraConfig, total_steps: int) -> np.ndarray:
  """bool [total_steps]: where the step prunes to its budget: every delta_t steps from
  t_init in the middle phase, and every step of the final phase (the mask is fixed
  there: importance stops being tracked)."""
  steps = np.arange(total_steps)
  final = steps >= total_steps - ada.t_final
  middle = (steps >= ada.t_init) & ~final & ((steps - ada.t_init) % ada.delta_t == 0)
  return middle | final


def check_schedule(ada: AdaLoraConfig, total_steps: int) -> None:
  if ada.t_init + ada.t_final >= total_steps:
    raise ConfigError(f"model.adalora: t_init ({ada.t_init}) + t_final ({ada.t_final}) must "
                      f"be below train.num_steps ({total_steps}), leaving steps to prune in")


class AllocatorState(NamedTuple):
  inner: Any  # the wrapped optimizer's state
  count: jax.Array  # int32 []: steps taken
  importance: Any  # EMA of |w * grad|, like the trainable params (zeros off the triplets)
  uncertainty: Any  # EMA of |I - importance|
  mask: Any  # bool like each adalora_e: the triplet is live


def _triplet_scores(importance, uncertainty) -> dict:
  """{module path: score [(layers,) r]} from the EMAs (eq. 11)."""
  s_imp, s_unc = _flat(importance), _flat(uncertainty)
  scores = {}
  for m in _modules(s_imp):
    s = {leaf: s_imp[m + (leaf,)] * s_unc[m + (leaf,)] for leaf in LEAVES}
    scores[m] = (s["adalora_e"] + s["adalora_p"].mean(axis=-2) + s["adalora_q"].mean(axis=-1))
  return scores


def _top_budget(scores: dict, budget) -> dict:
  """{module: bool mask}: the `budget` highest scores across all modules stay live (ties
  to the earlier module)."""
  modules = list(scores)
  flat = jnp.concatenate([scores[m].reshape(-1) for m in modules])
  order = jnp.argsort(-flat, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(flat.size, dtype=order.dtype))
  live = rank < budget
  out, start = {}, 0
  for m in modules:
    size = scores[m].size
    out[m] = live[start:start + size].reshape(scores[m].shape)
    start += size
  return out


def allocator(inner: optax.GradientTransformation, config: ModelConfig,
              total_steps: int) -> optax.GradientTransformation:
  """`inner` (e.g. AdamW) wrapped with AdaLoRA's rank allocation for `config.adalora`
  over `total_steps` train steps. Its params are the trainable half (triplets and any
  head); its state adds the importance EMAs, the live mask and the step count."""
  ada = config.adalora
  budgets = jnp.asarray(budget_schedule(ada, num_triplets(config), total_steps), jnp.int32)
  prunes = jnp.asarray(mask_steps(ada, total_steps))
  tracked_until = total_steps - ada.t_final

  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    mask = {m: jnp.ones(leaf.shape, bool)
            for m, leaf in ((path[:-1], leaf) for path, leaf in _flat(params).items()
                            if path[-1] == "adalora_e")}
    return AllocatorState(inner.init(params), jnp.zeros((), jnp.int32), zeros, zeros,
                          traverse_util.unflatten_dict(mask))

  def update(grads, state, params):
    step = state.count
    track = step < tracked_until
    # Sensitivity of each triplet weight; zero elsewhere (e.g. a classification head).
    def smooth(path, g, p, imp, unc):
      if not is_param(path):
        return imp, unc
      sens = jnp.abs(g.astype(jnp.float32) * p.astype(jnp.float32))
      new_imp = ada.beta1 * imp + (1 - ada.beta1) * sens
      new_unc = ada.beta2 * unc + (1 - ada.beta2) * jnp.abs(sens - new_imp)
      return jnp.where(track, new_imp, imp), jnp.where(track, new_unc, unc)

    pairs = jax.tree_util.tree_map_with_path(smooth, grads, params, state.importance,
                                             state.uncertainty)
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    importance = jax.tree.map(lambda pr: pr[0], pairs, is_leaf=is_pair)
    uncertainty = jax.tree.map(lambda pr: pr[1], pairs, is_leaf=is_pair)
    updates, inner_state = inner.update(grads, state.inner, params)

    index = jnp.minimum(step, total_steps - 1)
    prune = prunes[index]
    ranked = _top_budget(_triplet_scores(importance, uncertainty), budgets[index])
    old_mask = {tuple(path): leaf for path, leaf in traverse_util.flatten_dict(state.mask).items()}
    mask = {m: jnp.where(prune, ranked[m], old_mask[m]) for m in old_mask}

    flat_updates = traverse_util.flatten_dict(updates)
    flat_params = traverse_util.flatten_dict(params)
    for m, live in mask.items():
      path = m + ("adalora_e",)
      e, u = flat_params[path], flat_updates[path]
      # A pruning step sets a pruned singular value to zero (e + (-e)).
      flat_updates[path] = jnp.where(prune & ~live, -e, u).astype(u.dtype)
    return (traverse_util.unflatten_dict(flat_updates),
            AllocatorState(inner_state, step + 1, importance, uncertainty,
                           traverse_util.unflatten_dict(mask)))

  return optax.GradientTransformation(init, update)


def live_singular_values(params) -> int:
  """Nonzero entries of every adalora_e: the rank AdaLoRA has left in all modules."""
  flat = _flat(params)
  return int(sum(np.count_nonzero(np.asarray(flat[m + ("adalora_e",)]))
                 for m in _modules(flat)))


def rank_pattern(params) -> dict[str, list[int]]:
  """{module path: live singular values per layer}, to see where the budget went."""
  flat = _flat(params)
  out = {}
  for m in _modules(flat):
    e = np.asarray(flat[m + ("adalora_e",)])
    out["/".join(m)] = np.count_nonzero(e.reshape(-1, e.shape[-1]), axis=-1).tolist()
  return out


def merge(params, config: ModelConfig):
  """(params with scaling * P diag(E) Q added to each targeted kernel, config with
  adalora=None); float32 sums cast back to the kernel's dtype; unboxed arrays."""
  ada = config.adalora
  if ada is None:
    raise ValueError("config.adalora is None: there is nothing to merge")
  flat = traverse_util.flatten_dict(nn.unbox(params))
  modules = _modules(flat)
  if not modules:
    raise ValueError("config.adalora is set but params hold no adalora_* leaves")
  merged = {path: leaf for path, leaf in flat.items() if not is_param(path)}
  for m in modules:
    p, e, q = (flat[m + (leaf,)].astype(jnp.float32) for leaf in LEAVES)
    kernel = flat[m + ("kernel",)]
    delta = ada.scaling * ((p * e[..., None, :]) @ q)  # [(layers,) n_in, n_out]
    merged[m + ("kernel",)] = (kernel.astype(jnp.float32)
                               + delta.reshape(kernel.shape)).astype(kernel.dtype)
  return traverse_util.unflatten_dict(merged), dataclasses.replace(config, adalora=None)
