"""ModelConfig: one frozen dataclass describing both decoder families.

`family="gpt2"` gives learned positions, LayerNorm and a GELU MLP; `family="llama"`
gives rotary positions, RMSNorm, a SwiGLU MLP and grouped-query attention. Every field
can be overridden, so hybrids (a GPT-2 with RoPE, say) are one keyword away.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

from decoder_jax.errors import ConfigError

FAMILIES = ("gpt2", "llama")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "einsum", "auto")
# What a block keeps for the backward pass: everything ("none", no recomputation), only
# matmul outputs without batch dimensions ("dots_saveable"), or nothing ("full").
REMAT_POLICIES = ("none", "dots_saveable", "full")
# Operand format of the projection and attention matmuls (None: the compute dtype).
MATMUL_DTYPES = (None, "bfloat16")


# Every attention and MLP projection (llama: query, key, value, out, gate, up, down; gpt2
# has no gate, so spelling the names out would fail check_targets there); not the lm_head.
LORA_TARGETS = ("attn/.*", "mlp/.*")


def pattern_selects(pattern: str, path: tuple[str, ...]) -> bool:
  """Whether regex `pattern` fullmatches some "/"-joined suffix of the module path."""
  return any(re.fullmatch(pattern, "/".join(path[i:])) for i in range(len(path)))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the Dense layers the `targets` patterns select.

  Defined here rather than in decoder_jax.peft so the model can read it without an import
  cycle. A Dense at module path ("block_3", "attn", "query") is a target when a pattern
  (a Python regex) fullmatches one of its suffixes "query", "attn/query" or
  "block_3/attn/query"; with scan_layers the path is ("blocks", "attn", "query").
  """
  rank: int
  alpha: float = 16.0
  dropout: float = 0.0  # on the adapter's input only, as in PEFT
  targets: tuple[str, ...] = LORA_TARGETS
  rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank

  def __post_init__(self):
    # A JSON list (or one bare pattern) becomes a tuple: the config must stay hashable.
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    object.__setattr__(self, "targets", targets)
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ConfigError(f"model.lora.rank must be an integer >= 1, got {self.rank!r}")
    if not self.alpha > 0:
      raise ConfigError(f"model.lora.alpha must be positive, got {self.alpha}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
    if not targets:
      raise ConfigError("model.lora.targets is empty: name at least one module pattern, "
                        f"e.g. {LORA_TARGETS} or ('query', 'value')")
    for pattern in targets:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        raise ConfigError(f"model.lora.targets: {pattern!r} is not a regex ({e})") from None

  @property
  def scaling(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def is_target(self, path: tuple[str, ...]) -> bool:
    """Whether a Dense at module path `path` gets an adapter."""
    return any(pattern_selects(p, path) for p in self.targets)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "LoraConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"unknown model.lora field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str = "gpt2"
  vocab_size: int = 50304
  num_layers: int = 12
  num_heads: int = 12
  num_kv_heads: Optional[int] = None  # None: as many as query heads (plain MHA)
  width: int = 768  # d_model
  mlp_width: Optional[int] = None  # None: 4*width (gpt2) or SwiGLU's 8/3*width rounded (llama)
  max_length: int = 1024  # context length; size of the learned position table
  use_bias: bool = True  # every bias not overridden below (attention out, LayerNorm, ...)
  # Per-projection overrides (None: follow use_bias): Qwen2 has q/k/v biases and no other;
  # Llama's attention_bias / mlp_bias switch attention and MLP biases separately.
  qkv_bias: Optional[bool] = None
  mlp_bias: Optional[bool] = None
  tie_embeddings: bool = True
  dropout: float = 0.0
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Number formats: parameters stay in param_dtype, matmuls run in dtype.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Operand format of the projection and (einsum) attention matmuls. None: dtype.
  # "bfloat16" with dtype "float32": operands rounded to bfloat16, products summed and
  # returned in float32, forward and backward (layers.mixed_einsum); XLA runs such dots
  # on the AMX units of recent Intel CPUs, several times faster than float32 ones.
  matmul_dtype: Optional[str] = None
  # "xla" | "cudnn": jax.nn.dot_product_attention's; "einsum": written out (model/attention.py);
  # "auto": cudnn on a GPU where it supports the inputs, else xla.
  attention_impl: str = "xla"
  # Recompute block activations in the backward pass: one of REMAT_POLICIES (True and
  # False, from older configs, mean "full" and "none").
  remat: str = "none"
  scan_layers: bool = False  # one lax.scan over stacked layer params (faster compiles)
  init_std: float = 0.02
  lora: Optional[LoraConfig] = None  # low-rank adapters (decoder_jax.peft); None: plain model

  def __post_init__(self):
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if isinstance(self.lora, dict):  # from JSON / a ConfigDict section
      object.__setattr__(self, "lora", LoraConfig.from_dict(self.lora))
    if self.lora is not None and not isinstance(self.lora, LoraConfig):
      raise ConfigError(f"model.lora must be None, a LoraConfig or a dict, got {self.lora!r}")
    if self.family not in FAMILIES:
      raise ConfigError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(
          f"model.attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, "
          f"got {self.attention_impl!r}")
    for name in ("vocab_size", "num_layers", "num_heads", "width", "max_length"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.width % self.num_heads:
      raise ConfigError(
          f"model.width ({self.width}) must be divisible by model.num_heads "
          f"({self.num_heads})")
    if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
      raise ConfigError(
          f"model.num_heads ({self.num_heads}) must be divisible by "
          f"model.num_kv_heads ({self.kv_heads})")
    if self.family == "llama" and self.head_dim % 2:
      raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise ConfigError(f"model.matmul_dtype must be one of {MATMUL_DTYPES}, "
                        f"got {self.matmul_dtype!r}")

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def hidden_width(self) -> int:
    if self.mlp_width is not None:
      return self.mlp_width
    if self.family == "gpt2":
      return 4 * self.width
    # SwiGLU keeps the parameter count of a 4x GELU MLP: 2/3 * 4 * width, rounded up to 64.
    return -(-int(8 * self.width / 3) // 64) * 64

  @property
  def has_qkv_bias(self) -> bool:
    return self.use_bias if self.qkv_bias is None else self.qkv_bias

  @property
  def has_mlp_bias(self) -> bool:
    return self.use_bias if self.mlp_bias is None else self.mlp_bias

  @property
  def use_rope(self) -> bool:
    return self.family == "llama"

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
    """Builds a config from a dict (a ConfigDict section), rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_PRESETS = {
    "gpt2-small": dict(family="gpt2", vocab_size=50304, num_layers=12, num_heads=12,
                       width=768, max_length=1024),
    "smollm2-135m": dict(family="llama", vocab_size=49152, num_layers=30, num_heads=9,
                         num_kv_heads=3, width=576, mlp_width=1536, max_length=8192,
                         use_bias=False, tie_embeddings=True, rope_theta=100000.0,
                         norm_eps=1e-5),
    "shakespeare-char-cpu": dict(family="gpt2", vocab_size=65, num_layers=4, num_heads=4,
                                 width=128, max_length=64, use_bias=False),
    "shakespeare-char": dict(family="gpt2", vocab_size=65, num_layers=6, num_heads=6,
                             width=384, max_length=256, use_bias=False, dropout=0.2),
}


def preset(name: str, **overrides) -> ModelConfig:
  """A named architecture, optionally with fields overridden."""
  if name not in _PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; known: {sorted(_PRESETS)}")
  return ModelConfig.from_dict({**_PRESETS[name], **overrides})
