"""AdaLoRA, bottleneck adapters, prompt and prefix tuning: their start, training (frozen
base, optimizer state), adapter-only checkpoints, merging, decoding, AdaLoRA's schedule
and pruning against the paper's definitions, and the hyper-parameters refused."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from decoder_jax import decoding, inference, peft
from decoder_jax.errors import ConfigError
from decoder_jax.model import Decoder, ModelConfig
from decoder_jax import sharding, workdir as workdir_lib
from decoder_jax.train import checkpoint, state as state_lib, steps
from test_peft import random_params

ARCH = {
    "llama": dict(family="llama", num_kv_heads=2, use_bias=False),
    "gpt2": dict(family="gpt2"),
    "llama_scan": dict(family="llama", num_kv_heads=2, scan_layers=True),
}
METHODS = {
    "adalora": dict(adalora=dict(init_rank=4, target_rank=2, t_init=2, t_final=3, delta_t=2)),
    "adapter": dict(adapter=dict(size=8)),
    "adapter_parallel": dict(adapter=dict(size=8, placement="parallel", scale=4.0)),
    "prompt": dict(prompt=dict(length=3)),
    "prefix": dict(prefix=dict(length=3, reparam_hidden=16)),
}
N_PREFIX = 3


def tiny(arch="llama", **fields) -> ModelConfig:
  return ModelConfig(**{**dict(vocab_size=64, num_layers=2, num_heads=4, width=32,
                               max_length=32), **ARCH[arch], **fields})


@functools.lru_cache(maxsize=None)
def base_params(arch):
  """Random base weights of tiny(arch) (test_peft's numpy noise: init compiles slowly)."""
  return random_params(tiny(arch), seed=1)


@functools.lru_cache(maxsize=None)
def method_setup(method, arch="llama"):
  """(method config, params: the base plus the method's fresh leaves)."""
  config = tiny(arch, **METHODS[method])
  return config, peft.init_params(config, base_params(arch), jax.random.key(2))


def logits(config, params, tokens, **kwargs):
  return np.asarray(Decoder(config).apply({"params": params}, tokens, **kwargs)[0])


TOKENS = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)


@pytest.mark.parametrize("arch", ARCH)
def test_adalora_starts_as_the_base_exactly(arch):
  config, params = method_setup("adalora", arch)
  np.testing.assert_array_equal(logits(config, params, TOKENS),
                                logits(tiny(arch), base_params(arch), TOKENS))


@pytest.mark.parametrize("method", ["adapter", "adapter_parallel"])
@pytest.mark.parametrize("arch", ARCH)
def test_adapters_start_near_the_identity(method, arch):
  """Houlsby's init (both kernels N(0, 1e-2), zero biases): each adapter's branch is
  about 1e-3 of its input, so the model is near, not exactly, the base."""
  config, params = method_setup(method, arch)
  from decoder_jax.model import layers
  h = jax.random.normal(jax.random.key(3), (2, 8, 32))
  branch = layers.Adapter(config).apply(
      layers.Adapter(config).init(jax.random.key(4), h), h)
  assert 0 < float(jnp.linalg.norm(branch) / jnp.linalg.norm(h)) < 1e-2
  base = logits(tiny(arch), base_params(arch), TOKENS)
  diff = np.abs(logits(config, params, TOKENS) - base).max()
  assert 0 < diff < 0.1 * np.abs(base).max(), diff


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", ARCH)
def test_soft_prompt_and_prefix_start_as_real_tokens_read_first(method, arch):
  """Initialised from the vocabulary (prompt) or from real-token activations (prefix), the
  model is exactly the base model reading those n tokens before the input."""
  config, params = method_setup(method, arch)
  # init_params draws the tokens with the second half of its key.
  ids = peft.prompt.sampled_ids(config, getattr(config, method).init_vocab,
                                jax.random.split(jax.random.key(2))[1])
  read_first = jnp.concatenate([jnp.broadcast_to(ids, (2, N_PREFIX)), TOKENS], axis=1)
  expected = logits(tiny(arch), base_params(arch), read_first)[:, N_PREFIX:]
  np.testing.assert_allclose(logits(config, params, TOKENS), expected, atol=2e-5, rtol=1e-5)


def trained(method, arch="llama", num_steps=4):
  """(config, start params, state after num_steps train steps, frozen half, metrics)."""
  config, params = method_setup(method, arch)
  trainable, frozen = peft.split(params, peft.trainable_predicate(config))
  tx = optax.adam(1e-2)
  if config.adalora is not None:
    # The schedule's length: at least t_init + t_final (5) plus steps to prune in.
    tx = peft.adalora.allocator(tx, config, max(num_steps, 8))
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                               opt_state=tx.init(trainable), tx=tx)
  step = jax.jit(steps.make_train_step(Decoder(config), 1, dropout=False,
                                       regularizer=peft.adalora.regularizer(config)))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (4, 13)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, frozen, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return config, params, state, frozen, losses


@pytest.mark.parametrize("method", METHODS)
def test_steps_train_the_method_only(method):
  config, params, state, frozen, losses = trained(method)
  assert losses[-1] < losses[0], losses
  mine = peft.is_method_param(config)
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  assert flat and all(mine(path) for path, _ in flat)  # the trainable half: method leaves
  n_method, n_all = peft.count(params, mine)
  assert n_method == sum(x.size for _, x in flat) and 0 < n_method < n_all
  # The frozen base is bitwise the base the method started from.
  _, start_frozen = peft.split(params, peft.trainable_predicate(config))
  for a, b in zip(jax.tree.leaves(start_frozen), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Adam's moments hold exactly the trainable leaves; the trained ones moved.
  adam = state.opt_state.inner if config.adalora is not None else state.opt_state
  assert jax.tree.structure(adam[0].mu) == jax.tree.structure(state.params)
  start, _ = peft.split(params, peft.trainable_predicate(config))
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(start),
                                                   jax.tree.leaves(state.params)))


@pytest.mark.parametrize("method", METHODS)
def test_adapter_only_checkpoint_restores_identical_logits(method, tmp_path):
  config, params, state, frozen, _ = trained(method, num_steps=2)
  directory = str(tmp_path / "adapter_only")
  checkpoint.save_params_replacing(directory, state.params)
  restored = workdir_lib.restore_params_dir(directory, sharding.abstract_like(state.params))
  saved = sum(x.size for x in jax.tree.leaves(restored))
  assert saved == peft.count(params, peft.is_method_param(config))[0]
  np.testing.assert_array_equal(logits(config, peft.combine(restored, frozen), TOKENS),
                                logits(config, peft.combine(state.params, frozen), TOKENS))


@pytest.mark.parametrize("method", ["adalora", "prefix"])
@pytest.mark.parametrize("arch", ARCH)
def test_merge_equals_unmerged(method, arch):
  config, params = method_setup(method, arch)
  # Move the method's leaves off their start so the merge has something to fold.
  keys = iter(jax.random.split(jax.random.key(5), 64))
  mine = peft.is_method_param(config)
  moved = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * jax.random.normal(next(keys), x.shape) if mine(path) else x,
      params)
  unmerged = logits(config, moved, TOKENS)
  merged, merged_config = peft.merge(moved, config)
  if method == "adalora":
    assert merged_config == tiny(arch)  # the plain model
    assert jax.tree.structure(merged) == jax.tree.structure(base_params(arch))
  else:
    assert merged_config.prefix.reparam_hidden is None
    assert set(merged["prefix"]) == {"kv"}  # the MLP is gone
  np.testing.assert_allclose(logits(merged_config, merged, TOKENS), unmerged,
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["adapter", "prompt"])
def test_methods_that_cannot_merge_say_so(method):
  config, params = method_setup(method)
  with pytest.raises(ConfigError, match="cannot be merged"):
    peft.merge(params, config)
  same_params, same_config = peft.for_inference(params, config)
  assert same_config == config and same_params is params


@pytest.mark.parametrize("method", ["prompt", "prefix", "adapter"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama_scan"])
def test_cached_decoding_matches_full_forward_on_a_ragged_batch(method, arch):
  """Greedy decoding with the KV cache (the prefix kept out of it) gives the tokens a
  full forward pass picks, for each row of a ragged batch."""
  config, params = method_setup(method, arch)
  prompts = [[5, 9, 2, 33, 7], [11, 4]]
  trained_model = inference.TrainedModel(config, params, None)
  out = inference.generate_ids(trained_model, prompts, max_new_tokens=6,
                               sampler=decoding.Greedy())
  # The reference: one compiled full forward over a fixed width, the sequence so far
  # right-padded (causal: the padding does not reach the positions read).
  width = max(map(len, prompts)) + 6
  forward = jax.jit(lambda tokens: Decoder(config).apply({"params": params}, tokens)[0])
  for prompt, [(tokens, length, *_)] in zip(prompts, out):
    seq = list(prompt)
    for _ in range(6):
      padded = np.zeros((1, width), np.int32)  # [1, width]
      padded[0, :len(seq)] = seq
      seq.append(int(np.argmax(np.asarray(forward(padded))[0, len(seq) - 1])))
    assert tokens[:length].tolist() == seq[len(prompt):]


def test_decode_request_counts_the_prefix_in_the_context():
  config, _ = method_setup("prompt")  # max_length 32, 3 soft positions
  inference.check_request(config, 20, 28, num_beams=2)
  with pytest.raises(ConfigError, match="soft prompt or prefix takes 3"):
    inference.check_request(config, 20, 29, num_beams=2)


# AdaLoRA against the paper's definitions (Zhang et al., 2023, eqs. 11-12).


def paper_budget(t, b0, bt, t_init, t_final, total):
  if t < t_init:
    return b0
  if t >= total - t_final:
    return bt
  return bt + math.floor((b0 - bt) * (1 - (t - t_init) / (total - t_init - t_final)) ** 3
                         + 1e-9)


def test_budget_follows_the_cubic_schedule():
  ada = peft.AdaLoraConfig(init_rank=12, target_rank=4, t_init=10, t_final=25, delta_t=5)
  schedule = peft.adalora.budget_schedule(ada, 7, 100)
  expected = [paper_budget(t, 84, 28, 10, 25, 100) for t in range(100)]
  assert schedule.tolist() == expected
  assert schedule[0] == 84 and schedule[-1] == 28 and np.all(np.diff(schedule) <= 0)
  prunes = peft.adalora.mask_steps(ada, 100)
  assert np.flatnonzero(prunes[:75]).tolist() == list(range(10, 75, 5))
  assert prunes[75:].all()


def test_pruning_keeps_the_highest_scores_and_ends_at_the_target():
  num_steps = 9
  config, params, state, _, _ = trained("adalora", "llama_scan", num_steps)
  modules = peft.adalora.num_triplets(config)  # 7 projections x 2 layers
  assert modules == 14
  # The last t_final steps: exactly target_rank live singular values per module on average.
  assert peft.adalora.live_singular_values(state.params) == 2 * modules
  # They are the budget's best triplets by eq. 11: EMA importance times EMA uncertainty,
  # E's score plus the mean of its P column's and Q row's.
  imp = traverse_util.flatten_dict(state.opt_state.importance)
  unc = traverse_util.flatten_dict(state.opt_state.uncertainty)
  values = traverse_util.flatten_dict(state.params)
  score = {path: np.asarray(imp[path]) * np.asarray(unc[path]) for path in imp}
  triplet, live = [], []
  for module in sorted({path[:-1] for path in score if path[-1] == "adalora_e"}):
    triplet.append(score[module + ("adalora_e",)] + score[module + ("adalora_p",)].mean(-2)
                   + score[module + ("adalora_q",)].mean(-1))  # [layers, r]
    live.append(np.asarray(values[module + ("adalora_e",)]) != 0)
  triplet = np.concatenate([t.ravel() for t in triplet])
  live = np.concatenate([x.ravel() for x in live])
  assert live.sum() == 2 * modules
  assert triplet[live].min() >= triplet[~live].max()


def test_importance_is_the_papers_smoothed_sensitivity():
  config, params = method_setup("adalora")
  trainable, _ = peft.split(params, peft.trainable_predicate(config))
  tx = peft.adalora.allocator(optax.sgd(0.0), config, 10)
  state = tx.init(trainable)
  grads = jax.tree.map(lambda p: 2.0 * jnp.ones_like(p), trainable)
  _, state = tx.update(grads, state, trainable)
  ada = config.adalora
  for p, imp, unc in zip(jax.tree.leaves(trainable), jax.tree.leaves(state.importance),
                         jax.tree.leaves(state.uncertainty)):
    sensitivity = np.abs(2.0 * np.asarray(p))
    np.testing.assert_allclose(imp, (1 - ada.beta1) * sensitivity, rtol=1e-6)
    np.testing.assert_allclose(unc, (1 - ada.beta2) * ada.beta1 * sensitivity, rtol=1e-5)


def test_orthogonality_loss_falls_during_training():
  config = tiny("llama", adalora=dict(init_rank=4, target_rank=2, t_init=2, t_final=3,
                                      delta_t=2, orth_reg=1.0))
  params = peft.init_params(config, base_params("llama"), jax.random.key(2))
  trainable, frozen = peft.split(params, peft.trainable_predicate(config))
  before = float(peft.adalora.orthogonality_loss(trainable))
  tx = peft.adalora.allocator(optax.adam(1e-2), config, 12)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                               opt_state=tx.init(trainable), tx=tx)
  step = jax.jit(steps.make_train_step(Decoder(config), 1, dropout=False,
                                       regularizer=peft.adalora.regularizer(config)))
  tokens = np.random.default_rng(0).integers(0, 64, (4, 13)).astype(np.int32)
  history = [before]
  for _ in range(12):
    state, _ = step(state, frozen, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                    jax.random.key(1))
    history.append(float(peft.adalora.orthogonality_loss(state.params)))
  assert history[-1] < 0.5 * history[0], history


# Bad hyper-parameters: refused by the config, before anything compiles.


@pytest.mark.parametrize("fields, message", [
    (dict(lora=dict(rank=0)), r"model.lora.rank must be an integer >= 1"),
    (dict(adalora=dict(init_rank=0, target_rank=0)), r"model.adalora.init_rank must be"),
    (dict(adalora=dict(init_rank=4, target_rank=8)), r"target_rank=8 exceeds init_rank=4"),
    (dict(adalora=dict(beta1=1.0)), r"beta1 must be in \[0, 1\)"),
    (dict(adapter=dict(size=0)), r"model.adapter.size must be"),
    (dict(adapter=dict(placement="inside")), r"placement must be one of"),
    (dict(adapter=dict(where=("attn", "ffn"))), r"where must name 'attn' and/or 'mlp'"),
    (dict(prompt=dict(length=0)), r"model.prompt.length must be"),
    (dict(prefix=dict(reparam_hidden=0)), r"reparam_hidden must be"),
    (dict(prefix=dict(lenght=4)), r"unknown model.prefix field\(s\) \['lenght'\]"),
    (dict(lora=dict(rank=4), prefix=dict(length=4)), r"choose one parameter-efficient"),
])
def test_bad_hyper_parameters_are_refused(fields, message):
  with pytest.raises(ConfigError, match=message):
    tiny(**fields)


def test_targets_and_context_are_checked_against_the_model():
  with pytest.raises(ConfigError, match=r"model.adalora.targets: pattern 'gate' matches no"):
    peft.check(tiny("gpt2", adalora=dict(targets=("gate",))))
  with pytest.raises(ConfigError, match=r"init_rank=20 exceeds min\(n_in, n_out\) = 16"):
    peft.check(tiny(adalora=dict(init_rank=20, target_rank=2, targets=("key",))))
  peft.check(tiny(prompt=dict(length=8)), seq_len=24)
  with pytest.raises(ConfigError, match=r"model.prompt.length=9 plus the sequence length "
                                        r"\(24\) exceeds the model's context"):
    peft.check(tiny(prompt=dict(length=9)), seq_len=24)
  ada = peft.AdaLoraConfig(t_init=5, t_final=5)
  with pytest.raises(ConfigError, match=r"t_init \(5\) \+ t_final \(5\) must be below "
                                        r"train.num_steps \(10\)"):
    peft.adalora.check_schedule(ada, 10)
