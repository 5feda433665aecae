"""Sampling text from a trained workdir (or a pretrained model, see
`decoder_jax.pretrained`): load the model, tokenizer and params, then decode with the
KV-cache `decoding.generate`.

A context of `max_length` bounds what one cache can hold (and what the model was trained
on), so longer outputs are produced in windows: when a window is full, its last half
becomes the prompt of the next one (nanoGPT crops its context the same way, every token).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from decoder_jax import decoding, progress
from decoder_jax.data import tokenizers
from decoder_jax.errors import ConfigError, NotFound
from decoder_jax.model import Decoder, ModelConfig, init_cache, layers, resize_cache
from decoder_jax.train import checkpoint, optimizer, sharding, state as state_lib
from decoder_jax.train.loop import MODEL_CONFIG_FILE


@dataclasses.dataclass
class TrainedModel:
  config: ModelConfig
  params: dict
  tokenizer: object
  step: int = 0  # the training step of the checkpoint (0 for imported weights)


def load_trained(workdir: str) -> TrainedModel:
  """The latest checkpoint of a training workdir, with its model config and tokenizer.

  A run started from pretrained weights (config.init_from, e.g. a LoRA fine-tuning) comes
  back ready to decode: its base re-read from the source where the checkpoint holds only
  the trainable half, the method merged where it can be (peft.for_inference).
  """
  if not os.path.isdir(workdir):
    raise NotFound(f"workdir {workdir} does not exist or is not a directory")
  model_config = ModelConfig.from_dict(_read_workdir_json(workdir, MODEL_CONFIG_FILE))
  run_config = ml_collections.ConfigDict(_read_workdir_json(workdir, "config.json"))
  if checkpoint.latest_step(workdir) is None:  # checked read-only: the workdir stays as it is
    raise NotFound(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: the run has "
                   "not saved one yet")
  if run_config.get("init_from"):
    return _load_from_pretrained_run(workdir, run_config)
  train_config = run_config.train
  manager = checkpoint.make_manager(workdir, 1, 1, async_writes=False)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  abstract, _ = state_lib.abstract_state(Decoder(model_config),
                                         optimizer.make_optimizer(train_config),
                                         model_config.max_length, mesh)
  state, _ = _restore_shown(manager, abstract, workdir)
  return TrainedModel(model_config, state.params, tokenizers.load_tokenizer(workdir),
                      int(state.step))


def _restore_shown(manager, abstract, workdir: str):
  """checkpoint.restore of the latest step, with progress shown."""
  with progress.all_at_once(f"restoring {workdir}", len(jax.tree.leaves(abstract)), "arrays"):
    restored = checkpoint.restore(manager, abstract)
  manager.close()
  return restored


def _read_workdir_json(workdir: str, name: str) -> dict:
  path = os.path.join(workdir, name)
  if not os.path.isfile(path):
    raise NotFound(f"{path} not found: is {workdir} a decoder_jax training workdir? "
                   "(python -m decoder_jax.train writes it)")
  try:
    with open(path, encoding="utf-8") as f:
      values = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError):
    values = None  # not JSON: refused below, like JSON that is not an object
  if not isinstance(values, dict):
    raise ConfigError(f"{path} is not the JSON object decoder_jax writes; is {workdir} a "
                      "decoder_jax training workdir?")
  return values


def _load_from_pretrained_run(workdir: str, config) -> TrainedModel:
  from decoder_jax import peft
  from decoder_jax.train import setup

  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  peft_run = setup.uses_peft(config)
  run = setup.build_run(config, workdir, mesh, need_base=peft_run, resuming=True,
                        with_data=False)
  tx = setup.make_optimizer(config.train, run.model_config)
  abstract, _, _, frozen_shardings = setup.abstract_state(run, tx, mesh, config)
  manager = checkpoint.make_manager(workdir, 1, 1, async_writes=False)
  state, _ = _restore_shown(manager, abstract, workdir)
  frozen = {}
  if peft_run:
    _, frozen = setup.split_params(run, setup.initial_params(run, mesh, jax.random.key(0)),
                                   frozen_shardings, config)
  # LoRA and AdaLoRA folded into the kernels, a prefix's MLP folded away; adapters and a
  # soft prompt stay in the model.
  params, model_config = peft.for_inference(peft.combine(state.params, frozen),
                                            run.model_config)
  return TrainedModel(model_config, params, run.tokenizer, int(state.step))


def with_dtype(trained: TrainedModel, dtype: str | None) -> TrainedModel:
  """The model run in `dtype`: parameters cast to it (keeping their shardings), matmuls
  and the KV cache in it. None keeps the model as it is."""
  if dtype is None or (trained.config.dtype == dtype and trained.config.param_dtype == dtype):
    return trained
  config = dataclasses.replace(trained.config, dtype=dtype, param_dtype=dtype)
  cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), p))
  return dataclasses.replace(trained, config=config, params=cast(trained.params))


def param_shardings(model_config: ModelConfig, mesh):
  """NamedShardings laying parameters out on `mesh` as training does."""
  boxed = jax.eval_shape(
      lambda: Decoder(model_config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  return sharding.shardings_for(boxed["params"], mesh)


def decoding_mesh(mesh):
  """Context for decoding on `mesh`: the model's logical axis constraints apply to it."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
  return stack


def bucket_length(length: int, minimum: int = 8) -> int:
  """The prompt bucket: the next power of two >= length (at least `minimum`), so a stream
  of prompts of varying length compiles once per bucket, not once per length."""
  return max(minimum, 1 << max(0, length - 1).bit_length())


def pad_prompts(token_lists, bucket: bool = True, pad_id: int = 0, max_width: int | None = None):
  """Right-pads token lists: (prompts int32 [batch, width], lengths int32 [batch]).

  The width is the bucket of the longest list, capped at max_width (the room the context
  leaves after the new tokens) but never below the longest list.
  """
  longest = max(len(t) for t in token_lists)
  width = bucket_length(longest) if bucket else longest
  if max_width is not None:
    width = max(longest, min(width, max_width))
  prompts = np.full((len(token_lists), width), pad_id, np.int32)
  for row, tokens in enumerate(token_lists):
    prompts[row, :len(tokens)] = tokens
  return prompts, np.asarray([len(t) for t in token_lists], np.int32)


def check_request(model_config: ModelConfig, prompt_length: int, max_new_tokens: int,
                  min_new_tokens: int = 0, num_beams: int = 1, num_samples: int = 1) -> None:
  """Raises ConfigError for a request that cannot run, before anything is compiled."""
  check_settings(max_new_tokens, min_new_tokens, num_beams, num_samples)
  if prompt_length < 1:
    raise ConfigError("a prompt is empty and the tokenizer has no BOS token to start from")
  room = model_config.max_length - model_config.prefix_length  # a soft prompt takes some
  if prompt_length + max_new_tokens > room:
    raise ConfigError(
        f"a prompt of {prompt_length} tokens plus max_new_tokens={max_new_tokens} does not fit "
        f"the model's context (max_length={model_config.max_length}"
        + (f", of which the soft prompt or prefix takes {model_config.prefix_length}"
           if model_config.prefix_length else "")
        + "); shorten the prompt or ask for fewer tokens")


def check_settings(max_new_tokens: int, min_new_tokens: int = 0, num_beams: int = 1,
                   num_samples: int = 1) -> None:
  """Raises ConfigError for decoding settings that are invalid whatever the model."""
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0 <= min_new_tokens <= max_new_tokens:
    raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], "
                      f"got {min_new_tokens}")
  if num_beams < 1:
    raise ConfigError(f"num_beams must be >= 1, got {num_beams}")
  if num_samples < 1:
    raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
  if num_beams > 1 and num_samples > 1:
    raise ConfigError("num_samples > 1 samples; num_beams > 1 searches: choose one")


def _model_fns(model_config: ModelConfig, params):
  """(tokens_to_logits, prefill_to_logits) of decoding.generate for these params."""
  model = Decoder(model_config)
  params = layers.round_matmul_kernels(params, model_config)  # once, before the loop
  prefix = None  # a soft prompt's or prefix's keys and values: computed once, not per step
  if model_config.prefix_length:
    prefix = model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), prefix_only=True)

  def tokens_to_logits(tokens, positions, cache):
    return model.apply({"params": params}, tokens, positions=positions, cache=cache,
                       prefix=prefix)

  def prefill_to_logits(tokens, positions, cache, last):  # output layer at `last` only
    del positions  # decoding.prefill's are 0..T-1, which empty_cache builds itself
    return model.apply({"params": params}, tokens, cache=cache, logits_at=last,
                       empty_cache=True, prefix=prefix)

  return tokens_to_logits, prefill_to_logits


def _empty_cache(model_config: ModelConfig, prompts, max_new_tokens: int):
  return init_cache(model_config, prompts.shape[0], prompts.shape[1] + max_new_tokens,
                    jnp.dtype(model_config.dtype))


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "sampler",
                                             "eos_id", "min_new_tokens", "cache_block"))
def generate_tokens(params, prompts, prompt_lengths, rng, stop_ids=None, *,
                    model_config: ModelConfig, max_new_tokens: int, sampler, eos_id=None,
                    min_new_tokens: int = 0,
                    cache_block: int | None = None) -> decoding.DecodeResult:
  """Samples after right-padded prompts [batch, length] with a KV cache: one program.

  `cache_block`: grow the cache this many slots at a time (decoding.generate). Every step
  reads its whole cache, so this reads fewer slots, but compiles one loop body per stage:
  SmolLM2-135M, batch 64, 32 + 256 tokens, 2-core CPU: 315 -> 262 ms per token with 64,
  compile 8.7 -> 29 s. Worth it when one program decodes many batches. None: one
  full-length cache."""
  tokens_to_logits, prefill_to_logits = _model_fns(model_config, params)
  return decoding.generate(tokens_to_logits, _empty_cache(model_config, prompts, max_new_tokens),
                           prompts, prompt_lengths, max_new_tokens=max_new_tokens,
                           sampler=sampler, rng=rng, eos_id=eos_id, stop_ids=stop_ids,
                           min_new_tokens=min_new_tokens, prefill_to_logits=prefill_to_logits,
                           cache_block=cache_block, resize_cache=resize_cache)


@functools.partial(jax.jit, static_argnames=("model_config", "num_beams", "max_new_tokens",
                                             "length_penalty", "eos_id", "min_new_tokens",
                                             "cache_block"))
def beam_search_tokens(params, prompts, prompt_lengths, *, model_config: ModelConfig,
                       num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                       eos_id=None, min_new_tokens: int = 0, cache_block: int | None = None):
  """Beam search after right-padded prompts: BeamResult with the beams best first.
  `cache_block`: as in generate_tokens."""
  tokens_to_logits, prefill_to_logits = _model_fns(model_config, params)
  return decoding.beam_search(tokens_to_logits,
                              _empty_cache(model_config, prompts, max_new_tokens), prompts,
                              prompt_lengths, num_beams=num_beams, max_new_tokens=max_new_tokens,
                              length_penalty=length_penalty, eos_id=eos_id,
                              min_new_tokens=min_new_tokens,
                              cache_batch_axis=1 if model_config.scan_layers else 0,
                              prefill_to_logits=prefill_to_logits, cache_block=cache_block,
                              resize_cache=resize_cache)


@functools.partial(jax.jit, static_argnames=("model_config",))
def score_tokens(params, tokens, prompt_lengths, total_lengths, *, model_config: ModelConfig):
  """Log-likelihood of tokens[prompt_length:total_length] per row (float32 [batch])."""
  model = Decoder(model_config)
  logits_fn = lambda t: model.apply({"params": params}, t)[0]  # noqa: E731
  return decoding.continuation_logprobs(logits_fn, tokens, prompt_lengths, total_lengths)[0]


def encode_prompt(tokenizer, text: str) -> list[int]:
  """Token ids of a prompt; an empty prompt starts from BOS when the tokenizer has one."""
  ids = list(tokenizer.encode(text))
  bos = getattr(tokenizer, "bos_id", None)
  if not ids and bos is not None:
    ids = [bos]
  return ids


def encode_chat(tokenizer, text) -> list[int]:
  """Token ids of `text` sent as one user message (or of `text`, a list of {"role",
  "content"} messages: a conversation so far) through the tokenizer's chat template,
  ending with the cue for the assistant's reply. The template writes any BOS itself."""
  if not callable(getattr(tokenizer, "apply_chat_template", None)):
    raise ConfigError(f"a {type(tokenizer).__name__} has no chat template; chat needs a "
                      "pretrained chat model's tokenizer")
  messages = [{"role": "user", "content": text}] if isinstance(text, str) else list(text)
  rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  return list(tokenizer.encode(rendered, add_special_tokens=False))


def chat_reply(trained: TrainedModel, messages: list[dict], *, max_new_tokens: int, sampler,
               seed: int = 0) -> str:
  """The assistant's next turn after `messages` (a conversation of {"role", "content"}).
  The oldest turns are left out (a system message kept) while the conversation and
  max_new_tokens do not fit the context."""
  context = trained.config.max_length - trained.config.prefix_length
  if max_new_tokens < 1 or max_new_tokens >= context:
    raise ConfigError(f"max_new_tokens must be in [1, {context}) for a chat reply, got "
                      f"{max_new_tokens}")
  kept = list(messages)
  ids = encode_chat(trained.tokenizer, kept)
  while len(ids) + max_new_tokens > context:
    system = [m for m in kept[:1] if m["role"] == "system"]
    rest = kept[len(system):]
    if len(rest) <= 1:
      raise ConfigError(f"the last message alone is {len(ids)} tokens: with "
                        f"max_new_tokens={max_new_tokens} it does not fit the context "
                        f"({context} tokens)")
    kept = system + rest[1:]
    ids = encode_chat(trained.tokenizer, kept)
  ends = end_ids(trained.tokenizer)
  # Further end ids stop like --stop tokens; None keeps the program of a single-eos tokenizer.
  more_ends = np.asarray([ends[1:]], np.int32) if len(ends) > 1 else None  # [1, n]
  prompt, length = pad_prompts([ids], max_width=context - max_new_tokens)  # bucketed width
  result = generate_tokens(trained.params, prompt, length, jax.random.key(seed), more_ends,
                           model_config=trained.config, max_new_tokens=max_new_tokens,
                           sampler=sampler, eos_id=ends[0] if ends else None)
  tokens = np.asarray(result.tokens[0, :int(result.lengths[0])]).tolist()
  return trained.tokenizer.decode([t for t in tokens if t not in ends]).strip()


def end_ids(tokenizer) -> list[int]:
  """Every id that ends a sequence: eos_id, then any others (chat models often end a turn
  with their own token) from the tokenizer's `eos_ids`."""
  eos = getattr(tokenizer, "eos_id", None)
  ids = ([] if eos is None else [eos]) + list(getattr(tokenizer, "eos_ids", None) or [])
  return list(dict.fromkeys(ids))


def stop_token_ids(tokenizer, stop_strings) -> list[int]:
  """The token id of each stop string; each must be exactly one token."""
  ids = []
  for text in stop_strings:
    encoded = list(tokenizer.encode(text))
    if len(encoded) != 1:
      raise ConfigError(f"stop string {text!r} is {len(encoded)} tokens {encoded}; a stop must be "
                        "exactly one token of this tokenizer")
    ids.append(encoded[0])
  return ids


def generate_batch(trained: TrainedModel, prompts: list[str], *, max_new_tokens: int,
                   sampler=None, seed: int = 0, num_samples: int = 1, num_beams: int = 1,
                   min_new_tokens: int = 0, stop: tuple[str, ...] = (),
                   length_penalty: float = 1.0, chat: bool = False,
                   batch_size: int = 64) -> list[dict]:
  """Completes every prompt, `batch_size` prompts per call. Returns, per prompt,
  {"prompt", "samples": [{"text", "tokens", "logprob"}, ...]} with num_samples samples
  (or num_beams beams, best first).

  With `chat`, each prompt is sent as a user message through the tokenizer's chat template
  and the reply is generated. Every end-of-sequence id of the tokenizer stops a sample.
  Calls as in `generate_ids`.
  """
  tokenizer = trained.tokenizer
  encode = encode_chat if chat else encode_prompt
  stop_ids = stop_token_ids(tokenizer, stop) + end_ids(tokenizer)[1:]
  eos_id = getattr(tokenizer, "eos_id", None)
  per_prompt = generate_ids(
      trained, [encode(tokenizer, p) for p in prompts], max_new_tokens=max_new_tokens,
      sampler=decoding.Greedy() if sampler is None else sampler, seed=seed,
      num_samples=num_samples, num_beams=num_beams, min_new_tokens=min_new_tokens,
      stop_ids=stop_ids, eos_id=eos_id, length_penalty=length_penalty, batch_size=batch_size)
  outputs = []
  for prompt, candidates in zip(prompts, per_prompt):
    samples = []
    for row_tokens, length, logprob in candidates:
      ids = row_tokens[:length].tolist()
      text_ids = ids[:-1] if ids and (ids[-1] == eos_id or ids[-1] in stop_ids) else ids
      samples.append({"text": tokenizer.decode(text_ids), "tokens": ids,
                      "logprob": float(logprob)})
    outputs.append({"prompt": prompt, "samples": samples})
  return outputs


def generate_ids(trained: TrainedModel, token_lists, *, max_new_tokens: int, sampler,
                 seed: int = 0, num_samples: int = 1, num_beams: int = 1,
                 min_new_tokens: int = 0, stop_ids=(), eos_id=None, length_penalty: float = 1.0,
                 batch_size: int = 64) -> list[list[tuple]]:
  """Per prompt (token ids), [(tokens, length, logprob or beam score)] for each sample or
  beam (best first), with progress shown.

  Each call holds `batch_size` prompts (the last one padded with copies), so a long list
  compiles one program per prompt bucket; the first call samples with key(seed), call i
  with fold_in(key(seed), i). Every row decodes as it would alone.
  """
  if batch_size < 1:
    raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
  for tokens in token_lists:
    check_request(trained.config, len(tokens), max_new_tokens, min_new_tokens, num_beams,
                  num_samples)
  batch_size = min(batch_size, len(token_lists))
  how = f"beam search ({num_beams} beams)" if num_beams > 1 else "decoding"
  per_prompt = []
  with progress.Progress(how, len(token_lists), unit="prompts") as shown:
    for call, first in enumerate(range(0, len(token_lists), batch_size)):
      chunk = list(token_lists[first:first + batch_size])
      padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape for every call
      rng = jax.random.key(seed)
      rng = rng if call == 0 else jax.random.fold_in(rng, call)
      per_prompt += _generate_call(trained, padded, rng, max_new_tokens=max_new_tokens,
                                   sampler=sampler, num_samples=num_samples,
                                   num_beams=num_beams, min_new_tokens=min_new_tokens,
                                   stop_ids=list(stop_ids), eos_id=eos_id,
                                   length_penalty=length_penalty)[:len(chunk)]
      shown.update(len(chunk))
  return per_prompt


def _generate_call(trained: TrainedModel, token_lists, rng, *, max_new_tokens, sampler,
                   num_samples, num_beams, min_new_tokens, stop_ids, eos_id, length_penalty):
  """One compiled call over `token_lists`: per prompt, [(tokens, length, logprob or
  score)] for each sample or beam."""
  config = trained.config
  repeated = [t for t in token_lists for _ in range(num_samples)]
  room = config.max_length - config.prefix_length - max_new_tokens
  prompt_array, lengths = pad_prompts(repeated, max_width=room)
  if num_beams > 1:
    result = beam_search_tokens(trained.params, prompt_array, lengths, model_config=config,
                                num_beams=num_beams, max_new_tokens=max_new_tokens,
                                length_penalty=length_penalty, eos_id=eos_id,
                                min_new_tokens=min_new_tokens)
    tokens, out_lengths, scores = (np.asarray(result.tokens), np.asarray(result.lengths),
                                   np.asarray(result.scores))
    return [[(tokens[i, b], out_lengths[i, b], scores[i, b]) for b in range(num_beams)]
            for i in range(len(token_lists))]
  stop_array = np.full((len(repeated), max(1, len(stop_ids))), -1, np.int32)
  stop_array[:, :len(stop_ids)] = stop_ids
  result = generate_tokens(trained.params, prompt_array, lengths, rng, stop_array,
                           model_config=config, max_new_tokens=max_new_tokens,
                           sampler=sampler, eos_id=eos_id, min_new_tokens=min_new_tokens)
  tokens, out_lengths = np.asarray(result.tokens), np.asarray(result.lengths)
  logprob = np.asarray(result.logprobs).sum(axis=1)
  rows = [(tokens[r], out_lengths[r], logprob[r]) for r in range(len(repeated))]
  return [rows[i * num_samples:(i + 1) * num_samples] for i in range(len(token_lists))]


def complete(trained: TrainedModel, prompt: str, *, max_new_tokens: int, sampler,
             seed: int = 0, chat: bool = False) -> str:
  """The text generated after `prompt` (the prompt itself not included).

  With `chat`, `prompt` is sent as a user message through the chat template and the text
  is the reply.
  """
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  tokenizer = trained.tokenizer
  context = trained.config.max_length - trained.config.prefix_length  # the input's room
  ids = encode_chat(tokenizer, prompt) if chat else list(tokenizer.encode(prompt))
  if not ids:
    raise ConfigError("the prompt is empty after tokenization; give at least one token")
  keep = max(1, context // 2)
  window = ids if len(ids) < context else ids[-keep:]
  ends = end_ids(tokenizer)
  eos_id = ends[0] if ends else None
  # Further end ids stop like --stop tokens; None keeps the program of a single-eos tokenizer.
  more_ends = np.asarray([ends[1:]], np.int32) if len(ends) > 1 else None  # [1, n]
  rng = jax.random.key(seed)
  new: list[int] = []
  while len(new) < max_new_tokens:
    budget = min(max_new_tokens - len(new), context - len(window))
    rng, window_rng = jax.random.split(rng)
    result = generate_tokens(trained.params, jnp.asarray([window], jnp.int32),
                              jnp.asarray([len(window)], jnp.int32), window_rng, more_ends,
                              model_config=trained.config, max_new_tokens=budget,
                              sampler=sampler, eos_id=eos_id)
    length = int(result.lengths[0])
    chunk = np.asarray(result.tokens[0, :length]).tolist()
    new.extend(chunk)
    if eos_id is not None and chunk and chunk[-1] in ends:
      new.pop()
      break
    window = (window + chunk)[-keep:]
  return tokenizer.decode(new)
