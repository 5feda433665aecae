"""Both model families: shapes, causality, KV-cache equivalence, config validation."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_jax.model import Decoder, ModelConfig, init_cache

FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama_gqa": dict(family="llama", num_kv_heads=2, use_bias=False),
    "llama_scan_remat": dict(family="llama", num_kv_heads=1, scan_layers=True, remat=True),
    "gpt2_untied": dict(family="gpt2", tie_embeddings=False, use_bias=False),
}
# The written-out attention: equal to the others (below), so only its cache path is added.
CACHED = {**FAMILIES, "llama_gqa_einsum": dict(family="llama", num_kv_heads=2, use_bias=False,
                                               attention_impl="einsum")}
# bfloat16 matmul operands round: its cache path is compared with a looser tolerance.
MIXED = dict(family="llama", num_kv_heads=2, use_bias=False, attention_impl="einsum",
             matmul_dtype="bfloat16")


def tiny(**fields) -> ModelConfig:
  return ModelConfig(**{**dict(vocab_size=23, num_layers=2, num_heads=4, width=32,
                               max_length=24), **fields})


def init(config, batch=3, length=12, seed=0):
  model = Decoder(config)
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)
  params = nn.unbox(model.init(jax.random.key(seed + 1), tokens)["params"])
  return model, params, tokens


@pytest.mark.parametrize("fields", FAMILIES.values(), ids=FAMILIES.keys())
def test_output_shape_and_finite(fields):
  model, params, tokens = init(tiny(**fields))
  logits, cache = model.apply({"params": params}, tokens)
  assert logits.shape == (3, 12, 23)
  assert cache is None
  assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("fields", FAMILIES.values(), ids=FAMILIES.keys())
def test_causality(fields):
  model, params, tokens = init(tiny(**fields))
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 23)
  before, _ = model.apply({"params": params}, tokens)
  after, _ = model.apply({"params": params}, changed)
  np.testing.assert_array_equal(np.asarray(before[:, :t]), np.asarray(after[:, :t]))
  assert not np.allclose(before[:, t:], after[:, t:])  # the change is visible from t on


@pytest.mark.parametrize("fields, tolerance", [(f, 1e-5) for f in CACHED.values()] +
                         [(MIXED, 2e-2)], ids=list(CACHED) + ["llama_gqa_einsum_bf16_matmuls"])
def test_cached_prefill_and_steps_match_full_forward(fields, tolerance):
  config = tiny(**fields)
  model, params, tokens = init(config)
  full, _ = model.apply({"params": params}, tokens)
  cache = init_cache(config, 3, 16)
  logits, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
  pieces = [logits]
  for t in range(5, 12):
    step_logits, cache = model.apply({"params": params}, tokens[:, t:t + 1],
                                     positions=jnp.full((3, 1), t, jnp.int32), cache=cache)
    pieces.append(step_logits)
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=tolerance, rtol=tolerance)


def test_parameter_names_and_shapes():
  _, params, _ = init(tiny(family="llama", num_kv_heads=2))
  block = params["block_0"]
  assert block["attn"]["query"]["kernel"].shape == (32, 4, 8)
  assert block["attn"]["key"]["kernel"].shape == (32, 2, 8)
  assert set(block["mlp"]) == {"gate", "up", "down"}
  assert "pos_embed" not in params  # RoPE: no learned position table
  _, gpt_params, _ = init(tiny(family="gpt2"))
  assert gpt_params["pos_embed"].shape == (24, 32)
  assert "lm_head" not in gpt_params  # tied embeddings


def test_bfloat16_compute_keeps_float32_params():
  model, params, tokens = init(tiny(dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits, _ = model.apply({"params": params}, tokens)
  assert logits.dtype == jnp.bfloat16


@pytest.mark.parametrize("fields, message", [
    (dict(width=30, num_heads=4), "divisible by model.num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "divisible by model.num_kv_heads"),
    (dict(family="mamba"), "model.family"),
    (dict(dropout=1.5), "dropout"),
    (dict(matmul_dtype="float16"), "model.matmul_dtype"),
])
def test_bad_config_is_a_clear_error(fields, message):
  with pytest.raises(ValueError, match=message):
    tiny(**fields)


def test_unknown_field_is_rejected():
  with pytest.raises(ValueError, match="unknown model config field"):
    ModelConfig.from_dict({"widht": 32})


def test_einsum_attention_equals_dot_product_attention_with_equal_gradients():
  config = tiny(family="llama", num_kv_heads=2, use_bias=False)
  model, params, tokens = init(config)
  einsum_model = Decoder(dataclasses.replace(config, attention_impl="einsum"))

  def loss(m, p):
    logits, _ = m.apply({"params": p}, tokens)
    return (logits * jnp.linspace(-1.0, 1.0, logits.size).reshape(logits.shape)).sum()

  np.testing.assert_allclose(einsum_model.apply({"params": params}, tokens)[0],
                             model.apply({"params": params}, tokens)[0], atol=1e-5)
  grads = jax.grad(lambda p: loss(model, p))(params)
  einsum_grads = jax.grad(lambda p: loss(einsum_model, p))(params)
  for a, b in zip(jax.tree.leaves(einsum_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_auto_attention_uses_cudnn_only_where_it_applies():
  from decoder_jax.model.attention import resolve_implementation
  assert resolve_implementation("auto", "bfloat16", 64, backend="gpu") == "cudnn"
  assert resolve_implementation("auto", "float32", 64, backend="gpu") == "xla"  # fp32: no cuDNN
  assert resolve_implementation("auto", "bfloat16", 256, backend="gpu") == "xla"  # head too big
  assert resolve_implementation("auto", "bfloat16", 60, backend="gpu") == "xla"
  assert resolve_implementation("auto", "bfloat16", 64, backend="cpu") == "xla"
  assert resolve_implementation("cudnn", "float32", 64, backend="cpu") == "cudnn"  # explicit


@pytest.mark.parametrize("spec, a_shape, b_shape, g_shape", [
    ("bthd,bshd->bhts", (2, 5, 3, 8), (2, 7, 3, 8), (2, 3, 5, 7)),  # attention scores
    ("ti,io->to", (6, 8), (8, 5), (6, 5)),  # a Dense layer: its own kernel-gradient path
], ids=["attention", "dense"])
def test_mixed_einsum_rounds_operands_and_cotangent_to_bfloat16(spec, a_shape, b_shape,
                                                                 g_shape):
  from decoder_jax.model.layers import mixed_einsum
  keys = jax.random.split(jax.random.key(3), 3)
  a = jax.random.normal(keys[0], a_shape)
  b = jax.random.normal(keys[1], b_shape)
  g = jax.random.normal(keys[2], g_shape)  # cotangent of the output
  rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)

  @jax.jit  # one compile instead of one per operation
  def results(a, b, g):
    out, vjp = jax.vjp(lambda x, y: mixed_einsum(spec, x, y), a, b)
    # Reference: float32 math on bfloat16-rounded operands and cotangent.
    ref_out, ref_vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y, precision="highest"),
                               rounded(a), rounded(b))
    unrounded = jnp.einsum(spec, a, b, precision="highest")
    return out, vjp(g), ref_out, ref_vjp(rounded(g)), unrounded

  out, grads, ref_out, ref_grads, unrounded = results(a, b, g)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, ref_grads):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # ... and not the unrounded float32 result: the rounding is really there.
  assert not np.allclose(out, unrounded, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="at least two"):
    mixed_einsum("ij,jk->i", jnp.ones((2, 3)), jnp.ones((3, 4)))  # k summed within one operand


def _dot_operand_dtypes(hlo_text: str) -> list[tuple[str, str]]:
  """(lhs dtype, rhs dtype) of every dot in a compiled HLO module's text."""
  found = []
  for computation in hlo_text.split("\n\n"):
    types = dict(re.findall(r"%([\w.-]+) = (\w+)\[", computation))
    # A fused computation declares its parameters in its first line: (param_0: bf16[...]).
    types.update(re.findall(r"([\w.-]+): (\w+)\[", computation.split("\n", 1)[0]))
    found += [(types.get(lhs), types.get(rhs))
              for lhs, rhs in re.findall(r" dot\(%([\w.-]+), %([\w.-]+)\)", computation)]
  return found


def test_dense_kernel_gradient_is_a_bfloat16_dot_on_cpu():
  """The Dense kernel gradient a.T @ g runs as a bfloat16 dot on CPU (layers.
  _transposed_copy), as the forward product does: XLA would otherwise upcast it to a
  float32 dot several times slower. Its value holds whatever the kernel holds (the copy's
  always-true predicate reads a kernel element, here a NaN)."""
  from decoder_jax.model.layers import mixed_einsum
  if jax.default_backend() != "cpu":
    pytest.skip("checks XLA's CPU backend")
  x = jax.random.normal(jax.random.key(0), (48, 32))  # [tokens, in]
  w = jax.random.normal(jax.random.key(1), (32, 16))  # [in, out]
  g = jax.random.normal(jax.random.key(2), (48, 16))  # cotangent [tokens, out]
  kernel_grad = jax.jit(lambda x, w, g: jax.vjp(
      lambda w: mixed_einsum("ti,io->to", x, w), w)[1](g)[0])
  forward = jax.jit(lambda x, w: mixed_einsum("ti,io->to", x, w))
  forward_dots = _dot_operand_dtypes(forward.lower(x, w).compile().as_text())
  if forward_dots != [("bf16", "bf16")]:
    pytest.skip(f"this CPU's XLA runs the forward product as {forward_dots}, not in bfloat16")
  assert _dot_operand_dtypes(kernel_grad.lower(x, w, g).compile().as_text()) == [
      ("bf16", "bf16")]
  rounded = lambda v: np.asarray(v.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  want = rounded(x).T @ rounded(g)
  np.testing.assert_allclose(kernel_grad(x, w, g), want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(kernel_grad(x, w.at[0, 0].set(jnp.nan), g), want, rtol=1e-5,
                             atol=1e-4)


def test_bfloat16_matmuls_train_like_float32():
  """matmul_dtype="bfloat16" (float32 compute): float32 logits and params, and loss and
  gradients within bfloat16 rounding of the float32 model's."""
  config = tiny(**{**MIXED, "matmul_dtype": None})
  model, params, tokens = init(config)
  mixed = Decoder(dataclasses.replace(config, matmul_dtype="bfloat16"))

  def loss(m, p):
    logits, _ = m.apply({"params": p}, tokens)
    return -jax.nn.log_softmax(logits)[..., 0].mean(), logits

  (value, logits), grads = jax.value_and_grad(lambda p: loss(model, p), has_aux=True)(params)
  (mixed_value, mixed_logits), mixed_grads = jax.value_and_grad(
      lambda p: loss(mixed, p), has_aux=True)(params)
  assert mixed_logits.dtype == jnp.float32
  assert not np.array_equal(mixed_logits, logits)  # the bfloat16 path was taken
  np.testing.assert_allclose(mixed_logits, logits, atol=3e-2)
  np.testing.assert_allclose(mixed_value, value, rtol=1e-2)
  flat, mixed_flat = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
                      for t in (grads, mixed_grads))
  cosine = flat @ mixed_flat / (jnp.linalg.norm(flat) * jnp.linalg.norm(mixed_flat))
  assert cosine > 0.999, cosine


@pytest.mark.parametrize("bf16_operands", [False, True], ids=["float32", "bf16_operands"])
def test_one_token_cache_attention_equals_the_einsum_path(bf16_operands):
  """The one-token step's multiply-and-sum (attention.attend_cache) equals the two-einsum
  attention on the same cache, and the cache layout [batch, kv_heads, slots, head_dim]
  equals the [batch, slots, kv_heads, head_dim] one."""
  from decoder_jax.model import attention
  keys = jax.random.split(jax.random.key(5), 3)
  q = jax.random.normal(keys[0], (3, 1, 4, 8))  # [b, 1, heads, d]
  k, v = (jax.random.normal(key, (3, 2, 6, 8)) for key in keys[1:])  # [b, kv, slots, d]
  if bf16_operands:  # as _write stores them
    k, v = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in (k, v))
  positions = jnp.array([0, 3, 5])  # one row sees 1 slot, one all 6
  mask = (jnp.arange(6)[None, :] <= positions[:, None])[:, None, :]  # [b, 1, slots]
  step = jax.jit(attention.attend_cache, static_argnums=4)(q, k, v, mask, bf16_operands)
  einsum = attention.einsum_attention(q, k, v, mask, bf16_operands, kv_layout="bksd")
  other_layout = attention.einsum_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask,
                                            bf16_operands)
  np.testing.assert_allclose(step, einsum, atol=1e-6)
  np.testing.assert_allclose(other_layout, einsum, atol=1e-6)
  # Row 0 sees only slot 0: its output is v at slot 0 of its kv head.
  np.testing.assert_allclose(step[0, 0, :2], jnp.broadcast_to(v[0, 0, 0], (2, 8)), atol=1e-6)
  with pytest.raises(ValueError, match="kv_layout"):
    attention.einsum_attention(q, k, v, mask, kv_layout="bdks")


def test_round_matmul_kernels_rounds_once_what_each_matmul_would():
  from decoder_jax.model.layers import round_matmul_kernels
  config = tiny(**MIXED)
  model, params, tokens = init(config)
  rounded = round_matmul_kernels(params, config)
  paths = jax.tree_util.tree_flatten_with_path(rounded)[0]
  assert {x.dtype for p, x in paths if p[-1].key == "kernel"} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for p, x in paths if p[-1].key != "kernel"} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(model.apply({"params": rounded}, tokens)[0],
                             model.apply({"params": params}, tokens)[0], atol=1e-6)
  plain = tiny(**{**MIXED, "matmul_dtype": None})
  assert round_matmul_kernels(params, plain) is params  # float32 matmuls: untouched
