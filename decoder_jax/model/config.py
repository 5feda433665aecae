"""ModelConfig: one frozen dataclass describing both decoder families.

`family="gpt2"` gives learned positions, LayerNorm and a GELU MLP; `family="llama"`
gives rotary positions, RMSNorm, a SwiGLU MLP and grouped-query attention. Every field
can be overridden, so hybrids (a GPT-2 with RoPE, say) are one keyword away.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

FAMILIES = ("gpt2", "llama")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")


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
  attention_impl: str = "xla"  # passed to jax.nn.dot_product_attention ("auto": cudnn on GPU)
  remat: bool = False  # recompute each block's activations in the backward pass
  scan_layers: bool = False  # one lax.scan over stacked layer params (faster compiles)
  init_std: float = 0.02

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f"model.attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, "
          f"got {self.attention_impl!r}")
    for name in ("vocab_size", "num_layers", "num_heads", "width", "max_length"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.width % self.num_heads:
      raise ValueError(
          f"model.width ({self.width}) must be divisible by model.num_heads "
          f"({self.num_heads})")
    if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
      raise ValueError(
          f"model.num_heads ({self.num_heads}) must be divisible by "
          f"model.num_kv_heads ({self.kv_heads})")
    if self.family == "llama" and self.head_dim % 2:
      raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

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
      raise ValueError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
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
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(_PRESETS)}")
  return ModelConfig.from_dict({**_PRESETS[name], **overrides})
