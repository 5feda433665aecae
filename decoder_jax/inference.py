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
import itertools
import os
import threading
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from decoder_jax import decoding, peft, pretrained as pretrained_lib, progress, sharding
from decoder_jax import workdir as workdir_lib
from decoder_jax.data import tasks
from decoder_jax.decoding import speculative, stop_strings
from decoder_jax.errors import ConfigError, NotFound
from decoder_jax.model import (Decoder, ModelConfig, build, init_cache, layers,
                               relayout_layers, resize_cache)
from decoder_jax.model.config import PEFT_METHODS
# Re-exported: what inference's callers load and cast.
from decoder_jax.workdir import TrainedModel, with_dtype


def load_trained(workdir: str) -> TrainedModel:
  """The latest checkpoint of a training workdir, with its model config and tokenizer.

  Only the params are read back (no optimizer is built). A run started from pretrained
  weights (config.init_from, e.g. a LoRA fine-tuning) comes back ready to decode: its
  base re-read from the source where the checkpoint holds only the trainable half, the
  method merged where it can be (peft.for_inference).
  """
  if not os.path.isdir(workdir):
    raise NotFound(f"workdir {workdir} does not exist or is not a directory")
  model_config = workdir_lib.read_model_config(workdir)
  run_config = workdir_lib.read_run_config(workdir)
  if workdir_lib.latest_step(workdir) is None:  # checked read-only: the workdir stays as it is
    raise NotFound(f"no checkpoint in {workdir_lib.checkpoints_dir(workdir)}: the run has "
                   "not saved one yet")
  tokenizer = workdir_lib.read_tokenizer(workdir)
  source = run_config.get("init_from")
  if not source:
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    abstract, _ = workdir_lib.abstract_params(build(model_config), mesh)
    params, step = workdir_lib.restore_params(workdir, abstract)
    return TrainedModel(model_config, params, tokenizer, step)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model = Decoder(model_config, num_labels=tasks.head_labels(run_config.get("task")))
  trainable, frozen = split_abstract(model, mesh)
  params, step = workdir_lib.restore_params(workdir, trainable)
  if frozen:  # a parameter-efficient run: its checkpoints hold the trainable half only
    base = laid_out_as(load_source(source, mesh), model_config, mesh)
    frozen = frozen_from(base.params, frozen, run_config.train.get("frozen_dtype"))
  # LoRA and AdaLoRA folded into the kernels, a prefix's MLP folded away; adapters and a
  # soft prompt stay in the model.
  params, model_config = peft.for_inference(peft.combine(params, frozen), model_config)
  return TrainedModel(model_config, params, tokenizer, step)


def split_abstract(model: Decoder, mesh):
  """(trainable, frozen) halves of `model`'s abstract params on `mesh`, split as training
  splits them (peft.trainable_predicate: everything is trainable without a method)."""
  abstract, _ = workdir_lib.abstract_params(model, mesh)
  return peft.split(abstract, peft.trainable_predicate(model.config))


def frozen_from(base_params, frozen_abstract, frozen_dtype: str | None = None):
  """The frozen half (`frozen_abstract`'s leaves) taken from a base model's params, placed
  as `frozen_abstract` says and cast to `frozen_dtype` (train.frozen_dtype) if set."""
  have = traverse_util.flatten_dict(base_params)
  wanted = traverse_util.flatten_dict(frozen_abstract)
  missing = [path for path in wanted if path not in have]
  if missing:
    raise ConfigError(f"the base model lacks frozen parameters the run expects: "
                      f"{['/'.join(p) for p in missing[:5]]}")
  dtype = None if frozen_dtype is None else jnp.dtype(frozen_dtype)
  shardings = {path: leaf.sharding for path, leaf in wanted.items()}
  cast = jax.jit(lambda f: {path: x.astype(dtype or wanted[path].dtype) for path, x in f.items()},
                 out_shardings=shardings)
  return traverse_util.unflatten_dict(cast({path: have[path] for path in wanted}))


def load_source(source: str, mesh) -> TrainedModel:
  """A run's starting point (config.init_from): another run's training workdir (its latest
  checkpoint) or anything decoder_jax.load_pretrained reads, placed on `mesh`."""
  path = os.path.expanduser(source)
  if workdir_lib.is_training_workdir(path):
    return load_trained(path)
  return pretrained_lib.load_pretrained(source, mesh=mesh)


def laid_out_as(start: TrainedModel, config: ModelConfig, mesh) -> TrainedModel:
  """`start` with `config` and its params laid out as `config` wants them: scanned or one
  subtree per layer, in config.param_dtype, sharded on `mesh` as a model without adapters
  (the source has none)."""
  params = relayout_layers(start.params, config.num_layers, config.scan_layers)
  plain = dataclasses.replace(config, **dict.fromkeys(PEFT_METHODS))
  cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.dtype(config.param_dtype)), p),
                 out_shardings=param_shardings(plain, mesh))
  return TrainedModel(config, cast(params), start.tokenizer)


def load_model(*, pretrained: str | None = None, workdir: str | None = None,
               dtype: str | None = None) -> TrainedModel:
  """The model of a command's --pretrained (decoder_jax.load_pretrained's sources) or
  --workdir (its latest checkpoint), run in `dtype`, with a log line saying which."""
  if pretrained:
    trained = pretrained_lib.load_pretrained(pretrained, dtype=dtype)
    logging.info("loaded %s", pretrained)
    return trained
  trained = with_dtype(load_trained(workdir), dtype)
  logging.info("loaded step %d from %s", trained.step, workdir)
  return trained


def param_shardings(model_config: ModelConfig, mesh):
  """NamedShardings laying parameters out on `mesh` as training does."""
  return workdir_lib.abstract_params(Decoder(model_config), mesh)[1]


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


def context_room(model_config: ModelConfig) -> int:
  """Positions a window of tokens may fill: max_length less a soft prompt's or prefix's."""
  return model_config.max_length - model_config.prefix_length


def check_request(model_config: ModelConfig, prompt_length: int, max_new_tokens: int,
                  min_new_tokens: int = 0, num_beams: int = 1, num_samples: int = 1) -> None:
  """Raises ConfigError for a request that cannot run, before anything is compiled.

  Sampled and greedy requests of any length run, window by window (generate_ids); beam
  search keeps its output in one window, so its max_new_tokens must leave room for at
  least one prompt token (a longer prompt keeps its last tokens)."""
  check_settings(max_new_tokens, min_new_tokens, num_beams, num_samples)
  if prompt_length < 1:
    raise ConfigError("a prompt is empty and the tokenizer has no BOS token to start from")
  room = context_room(model_config)
  if room < 2:
    raise ConfigError(f"the model's context (max_length={model_config.max_length}) leaves "
                      f"{room} positions after its soft prompt or prefix; decoding needs 2")
  if num_beams > 1 and max_new_tokens >= room:
    raise ConfigError(
        f"beam search with max_new_tokens={max_new_tokens} does not fit the model's context "
        f"(max_length={model_config.max_length}"
        + (f", of which the soft prompt or prefix takes {model_config.prefix_length}"
           if model_config.prefix_length else "")
        + f"): beams are not windowed, so ask for fewer than {room} tokens")


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


def _empty_cache(model_config: ModelConfig, rows: int, length: int):
  return init_cache(model_config, rows, length, jnp.dtype(model_config.dtype))


# decoding.generate's on_step for streamed calls: the handler registered under the call's
# tag (an int32 operand, so every streamed call shares one compiled program).
_STREAM_HANDLERS: dict[int, Callable] = {}
_STREAM_LOCK = threading.Lock()
_NEXT_TAG = itertools.count(1)


def _dispatch_stream(step, tokens, emitted, tag):
  handler = _STREAM_HANDLERS.get(int(tag))
  if handler is not None:
    handler(np.asarray(tokens), np.asarray(emitted))


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "sampler",
                                             "eos_id", "cache_block", "num_samples",
                                             "cache_length", "stream"))
def generate_tokens(params, prompts, prompt_lengths, rng, stop_ids=None, *,
                    model_config: ModelConfig, max_new_tokens: int, sampler, eos_id=None,
                    min_new_tokens=0, cache_block: int | None = None, num_samples: int = 1,
                    budgets=None, cache_length: int | None = None, stop_strings=None,
                    stop_state=None, stream: bool = False,
                    stream_tag=None) -> decoding.DecodeResult:
  """Samples after right-padded prompts [batch, length] with a KV cache: one program.

  The arguments after `eos_id` are decoding.generate's: min_new_tokens (an int or one per
  row), num_samples (rows per prompt, sharing its prefill), budgets, stop_strings and
  stop_state; `cache_length` (default prompts' width + max_new_tokens) sizes the cache
  for rows whose budgets end them sooner; `stream` (with an int32 `stream_tag`) calls the
  handler registered under the tag in _STREAM_HANDLERS with each step's tokens.

  `cache_block`: grow the cache this many slots at a time (decoding.generate). Every step
  reads its whole cache, so this reads fewer slots, but compiles one loop body per stage:
  SmolLM2-135M, batch 64, 32 + 256 tokens, 2-core CPU: 315 -> 262 ms per token with 64,
  compile 8.7 -> 29 s. Worth it when one program decodes many batches. None: one
  full-length cache."""
  tokens_to_logits, prefill_to_logits = _model_fns(model_config, params)
  length = cache_length or prompts.shape[1] + max_new_tokens
  return decoding.generate(tokens_to_logits, _empty_cache(model_config, prompts.shape[0], length),
                           prompts, prompt_lengths, max_new_tokens=max_new_tokens,
                           sampler=sampler, rng=rng, eos_id=eos_id, stop_ids=stop_ids,
                           min_new_tokens=min_new_tokens, prefill_to_logits=prefill_to_logits,
                           cache_block=cache_block, resize_cache=resize_cache,
                           num_samples=num_samples,
                           cache_batch_axis=1 if model_config.scan_layers else 0,
                           budgets=budgets, stop_strings=stop_strings, stop_state=stop_state,
                           on_step=_dispatch_stream if stream else None,
                           on_step_args=(stream_tag,))


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
                              _empty_cache(model_config, prompts.shape[0],
                                            prompts.shape[1] + max_new_tokens), prompts,
                              prompt_lengths, num_beams=num_beams, max_new_tokens=max_new_tokens,
                              length_penalty=length_penalty, eos_id=eos_id,
                              min_new_tokens=min_new_tokens,
                              cache_batch_axis=1 if model_config.scan_layers else 0,
                              prefill_to_logits=prefill_to_logits, cache_block=cache_block,
                              resize_cache=resize_cache)


@functools.partial(jax.jit, static_argnames=("model_config", "draft_config", "max_new_tokens",
                                             "num_draft", "sampler", "eos_id",
                                             "min_new_tokens"))
def speculative_tokens(params, draft_params, prompts, prompt_lengths, rng, stop_ids=None, *,
                       model_config: ModelConfig, draft_config: ModelConfig,
                       max_new_tokens: int, num_draft: int, sampler, eos_id=None,
                       min_new_tokens: int = 0):
  """Speculative decoding (decoding.speculative) after right-padded prompts: the draft
  model (draft_config, draft_params) proposes num_draft tokens, the target keeps those
  its own sampler would have drawn. SpeculativeResult, with acceptance counts."""
  target_fn, target_prefill = _model_fns(model_config, params)
  draft_fn, draft_prefill = _model_fns(draft_config, draft_params)
  rows, length = prompts.shape[0], prompts.shape[1] + max_new_tokens + num_draft
  return speculative.speculative_generate(
      target_fn, draft_fn, _empty_cache(model_config, rows, length),
      _empty_cache(draft_config, rows, length), prompts, prompt_lengths,
      max_new_tokens=max_new_tokens, num_draft=num_draft, sampler=sampler, rng=rng,
      eos_id=eos_id, stop_ids=stop_ids, min_new_tokens=min_new_tokens,
      target_prefill=target_prefill, draft_prefill=draft_prefill)


def self_draft(trained: TrainedModel, num_layers: int) -> TrainedModel:
  """The target's first `num_layers` blocks with its embeddings, final norm and head: a
  draft that needs no training (its parameters are the target's, not copies)."""
  config = trained.config
  if not 1 <= num_layers < config.num_layers:
    raise ConfigError(f"a self-draft takes 1..{config.num_layers - 1} of the model's "
                      f"{config.num_layers} layers, got {num_layers}")
  if config.prefix_length:
    raise ConfigError("a self-draft of a model with a soft prompt or prefix is not supported; "
                      "merge or drop the method, or give a separate draft model")
  params = dict(trained.params)
  if config.scan_layers:  # blocks stacked on a leading [layers] axis
    params["blocks"] = jax.tree.map(lambda a: a[:num_layers], params["blocks"])
  else:
    for i in range(num_layers, config.num_layers):
      del params[f"block_{i}"]
  return dataclasses.replace(trained, config=dataclasses.replace(config, num_layers=num_layers),
                             params=params)


def check_draft(trained: TrainedModel, draft: TrainedModel, prompt_length: int,
                max_new_tokens: int, num_draft: int) -> None:
  """Refuses a draft that cannot serve this target and request, before compiling."""
  if draft.config.vocab_size != trained.config.vocab_size:
    raise ConfigError(f"the draft model's vocabulary has {draft.config.vocab_size} tokens, the "
                      f"target's {trained.config.vocab_size}; they must share a tokenizer")
  if num_draft < 1:
    raise ConfigError(f"num_draft must be >= 1, got {num_draft}")
  room = min(context_room(trained.config), context_room(draft.config))
  if prompt_length + max_new_tokens + num_draft > room:
    raise ConfigError(
        f"a prompt of {prompt_length} tokens, max_new_tokens={max_new_tokens} and "
        f"num_draft={num_draft} do not fit the context ({room} positions): speculative "
        "decoding is not windowed; shorten the prompt or ask for fewer tokens")


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


class Candidate(NamedTuple):
  """One sample (or beam) of a prompt."""
  tokens: np.ndarray  # int32 [length]: the generated ids, the stop token included
  length: int
  logprob: float  # summed log-probability (a beam: its length-penalised score)
  stopped: bool  # ended on an end/stop token or a stop string, not on max_new_tokens


def sample_keys(seed: int, num_samples: int):
  """The key of each sample of a prompt: a row's draws depend on its seed and sample index
  only, never on the rest of its batch."""
  base = jax.random.key(seed)
  return [base if j == 0 else jax.random.fold_in(base, j) for j in range(num_samples)]


def build_stop_strings(tokenizer, stop: tuple[str, ...]):
  """The stop-string table for `stop` (None when there are none)."""
  if not stop:
    return None
  return stop_strings.build_table(_token_bytes(tokenizer), list(stop))


@functools.lru_cache(maxsize=4)
def _token_bytes_cached(tokenizer):
  return tuple(stop_strings.token_bytes(tokenizer))


def _token_bytes(tokenizer):
  try:
    return _token_bytes_cached(tokenizer)
  except TypeError:  # an unhashable tokenizer
    return stop_strings.token_bytes(tokenizer)


def generate_batch(trained: TrainedModel, prompts: list, *, max_new_tokens: int,
                   sampler=None, seed=0, num_samples: int = 1, num_beams: int = 1,
                   min_new_tokens: int = 0, stop: tuple[str, ...] = (),
                   length_penalty: float = 1.0, chat: bool = False, batch_size: int = 64,
                   on_token: Callable[[int, int], None] | None = None,
                   draft: TrainedModel | None = None, num_draft: int = 4) -> list[dict]:
  """Completes every prompt, `batch_size` prompts per call. Returns, per prompt,
  {"prompt", "samples": [{"text", "tokens", "logprob", "finish_reason"}, ...]} with
  num_samples samples (or num_beams beams, best first); finish_reason is "stop" (an
  end-of-sequence token or a stop string) or "length".

  With `chat`, each prompt is sent as a user message (or is a list of {"role", "content"}
  messages: a conversation) through the tokenizer's chat template and the reply is
  generated. Every end-of-sequence id of the tokenizer stops a sample. `stop`: strings of
  any length; the text is cut before the first one, found in the text after the first
  min_new_tokens tokens. `seed`: one for all prompts or one per prompt. `on_token(prompt
  index, token id)` is called on a host thread as each token is produced (one sample per
  prompt; the stop string's tokens included). Calls as in `generate_ids`.
  """
  tokenizer = trained.tokenizer
  encode = encode_chat if chat else encode_prompt
  if any(not text for text in stop):
    raise ConfigError("a stop string is empty; give at least one character")
  table = build_stop_strings(tokenizer, tuple(stop))
  ends = end_ids(tokenizer)
  eos_id = getattr(tokenizer, "eos_id", None)
  per_prompt = generate_ids(
      trained, [encode(tokenizer, p) for p in prompts], max_new_tokens=max_new_tokens,
      sampler=decoding.Greedy() if sampler is None else sampler, seed=seed,
      num_samples=num_samples, num_beams=num_beams, min_new_tokens=min_new_tokens,
      stop_ids=ends[1:] if eos_id is not None else ends, eos_id=eos_id,
      length_penalty=length_penalty, batch_size=batch_size, stop_strings=table,
      on_token=on_token, draft=draft, num_draft=num_draft)
  outputs = []
  for prompt, candidates in zip(prompts, per_prompt):
    samples = []
    for candidate in candidates:
      ids = candidate.tokens[:candidate.length].tolist()
      samples.append({"text": _sample_text(tokenizer, ids, ends, stop, min_new_tokens,
                                           candidate.stopped),
                      "tokens": ids, "logprob": float(candidate.logprob),
                      "finish_reason": "stop" if candidate.stopped else "length"})
    outputs.append({"prompt": prompt, "samples": samples})
  return outputs


def _sample_text(tokenizer, ids: list[int], ends, stop, min_new_tokens: int,
                 stopped: bool) -> str:
  """The text of a sample: without its end token, cut before a stop string."""
  if stopped and ids and ids[-1] in ends:
    return tokenizer.decode(ids[:-1])
  if stopped and stop:
    found = stop_strings.cut(_token_bytes(tokenizer), ids[min_new_tokens:], list(stop))
    if found is not None:
      head = tokenizer.decode(ids[:min_new_tokens]) if min_new_tokens else ""
      return head + found[0]
  return tokenizer.decode(ids)


def generate_ids(trained: TrainedModel, token_lists, *, max_new_tokens: int, sampler,
                 seed=0, num_samples: int = 1, num_beams: int = 1, min_new_tokens: int = 0,
                 stop_ids=(), eos_id=None, length_penalty: float = 1.0,
                 batch_size: int = 64, stop_strings=None,
                 on_token: Callable[[int, int], None] | None = None,
                 draft: TrainedModel | None = None,
                 num_draft: int = 4) -> list[list[Candidate]]:
  """Per prompt (token ids), a Candidate for each sample or beam (best first), with
  progress shown.

  Each call holds `batch_size` prompts (the last one padded with copies), so a long list
  compiles one program per prompt bucket. Every row decodes as that prompt would alone
  (complete() is this with one prompt): sample j of a prompt draws with
  sample_keys(its seed, ...)[j], and a prompt whose output outgrows the context goes on
  window by window, each window's last half the prompt of the next. Beam search keeps a
  long prompt's last tokens instead (check_request). `seed`: an int or one per prompt.
  `draft`: decode speculatively, `draft` proposing num_draft tokens at a time (the same
  distribution; greedy gives the same tokens); not windowed, without stop strings or
  streaming.
  """
  if batch_size < 1:
    raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
  seeds = [seed] * len(token_lists) if isinstance(seed, int) else list(seed)
  if len(seeds) != len(token_lists):
    raise ConfigError(f"{len(seeds)} seeds for {len(token_lists)} prompts")
  for tokens in token_lists:
    check_request(trained.config, len(tokens), max_new_tokens, min_new_tokens, num_beams,
                  num_samples)
  if on_token is not None and (num_samples > 1 or num_beams > 1):
    raise ConfigError("streaming (on_token) takes one sample per prompt, without beams")
  if draft is not None:
    if num_beams > 1 or stop_strings is not None or on_token is not None:
      raise ConfigError("speculative decoding (a draft model) takes no beams, stop strings "
                        "or streaming")
    for tokens in token_lists:
      check_draft(trained, draft, len(tokens), max_new_tokens, num_draft)
  batch_size = min(batch_size, len(token_lists))
  how = f"beam search ({num_beams} beams)" if num_beams > 1 else "decoding"
  per_prompt = []
  with progress.Progress(how, len(token_lists), unit="prompts") as shown:
    for first in range(0, len(token_lists), batch_size):
      chunk = list(token_lists[first:first + batch_size])
      pad = batch_size - len(chunk)  # copies of the last prompt: one shape for every call
      padded, chunk_seeds = chunk + [chunk[-1]] * pad, seeds[first:first + batch_size]
      chunk_seeds += [chunk_seeds[-1]] * pad
      if draft is not None:
        found = _speculative_call(trained, draft, padded, chunk_seeds, num_draft=num_draft,
                                  max_new_tokens=max_new_tokens, sampler=sampler,
                                  num_samples=num_samples, min_new_tokens=min_new_tokens,
                                  stop_ids=list(stop_ids), eos_id=eos_id)
      elif num_beams > 1:
        found = _beam_call(trained, padded, max_new_tokens=max_new_tokens,
                           num_beams=num_beams, min_new_tokens=min_new_tokens,
                           eos_id=eos_id, length_penalty=length_penalty)
      else:
        sink = None
        if on_token is not None:
          sink = lambda row, token, first=first: (  # noqa: E731
              on_token(first + row, token) if row < len(chunk) else None)
        found = _windowed_call(trained, padded, chunk_seeds, max_new_tokens=max_new_tokens,
                               sampler=sampler, num_samples=num_samples,
                               min_new_tokens=min_new_tokens, stop_ids=list(stop_ids),
                               eos_id=eos_id, stop_strings=stop_strings, on_token=sink)
      per_prompt += found[:len(chunk)]
      shown.update(len(chunk))
  return per_prompt


def _beam_call(trained: TrainedModel, token_lists, *, max_new_tokens, num_beams,
               min_new_tokens, eos_id, length_penalty) -> list[list[Candidate]]:
  """Beam search over `token_lists` in one compiled call; a prompt keeps its last tokens
  where it and max_new_tokens overflow the context."""
  room = context_room(trained.config) - max_new_tokens
  kept = [list(t)[-room:] for t in token_lists]
  prompt_array, lengths = pad_prompts(kept, max_width=room)
  result = beam_search_tokens(trained.params, prompt_array, lengths, model_config=trained.config,
                              num_beams=num_beams, max_new_tokens=max_new_tokens,
                              length_penalty=length_penalty, eos_id=eos_id,
                              min_new_tokens=min_new_tokens)
  tokens, out_lengths, scores = (np.asarray(result.tokens), np.asarray(result.lengths),
                                 np.asarray(result.scores))
  ended = lambda i, b: (eos_id is not None and out_lengths[i, b] > 0  # noqa: E731
                        and tokens[i, b, out_lengths[i, b] - 1] == eos_id)
  return [[Candidate(tokens[i, b], int(out_lengths[i, b]), float(scores[i, b]), ended(i, b))
           for b in range(num_beams)] for i in range(len(token_lists))]


def _speculative_call(trained: TrainedModel, draft: TrainedModel, token_lists, seeds, *,
                      num_draft, max_new_tokens, sampler, num_samples, min_new_tokens,
                      stop_ids, eos_id) -> list[list[Candidate]]:
  """speculative_tokens over `token_lists` in one call, the row keys of _windowed_call's."""
  rows = [t for t in token_lists for _ in range(num_samples)]
  keys = [k for s in seeds for k in sample_keys(s, num_samples)]
  # The same first split as a window of _windowed_call: the same draws for the same seed.
  keys = jax.vmap(jax.random.split)(jax.random.wrap_key_data(
      jnp.stack([jax.random.key_data(k) for k in keys])))[:, 1]
  prompt_array, lengths = pad_prompts(rows, max_width=context_room(trained.config)
                                      - max_new_tokens - num_draft)
  stop_array = np.full((len(rows), max(1, len(stop_ids))), -1, np.int32)
  stop_array[:, :len(stop_ids)] = stop_ids
  result = speculative_tokens(trained.params, draft.params, prompt_array, lengths, keys,
                              stop_array, model_config=trained.config,
                              draft_config=draft.config, max_new_tokens=max_new_tokens,
                              num_draft=num_draft, sampler=sampler, eos_id=eos_id,
                              min_new_tokens=min_new_tokens)
  tokens, out_lengths = np.asarray(result.tokens), np.asarray(result.lengths)
  logprob, stopped = np.asarray(result.logprobs).sum(axis=1), np.asarray(result.stopped)
  candidates = [Candidate(tokens[r, :out_lengths[r]], int(out_lengths[r]), float(logprob[r]),
                          bool(stopped[r])) for r in range(len(rows))]
  return [candidates[i * num_samples:(i + 1) * num_samples] for i in range(len(token_lists))]


def _windowed_call(trained: TrainedModel, token_lists, seeds, *, max_new_tokens, sampler,
                   num_samples, min_new_tokens, stop_ids, eos_id, stop_strings,
                   on_token=None) -> list[list[Candidate]]:
  """Samples for `token_lists`, each row as it would decode alone, in compiled calls of
  one shape per window: per prompt, num_samples Candidates.

  A row's first window is its prompt (or, from a prompt that fills the context, the
  prompt's last half); a window runs until the row stops, has max_new_tokens tokens or
  fills the context, and the row's next window is the last half of window + output. Each
  call decodes one window of every row still going (the others ride along, done from
  the start); rows of one call differ in length and budget, not in program.
  """
  config = trained.config
  context = context_room(config)
  keep = max(1, context // 2)
  batch, rows = len(token_lists), len(token_lists) * num_samples
  width_limit = context - 1  # a window leaves room for at least one new token
  # Every call generates at most `steps` tokens a row: the most a window can take.
  steps = min(max_new_tokens, context - 1)
  keys = [k for s in seeds for k in sample_keys(s, num_samples)]  # [rows]
  keys = jax.random.wrap_key_data(jnp.stack([jax.random.key_data(k) for k in keys]))
  stop_array = np.full((rows, max(1, len(stop_ids))), -1, np.int32)
  stop_array[:, :len(stop_ids)] = stop_ids
  new = [[] for _ in range(rows)]
  logprob = np.zeros(rows)
  stopped = np.zeros(rows, bool)
  state = None if stop_strings is None else np.zeros(
      (rows, stop_strings.lengths.shape[0]), np.int32)
  windows = [list(t) if len(t) < context else list(t)[-keep:] for t in token_lists]
  going = np.ones(rows, bool)
  first_call = True
  while going.any():
    if first_call:  # one window per prompt, its samples sharing the prefill
      call_windows, samples = windows, num_samples
    else:
      call_windows, samples = [w if g else [0] for w, g in zip(windows, going)], 1
    budgets = np.asarray([min(max_new_tokens - len(new[r]),
                              context - len(call_windows[r // samples])) if going[r] else 0
                          for r in range(rows)], np.int32)
    min_new = np.maximum(min_new_tokens - np.asarray([len(n) for n in new]), 0).astype(np.int32)
    prompt_array, lengths = pad_prompts(call_windows, max_width=width_limit)
    cache_length = min(prompt_array.shape[1] + steps, context)
    split = jax.vmap(jax.random.split)(keys)  # [rows, 2]: carried, this window's
    keys, window_keys = split[:, 0], split[:, 1]
    tag = None
    if on_token is not None:
      tag = next(_NEXT_TAG)
      with _STREAM_LOCK:
        _STREAM_HANDLERS[tag] = lambda tokens, emitted: [
            on_token(r, int(tokens[r])) for r in np.flatnonzero(emitted)]
    try:
      result = generate_tokens(
          trained.params, prompt_array, lengths, window_keys, stop_array,
          model_config=config, max_new_tokens=steps, sampler=sampler, eos_id=eos_id,
          min_new_tokens=min_new, num_samples=samples, budgets=budgets,
          cache_length=cache_length, stop_strings=stop_strings, stop_state=state,
          stream=on_token is not None, stream_tag=None if tag is None else np.int32(tag))
      tokens, out_lengths = np.asarray(result.tokens), np.asarray(result.lengths)
      jax.effects_barrier()  # every streamed token delivered before the handler goes
    finally:
      if tag is not None:
        with _STREAM_LOCK:
          _STREAM_HANDLERS.pop(tag, None)
    row_logprobs, row_stopped = np.asarray(result.logprobs).sum(axis=1), np.asarray(result.stopped)
    if stop_strings is not None:
      state = np.asarray(result.stop_state)
    next_windows = []
    for r in range(rows):
      window = call_windows[r // samples]
      if going[r]:
        chunk = tokens[r, :out_lengths[r]].tolist()
        new[r] += chunk
        logprob[r] += row_logprobs[r]
        stopped[r] = row_stopped[r]
        going[r] = not stopped[r] and len(new[r]) < max_new_tokens
        window = (window + chunk)[-keep:]
      next_windows.append(window)
    windows, first_call = next_windows, False
  candidates = [Candidate(np.asarray(new[r], np.int32), len(new[r]), float(logprob[r]),
                          bool(stopped[r])) for r in range(rows)]
  return [candidates[i * num_samples:(i + 1) * num_samples] for i in range(batch)]


def complete(trained: TrainedModel, prompt: str, *, max_new_tokens: int, sampler,
             seed: int = 0, chat: bool = False) -> str:
  """The text generated after `prompt` (the prompt itself not included): generate_batch
  with one prompt, so a prompt alone and in a batch come out the same.

  With `chat`, `prompt` is sent as a user message through the chat template and the text
  is the reply.
  """
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  ids = encode_chat(trained.tokenizer, prompt) if chat else list(trained.tokenizer.encode(prompt))
  if not ids:
    raise ConfigError("the prompt is empty after tokenization; give at least one token")
  return generate_batch(trained, [prompt], max_new_tokens=max_new_tokens, sampler=sampler,
                        seed=seed, chat=chat)[0]["samples"][0]["text"]
