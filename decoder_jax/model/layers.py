"""Building blocks shared by both families: norms, MLPs, embeddings, rotary positions.

Every parameter is created with logical axis names (`embed`, `mlp`, `vocab`, ...); the
training code maps those names onto mesh axes with one rules table.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoder_jax.model import norms
from decoder_jax.model.config import ModelConfig


def dtype_of(name: str):
  return jnp.dtype(name)


def normal_init(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def zeros_init(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def residual_std(config: ModelConfig) -> float:
  # Projections that write into the residual stream are scaled down with depth so the
  # stream's variance does not grow with the number of layers (GPT-2 paper, sec. 2.3).
  return config.init_std / (2 * config.num_layers) ** 0.5


def norm(config: ModelConfig, name: str) -> nn.Module:
  """LayerNorm (gpt2 family) or RMSNorm (llama family) over the last axis, named `name`."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
  common = dict(epsilon=config.norm_eps, dtype=dtype_of(config.dtype),
                param_dtype=dtype_of(config.param_dtype), scale_init=scale_init, name=name)
  if config.family == "llama":
    return norms.RMSNorm(**common)
  return norms.LayerNorm(use_bias=config.use_bias, bias_init=zeros_init(("embed",)), **common)


def _bf16_einsum(spec: str, a, b):
  return jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(spec: str, a, b):
  """einsum(spec, a, b) in float32 with both operands rounded to bfloat16, in the forward
  and the backward pass (products summed in float32).

  On CPUs with AMX (Intel Sapphire Rapids and later) XLA runs bfloat16 x bfloat16 ->
  float32 dots through its YNNPACK library at several times its float32 rate. Plain
  autodiff would multiply the float32 cotangent by the operands (float32 dots), so the
  backward pass is written out with the cotangent rounded to bfloat16 too. `spec` is a
  two-operand einsum ("ti,io->to") whose every index appears in at least two of its three
  terms (batch indices in all three).
  """
  _check_spec(spec)
  return _bf16_einsum(spec, a, b)


def _mixed_einsum_fwd(spec, a, b):
  _check_spec(spec)
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  # bfloat16 residuals (half the activation memory of float32 ones); the empty arrays
  # carry the operands' dtypes to the backward pass.
  return _bf16_einsum(spec, a16, b16), (a16, b16, jnp.zeros((0,), a.dtype),
                                        jnp.zeros((0,), b.dtype))


def _mixed_einsum_bwd(spec, residuals, g):
  a16, b16, a_kind, b_kind = residuals
  inputs, out = spec.split("->")
  a_idx, b_idx = inputs.split(",")
  g16 = g.astype(jnp.bfloat16)
  da = _bf16_einsum(f"{out},{b_idx}->{a_idx}", g16, b16)
  if _is_matmul(a_idx, b_idx, out) and jax.default_backend() == "cpu":
    # A Dense kernel's gradient a.T @ g [i, o], from a transposed copy of a: a bfloat16
    # dot XLA's CPU backend runs through YNNPACK (see _transposed_copy).
    db = jax.lax.dot_general(_transposed_copy(a16, anchor=b16), g16,  # [i, t] x [t, o]
                             (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  else:
    # This gradient contracts over the leading (token) axes, which XLA's CPU backend runs
    # in float32 anyway, and some such bfloat16 x bfloat16 -> float32 dots it cannot run at
    # all ("Unsupported element type for DotThunk"). Same products in float32: bfloat16 x
    # bfloat16 products are exact there.
    db = jnp.einsum(f"{a_idx},{out}->{b_idx}", a16.astype(jnp.float32),
                    g16.astype(jnp.float32))
  return da.astype(a_kind.dtype), db.astype(b_kind.dtype)


def _is_matmul(a_idx: str, b_idx: str, out: str) -> bool:
  """Whether the spec is a plain 2-D matrix product, "ti,io->to"."""
  return (len(a_idx) == len(b_idx) == 2 and a_idx[1] == b_idx[0]
          and out == a_idx[0] + b_idx[1])


def _transposed_copy(x, anchor):
  """x [n, m] -> x.T [m, n], written out as a row-major buffer of its own.

  XLA folds a plain transpose into the dot that reads it, and its CPU backend (jaxlib
  0.10) runs a dot that contracts its left operand's leading axis in float32 through
  Eigen: a shakespeare-CPU weight gradient [384, 512] x [384, 128] took 700-900 us on one
  Sapphire Rapids core, against 130-220 us as a bfloat16 YNNPACK dot reading this copy.
  A conditional's result is a buffer the simplifier cannot fold away. Its predicate,
  isnan(v) | ~isnan(v) for one element v of `anchor`, is always true (so the zeros are
  never returned) but XLA does not fold it; an `anchor` that every device holds whole
  (a kernel under data parallelism) keeps the predicate free of cross-device traffic.
  """
  n, m = x.shape
  v = anchor.reshape(-1)[0]
  return jax.lax.cond(jnp.isnan(v) | ~jnp.isnan(v), lambda: x.T,
                      lambda: jnp.zeros((m, n), x.dtype))


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def _check_spec(spec: str) -> None:
  """Raises unless mixed_einsum's written-out gradient holds for `spec`."""
  inputs, out = spec.split("->")
  terms = inputs.split(",") + [out]
  letters = "".join(terms)
  if len(terms) != 3 or any(len(set(t)) != len(t) for t in terms) or any(
      letters.count(c) < 2 for c in set(letters)):
    raise ValueError(f"mixed_einsum needs 'x,y->z' with every index in at least two of the "
                     f"three terms (none summed or broadcast within one); got {spec!r}")


def bf16_matmuls(config: ModelConfig) -> bool:
  """Whether matmuls run on bfloat16-rounded operands with float32 results (mixed_einsum):
  config.matmul_dtype "bfloat16" with float32 compute."""
  return config.matmul_dtype == "bfloat16" and jnp.dtype(config.dtype) == jnp.float32


def round_matmul_kernels(params, config: ModelConfig):
  """params with every Dense kernel rounded to bfloat16 once, when bf16_matmuls(config):
  the same numbers each matmul would round them to. A decode loop that closes over these
  stops converting every weight at every step."""
  if not bf16_matmuls(config):
    return params
  def cast(path, x):
    return x.astype(jnp.bfloat16) if getattr(path[-1], "key", None) == "kernel" else x
  return jax.tree_util.tree_map_with_path(cast, params)


class Dense(nn.Module):
  """x [..., *in_shape] -> [..., *out_shape] with kernel [*in_shape, *out_shape].

  Written out (rather than nn.DenseGeneral) so the kernel is created in its final shape:
  DenseGeneral builds a flat kernel and reshapes it, which clashes with logical-axis
  constraints under a mesh.

  When `config.lora` selects this module (by its path, see LoraConfig.is_target) it also
  holds lora_a [n_in, rank] and lora_b [rank, n_out] (n_* the flattened in/out sizes) and
  adds scaling * (dropout(x) @ lora_a) @ lora_b. lora_b starts at zero, so a fresh
  adapter leaves the output unchanged.
  """
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]  # logical names of the kernel's axes, in then out
  config: ModelConfig
  std: float
  use_bias: bool
  deterministic: bool = True  # only the LoRA dropout reads it

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kernel = self.param("kernel", normal_init(self.std, self.axes),
                        self.in_shape + self.out_shape, dtype_of(cfg.param_dtype))
    dtype = dtype_of(cfg.dtype)
    # As one 2-D matmul [tokens, in] @ [in, out]: XLA's CPU dot kernels are much faster on
    # these than on the equivalent multi-axis tensordot.
    n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
    lead = x.shape[:x.ndim - len(self.in_shape)]
    x2 = x.astype(dtype).reshape(-1, n_in)  # [tokens, n_in]
    if bf16_matmuls(cfg):
      out = mixed_einsum("ti,io->to", x2, kernel.reshape(n_in, n_out))  # f32 [tokens, n_out]
    else:
      out = x2 @ kernel.astype(dtype).reshape(n_in, n_out)  # [tokens, n_out]
    if cfg.lora is not None and cfg.lora.is_target(self.scope.path):
      out = out + self._lora(x2, n_in, n_out)
    if cfg.adalora is not None and cfg.adalora.is_target(self.scope.path):
      out = out + self._adalora(x2, n_in, n_out)
    out = out.reshape(lead + self.out_shape)
    if self.use_bias:
      bias = self.param("bias", zeros_init(self.axes[len(self.in_shape):]), self.out_shape,
                        dtype_of(cfg.param_dtype))
      out = out + bias.astype(dtype)
    return out

  def _lora(self, x2, n_in: int, n_out: int):  # x2: [tokens, n_in] -> [tokens, n_out]
    lora = self.config.lora
    # The flattened in (out) axis keeps the name of the kernel's first in (out) axis, so it
    # shards like the kernel; the small rank axis stays replicated (None).
    in_axis, out_axis = self.axes[0], self.axes[len(self.in_shape)]
    # PEFT's default init: kaiming-uniform a (bound 1/sqrt(n_in)), zero b.
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    param_dtype = dtype_of(self.config.param_dtype)
    a = self.param("lora_a", nn.with_logical_partitioning(a_init, (in_axis, None)),
                   (n_in, lora.rank), param_dtype)
    b = self.param("lora_b", zeros_init((None, out_axis)), (lora.rank, n_out), param_dtype)
    h = nn.Dropout(lora.dropout)(x2, deterministic=self.deterministic)
    h = (h @ a.astype(x2.dtype)) @ b.astype(x2.dtype)  # [tokens, n_out]
    return (lora.scaling * h).astype(x2.dtype)

  def _adalora(self, x2, n_in: int, n_out: int):  # x2: [tokens, n_in] -> [tokens, n_out]
    ada = self.config.adalora
    in_axis, out_axis = self.axes[0], self.axes[len(self.in_shape)]
    param_dtype = dtype_of(self.config.param_dtype)
    # PEFT's init: P and Q from N(0, 0.02), the singular values E at zero (so the update
    # starts at zero and P, Q get gradients once E moves).
    p = self.param("adalora_p", normal_init(0.02, (in_axis, None)), (n_in, ada.init_rank),
                   param_dtype)
    e = self.param("adalora_e", zeros_init((None,)), (ada.init_rank,), param_dtype)
    q = self.param("adalora_q", normal_init(0.02, (None, out_axis)), (ada.init_rank, n_out),
                   param_dtype)
    h = nn.Dropout(ada.dropout)(x2, deterministic=self.deterministic)
    h = ((h @ p.astype(x2.dtype)) * e.astype(x2.dtype)) @ q.astype(x2.dtype)  # [tokens, n_out]
    return (ada.scaling * h).astype(x2.dtype)


def dense(features, axes: tuple[str, ...], config: ModelConfig, std: float, name: str,
          use_bias: bool | None = None, deterministic: bool = True):
  """A Dense layer whose input axes are the leading names in `axes`, output `features`.

  The input sizes come from the config: `embed` is config.width, `heads`/`kv` the attention
  heads and head_dim, `mlp` the hidden width. `deterministic=False` turns on LoRA dropout.
  """
  out_shape = features if isinstance(features, tuple) else (features,)
  sizes = {"embed": config.width, "mlp": config.hidden_width, "heads": config.num_heads,
           "kv": config.head_dim}
  in_shape = tuple(sizes[a] for a in axes[:len(axes) - len(out_shape)])
  return Dense(in_shape, out_shape, axes, config, std,
               config.use_bias if use_bias is None else use_bias, deterministic, name=name)


_ACTIVATIONS = {"relu": nn.relu, "gelu": functools.partial(nn.gelu, approximate=True),
                "silu": nn.silu, "tanh": jnp.tanh}


class Adapter(nn.Module):
  """A bottleneck adapter's branch (config.adapter): up(act(down(h))), [.., embed] in and
  out; the caller adds it to h (sequential) or beside the sublayer (parallel)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h):  # [batch, length, embed]
    cfg = self.config
    adapter = cfg.adapter
    down = Dense((cfg.width,), (adapter.size,), ("embed", None), cfg, adapter.init_std,
                 use_bias=True, name="down")(h)  # [batch, length, size]
    up = Dense((adapter.size,), (cfg.width,), (None, "embed"), cfg, adapter.init_std,
               use_bias=True, name="up")(_ACTIVATIONS[adapter.activation](down))
    return up  # [batch, length, embed]


class Mlp(nn.Module):
  """GELU MLP (gpt2) or SwiGLU (llama)."""
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):  # [batch, length, embed]
    cfg = self.config
    hidden = cfg.hidden_width
    bias = cfg.has_mlp_bias
    det = self.deterministic
    if cfg.family == "llama":
      gate = dense(hidden, ("embed", "mlp"), cfg, cfg.init_std, "gate", bias, det)(x)
      up = dense(hidden, ("embed", "mlp"), cfg, cfg.init_std, "up", bias, det)(x)
      h = nn.silu(gate) * up  # [batch, length, mlp]
    else:
      h = dense(hidden, ("embed", "mlp"), cfg, cfg.init_std, "up", bias, det)(x)
      h = nn.gelu(h, approximate=True)  # [batch, length, mlp]
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    out = dense(cfg.width, ("mlp", "embed"), cfg, residual_std(cfg), "down", bias, det)(h)
    return nn.Dropout(cfg.dropout)(out, deterministic=self.deterministic)


def rotary_tables(positions, head_dim: int, theta: float):
  """cos/sin tables for rotary embeddings. positions: int [batch, length]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim/2]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
  """Rotates pairs (i, i + head_dim/2) of x: [batch, length, heads, head_dim].

  The half-split pairing is the Hugging Face Llama convention, so imported weights work
  without permuting q/k projections.
  """
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos = cos[:, :, None, :]  # [batch, length, 1, head_dim/2]
  sin = sin[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
