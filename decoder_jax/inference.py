"""Sampling text from a trained workdir: load the model, tokenizer and latest params, then
decode with the KV-cache `decoding.generate`.

A context of `max_length` bounds what one cache can hold (and what the model was trained
on), so longer outputs are produced in windows: when a window is full, its last half
becomes the prompt of the next one (nanoGPT crops its context the same way, every token).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from decoder_jax import decoding
from decoder_jax.data import tokenizers
from decoder_jax.model import Decoder, ModelConfig, init_cache
from decoder_jax.train import checkpoint, optimizer, sharding, state as state_lib
from decoder_jax.train.loop import MODEL_CONFIG_FILE


@dataclasses.dataclass
class TrainedModel:
  config: ModelConfig
  params: dict
  tokenizer: object
  step: int


def load_trained(workdir: str) -> TrainedModel:
  """The latest checkpoint of a training workdir, with its model config and tokenizer."""
  config_path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir!r} a decoder_jax training "
                            "workdir? (python -m decoder_jax.train writes it)")
  with open(config_path) as f:
    model_config = ModelConfig.from_dict(json.load(f))
  with open(os.path.join(workdir, "config.json")) as f:
    train_config = ml_collections.ConfigDict(json.load(f)).train
  manager = checkpoint.make_manager(workdir, 1, 1, async_writes=False)
  if manager.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  abstract, _ = state_lib.abstract_state(Decoder(model_config),
                                         optimizer.make_optimizer(train_config),
                                         model_config.max_length, mesh)
  state, _ = checkpoint.restore(manager, abstract)
  manager.close()
  return TrainedModel(model_config, state.params, tokenizers.load_tokenizer(workdir),
                      int(state.step))


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "sampler",
                                             "eos_id"))
def _generate_window(params, prompts, prompt_lengths, rng, *, model_config, max_new_tokens,
                     sampler, eos_id):
  model = Decoder(model_config)

  def tokens_to_logits(tokens, positions, cache):
    return model.apply({"params": params}, tokens, positions=positions, cache=cache)

  cache = init_cache(model_config, prompts.shape[0], prompts.shape[1] + max_new_tokens,
                     jnp.dtype(model_config.dtype))
  return decoding.generate(tokens_to_logits, cache, prompts, prompt_lengths,
                           max_new_tokens=max_new_tokens, sampler=sampler, rng=rng,
                           eos_id=eos_id)


def complete(trained: TrainedModel, prompt: str, *, max_new_tokens: int, sampler,
             seed: int = 0) -> str:
  """The text generated after `prompt` (the prompt itself not included)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  tokenizer, context = trained.tokenizer, trained.config.max_length
  ids = list(tokenizer.encode(prompt))
  if not ids:
    raise ValueError("the prompt is empty after tokenization; give at least one token")
  keep = max(1, context // 2)
  window = ids if len(ids) < context else ids[-keep:]
  eos_id = getattr(tokenizer, "eos_id", None)
  rng = jax.random.key(seed)
  new: list[int] = []
  while len(new) < max_new_tokens:
    budget = min(max_new_tokens - len(new), context - len(window))
    rng, window_rng = jax.random.split(rng)
    result = _generate_window(trained.params, jnp.asarray([window], jnp.int32),
                              jnp.asarray([len(window)], jnp.int32), window_rng,
                              model_config=trained.config, max_new_tokens=budget,
                              sampler=sampler, eos_id=eos_id)
    length = int(result.lengths[0])
    chunk = np.asarray(result.tokens[0, :length]).tolist()
    new.extend(chunk)
    if eos_id is not None and chunk and chunk[-1] == eos_id:
      new.pop()
      break
    window = (window + chunk)[-keep:]
  return tokenizer.decode(new)
