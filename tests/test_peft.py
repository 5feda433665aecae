"""LoRA: identity at init, merge equivalence, target patterns, dropout, grads, config I/O."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_jax import peft
from decoder_jax.model import Decoder, ModelConfig, layers
from decoder_jax.peft import LoraConfig

FAMILIES = {
    "llama_untied": dict(family="llama", num_kv_heads=2, use_bias=False, tie_embeddings=False),
    "gpt2": dict(family="gpt2"),
    "llama_scan_remat": dict(family="llama", scan_layers=True, remat=True),
}


def tiny(**fields) -> ModelConfig:
  return ModelConfig(**{**dict(vocab_size=64, num_layers=2, num_heads=4, width=32,
                               max_length=16), **fields})


def with_lora(config: ModelConfig, **lora) -> ModelConfig:
  return dataclasses.replace(config, lora=LoraConfig(**{"rank": 4, **lora}))


def random_params(config, seed=1):
  """Base weights from numpy noise on eval_shape's shapes: Decoder.init compiles slowly on CPU."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(lambda: Decoder(config).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"])
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray((path[-1].key == "scale") + 0.1 * rng.standard_normal(s.shape),
                                  jnp.float32), shapes)


@functools.lru_cache(maxsize=None)
def setup(name):
  """(base config, LoRA config, base params, fresh LoRA params, LoRA params with b != 0, tokens)."""
  config = tiny(**FAMILIES[name])
  lora_config = with_lora(config, alpha=8.0)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, config.vocab_size)
  base = random_params(config)
  fresh = peft.init_lora_params(lora_config, base, jax.random.key(2))
  trainable, frozen = peft.split(fresh, peft.is_lora_param)
  keys = iter(jax.random.split(jax.random.key(3), 64))
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, x: (0.1 * jax.random.normal(next(keys), x.shape)
                       if path[-1].key == "lora_b" else x), trainable)
  return config, lora_config, base, fresh, peft.combine(trainable, frozen), tokens


def logits(config, params, tokens, **kwargs):
  return np.asarray(Decoder(config).apply({"params": params}, tokens, **kwargs)[0])


def lora_modules(params) -> list[str]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sorted({"/".join(k.key for k in path[:-1]) for path, _ in flat
                 if path[-1].key == "lora_a"})


@pytest.mark.parametrize("name", FAMILIES)
def test_fresh_adapters_leave_outputs_unchanged(name):
  config, lora_config, base, fresh, _, tokens = setup(name)
  prefix = "blocks" if config.scan_layers else "block_0"
  names = ["down", "key", "out", "query", "up", "value"] + (["gate"] * (config.family == "llama"))
  assert set(lora_modules(fresh)) >= {f"{prefix}/{'mlp' if n in ('up', 'down', 'gate') else 'attn'}/{n}"
                                      for n in names}
  assert "lm_head" not in lora_modules(fresh)  # only a pattern naming it targets the head
  np.testing.assert_array_equal(logits(lora_config, fresh, tokens), logits(config, base, tokens))


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_matches_unmerged(name):
  config, lora_config, base, _, trained, tokens = setup(name)
  unmerged = logits(lora_config, trained, tokens)
  assert np.abs(unmerged - logits(config, base, tokens)).max() > 1e-3  # the adapters act
  merged_params, merged_config = peft.merge(trained, lora_config)
  assert merged_config == config
  assert jax.tree.structure(merged_params) == jax.tree.structure(base)
  np.testing.assert_allclose(logits(merged_config, merged_params, tokens), unmerged,
                             atol=1e-5, rtol=1e-5)


def test_patterns_select_modules():
  config = tiny(**FAMILIES["llama_untied"])
  assert peft.check_targets(with_lora(config, targets=("query",)), None) == [
      "block_0/attn/query", "block_1/attn/query"]
  assert peft.check_targets(with_lora(config, targets=("block_1/mlp/.*", "lm_head")), None) == [
      "block_1/mlp/down", "block_1/mlp/gate", "block_1/mlp/up", "lm_head"]
  scanned = with_lora(tiny(family="llama", scan_layers=True), targets=("attn/(query|value)",))
  assert peft.check_targets(scanned, None) == ["blocks/attn/query", "blocks/attn/value"]
  # The model applies the same selection; scanned adapters are stacked on the layer axis.
  shapes = jax.eval_shape(lambda: Decoder(scanned).init(jax.random.key(0),
                                                        jnp.zeros((1, 1), jnp.int32)))
  attn = nn.unbox(shapes["params"])["blocks"]["attn"]
  assert attn["query"]["lora_a"].shape == (2, 32, 4)
  assert attn["value"]["lora_b"].shape == (2, 4, 32)
  assert "lora_a" not in attn["key"] and "lora_a" not in attn["out"]


def test_pattern_matching_nothing_is_a_clear_error():
  with pytest.raises(ValueError, match=r"'atn/query' matches no Dense module.*'attn/query'"):
    peft.check_targets(with_lora(tiny(), targets=("query", "atn/query")), None)
  with pytest.raises(ValueError, match="'gate' matches no"):  # gpt2 has no gate
    peft.check_targets(with_lora(tiny(family="gpt2"), targets=("gate",)), None)


def test_rank_and_field_validation():
  config = tiny(**FAMILIES["llama_untied"])  # key/value project 32 -> 2 heads * 8 = 16
  with pytest.raises(ValueError, match=r"rank=20 exceeds .* 16 of block_0/attn/key"):
    peft.check_targets(with_lora(config, rank=20, targets=("key",)), None)
  assert peft.check_targets(with_lora(config, rank=20, targets=("query",)), None)  # 32 wide
  for bad, message in [(dict(rank=0), "rank"), (dict(rank=2.5), "rank"),
                       (dict(rank=4, alpha=0.0), "alpha"), (dict(rank=4, dropout=1.0), "dropout"),
                       (dict(rank=4, targets=()), "empty"), (dict(rank=4, targets=("(",)), "regex")]:
    with pytest.raises(ValueError, match=message):
      LoraConfig(**bad)


def test_base_params_must_fit_the_config():
  config, lora_config, base, *_ = setup("llama_untied")
  assert len(peft.check_targets(lora_config, base)) == 14
  scanned = with_lora(dataclasses.replace(config, scan_layers=True))
  with pytest.raises(ValueError, match="no kernel at blocks/attn/key"):
    peft.check_targets(scanned, base)
  with pytest.raises(ValueError, match="already hold lora leaves"):
    peft.init_lora_params(lora_config, setup("llama_untied")[3], jax.random.key(0))


class _Proj(nn.Module):
  """One targeted Dense 6 -> (2, 3) under the module path ("proj",)."""
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    return layers.dense((2, 3), ("embed", "heads", "kv"), self.config, 0.02, "proj",
                        deterministic=self.deterministic)(x)


@pytest.mark.parametrize("rslora, scaling", [(False, 2.0), (True, 4.0)])
def test_scaling_and_dropout(rslora, scaling):
  config = tiny(width=6, num_heads=2, lora=LoraConfig(rank=4, alpha=8.0, dropout=0.5,
                                                      targets=("proj",), rslora=rslora))
  assert config.lora.scaling == scaling
  x = jax.random.normal(jax.random.key(0), (5, 6))
  params = _Proj(config).init(jax.random.key(1), x)["params"]["proj"]
  params = nn.unbox(params)
  params["lora_b"] = jax.random.normal(jax.random.key(2), (4, 6))
  kernel, a, b = (np.asarray(params[k], np.float64) for k in ("kernel", "lora_a", "lora_b"))
  assert np.abs(a).max() <= 1 / np.sqrt(6)  # kaiming-uniform bound 1/sqrt(n_in)
  want = (np.asarray(x) @ kernel.reshape(6, 6) + scaling * np.asarray(x) @ a @ b).reshape(5, 2, 3)
  run = lambda det, seed: np.asarray(_Proj(config, det).apply(
      {"params": {"proj": params}}, x, rngs={"dropout": jax.random.key(seed)}))
  np.testing.assert_allclose(run(True, 0), want, atol=1e-5)
  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  assert np.abs(run(False, 0) - run(False, 1)).max() > 1e-3


def test_decoder_threads_deterministic_to_lora_dropout():
  _, lora_config, _, _, trained, tokens = setup("llama_untied")
  config = dataclasses.replace(lora_config,
                               lora=dataclasses.replace(lora_config.lora, dropout=0.5))
  run = lambda det, seed: logits(config, trained, tokens, deterministic=det,
                                 rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  np.testing.assert_array_equal(run(True, 0), logits(lora_config, trained, tokens))
  assert np.abs(run(False, 0) - run(False, 1)).max() > 1e-4


def test_split_combine_and_grads():
  _, lora_config, _, fresh, trained, tokens = setup("llama_untied")
  trainable, frozen = peft.split(trained, peft.is_lora_param)
  assert all(peft.is_lora_param(path) for path in
             [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]])
  assert "embed" in frozen and "lora_a" not in frozen["block_0"]["attn"]["query"]
  back = peft.combine(trainable, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(trained)
  assert all(x is y for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trained)))
  with pytest.raises(ValueError, match="in both halves"):
    peft.combine(trainable, trainable)

  @jax.jit
  @jax.grad
  def grad(t, f):  # w.r.t. the trainable half only
    out = Decoder(lora_config).apply({"params": peft.combine(t, f)}, tokens)[0]
    return jnp.mean(jax.nn.log_softmax(out)[..., 0])

  grads = grad(trainable, frozen)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  query = grads["block_0"]["attn"]["query"]
  assert np.abs(query["lora_a"]).max() > 0 and np.abs(query["lora_b"]).max() > 0
  # At init b = 0, so no gradient reaches a yet (as in PEFT); b's gradient is non-zero.
  init_grads = grad(*peft.split(fresh, peft.is_lora_param))["block_0"]["mlp"]["up"]
  assert np.abs(init_grads["lora_a"]).max() == 0 and np.abs(init_grads["lora_b"]).max() > 0


def test_split_with_a_head_and_count():
  _, _, _, fresh, _, _ = setup("llama_untied")
  params = {**fresh, "cls_head": {"kernel": jnp.zeros((32, 3))}}
  head_too = lambda path, leaf: peft.is_lora_param(path) or path[0] == "cls_head"
  trainable, frozen = peft.split(params, head_too)
  assert set(trainable) == {"block_0", "block_1", "cls_head"} and "cls_head" not in frozen
  lora, total = peft.count(fresh, peft.is_lora_param)
  rank = 4  # per layer: q, o (32 <-> 32), k, v (32 -> 16), gate, up (32 -> 128), down (128 -> 32)
  per_layer = rank * (2 * (32 + 32) + 2 * (32 + 16) + 2 * (32 + 128) + (128 + 32))
  assert lora == 2 * per_layer
  assert total == lora + sum(x.size for x in jax.tree.leaves(setup("llama_untied")[2]))
  assert peft.count(params, head_too)[0] == lora + 96


def test_config_round_trips_through_json():
  config = tiny(lora=LoraConfig(rank=8, alpha=32.0, dropout=0.1, rslora=True,
                                targets=("query", "block_(0|1)/mlp/.*")))
  values = json.loads(json.dumps(config.to_dict()))
  assert values["lora"]["targets"] == ["query", "block_(0|1)/mlp/.*"]
  back = ModelConfig.from_dict(values)
  assert back == config and hash(back) == hash(config)
  assert back.lora.targets == ("query", "block_(0|1)/mlp/.*")
  assert ModelConfig.from_dict(tiny().to_dict()).lora is None
  with pytest.raises(ValueError, match=r"unknown model.lora field\(s\) \['rnak'\].*'rank'"):
    ModelConfig.from_dict({**values, "lora": {"rnak": 8}})


def test_save_hf_refuses_unmerged_adapters(tmp_path):
  from decoder_jax.interop import hf
  with pytest.raises(ValueError, match="peft.merge"):
    hf.save_hf(tmp_path, with_lora(tiny(family="llama")), {})
