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


def _targets_tuple(config, section: str) -> tuple[str, ...]:
  """config.targets as a tuple of valid regexes (a JSON list or one bare pattern too)."""
  targets = (config.targets,) if isinstance(config.targets, str) else tuple(config.targets)
  object.__setattr__(config, "targets", targets)
  if not targets:
    raise ConfigError(f"model.{section}.targets is empty: name at least one module pattern, "
                      f"e.g. {LORA_TARGETS} or ('query', 'value')")
  for pattern in targets:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError(f"model.{section}.targets: {pattern!r} is not a regex ({e})") from None
  return targets


def _positive_int(value, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _from_dict(cls, values: dict[str, Any], section: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f"unknown model.{section} field(s) {unknown}; known fields: "
                      f"{sorted(known)}")
  return cls(**values)


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
    _targets_tuple(self, "lora")  # a JSON list (or one bare pattern) becomes a tuple
    _positive_int(self.rank, "model.lora.rank")
    if not self.alpha > 0:
      raise ConfigError(f"model.lora.alpha must be positive, got {self.alpha}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")

  @property
  def scaling(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def is_target(self, path: tuple[str, ...]) -> bool:
    """Whether a Dense at module path `path` gets an adapter."""
    return any(pattern_selects(p, path) for p in self.targets)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "LoraConfig":
    return _from_dict(cls, values, "lora")


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig:
  """AdaLoRA (Zhang et al., 2023): each targeted Dense adds P diag(E) Q, P [n_in, r],
  E [r] (the "singular values", zero at init), Q [r, n_out], r = init_rank.

  Training prunes singular values by importance down to target_rank per module on
  average (a global budget of target_rank * modules), on the cubic schedule of the
  paper (eq. 12): the full budget for t_init steps, the cubic decrease until
  num_steps - t_final, the target budget (mask fixed) for the last t_final steps, the
  mask recomputed every delta_t steps. Importance is |w * grad| smoothed by EMA (beta1),
  times its EMA uncertainty (beta2). orth_reg weighs ||P^T P - I||^2 + ||Q Q^T - I||^2,
  averaged over the modules, in the training loss. peft/adalora.py holds the rest.
  """
  init_rank: int = 12
  target_rank: int = 8
  alpha: float = 32.0  # the update is scaled by alpha / init_rank
  dropout: float = 0.0
  targets: tuple[str, ...] = LORA_TARGETS
  beta1: float = 0.85
  beta2: float = 0.85
  t_init: int = 0
  t_final: int = 0
  delta_t: int = 10
  orth_reg: float = 0.1

  def __post_init__(self):
    _targets_tuple(self, "adalora")
    _positive_int(self.init_rank, "model.adalora.init_rank")
    _positive_int(self.target_rank, "model.adalora.target_rank")
    _positive_int(self.delta_t, "model.adalora.delta_t")
    if self.target_rank > self.init_rank:
      raise ConfigError(f"model.adalora.target_rank={self.target_rank} exceeds init_rank="
                        f"{self.init_rank}: pruning only lowers the rank")
    for name in ("beta1", "beta2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f"model.adalora.{name} must be in [0, 1), got {getattr(self, name)}")
    for name in ("t_init", "t_final"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"model.adalora.{name} must be an integer >= 0, got {value!r}")
    if not self.alpha > 0:
      raise ConfigError(f"model.adalora.alpha must be positive, got {self.alpha}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"model.adalora.dropout must be in [0, 1), got {self.dropout}")
    if not self.orth_reg >= 0:
      raise ConfigError(f"model.adalora.orth_reg must be >= 0, got {self.orth_reg}")

  @property
  def scaling(self) -> float:
    return self.alpha / self.init_rank

  def is_target(self, path: tuple[str, ...]) -> bool:
    return any(pattern_selects(p, path) for p in self.targets)


ADAPTER_ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
ADAPTER_PLACEMENTS = ("sequential", "parallel")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Bottleneck adapters: h + up(act(down(h))), down [embed, size], up [size, embed].

  "sequential" (Houlsby et al., 2019): on the output h of each sublayer named in
  `where` (attention, MLP), before the residual add. "parallel" (He et al., 2022): the
  adapter reads the sublayer's (normalised) input and its output, times `scale`, is
  added beside the sublayer's. Both kernels start from N(0, init_std) and the biases at
  zero, so a fresh adapter is near the identity (Houlsby's init), not exactly it.
  """
  size: int = 64
  activation: str = "relu"
  where: tuple[str, ...] = ("attn", "mlp")
  placement: str = "sequential"
  scale: float = 1.0  # the parallel adapter's output scale (He et al. use 4 on the MLP)
  init_std: float = 1e-2

  def __post_init__(self):
    where = (self.where,) if isinstance(self.where, str) else tuple(self.where)
    object.__setattr__(self, "where", where)
    _positive_int(self.size, "model.adapter.size")
    if self.activation not in ADAPTER_ACTIVATIONS:
      raise ConfigError(f"model.adapter.activation must be one of {ADAPTER_ACTIVATIONS}, "
                        f"got {self.activation!r}")
    if self.placement not in ADAPTER_PLACEMENTS:
      raise ConfigError(f"model.adapter.placement must be one of {ADAPTER_PLACEMENTS}, "
                        f"got {self.placement!r}")
    if not where or any(w not in ("attn", "mlp") for w in where):
      raise ConfigError(f"model.adapter.where must name 'attn' and/or 'mlp', got {where}")
    if not self.init_std >= 0 or not self.scale > 0:
      raise ConfigError("model.adapter.init_std must be >= 0 and model.adapter.scale > 0")


PROMPT_INITS = ("vocab", "random")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Prompt tuning (Lester et al., 2021): `length` trained embeddings read before the
  input, at positions 0..length-1 (the input's positions start at `length`).

  init "vocab": each starts as the embedding of a token drawn from the first
  `init_vocab` ids (done on the pretrained table, peft/prompt.py); "random": N(0, init_std).
  """
  length: int = 20
  init: str = "vocab"
  init_vocab: int = 5000

  def __post_init__(self):
    _positive_int(self.length, "model.prompt.length")
    _positive_int(self.init_vocab, "model.prompt.init_vocab")
    if self.init not in PROMPT_INITS:
      raise ConfigError(f"model.prompt.init must be one of {PROMPT_INITS}, got {self.init!r}")


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
  """Prefix tuning (Li and Liang, 2021): `length` trained keys and values per layer, seen
  by every query as if `length` tokens came before the input (which starts at position
  `length`).

  With `reparam_hidden` the prefix is kv + MLP(embedding) during training (an MLP with
  one tanh hidden layer of that width; its output layer starts at zero) and
  peft.prefix.fold computes it once afterwards, leaving `kv` alone (reparam_hidden
  None). kv starts as the keys and values the pretrained model computes for `length`
  real tokens (Li and Liang's initialisation from real-word activations).
  """
  length: int = 20
  reparam_hidden: Optional[int] = 512
  init_vocab: int = 5000  # the real tokens of the initialisation: drawn from these ids

  def __post_init__(self):
    _positive_int(self.length, "model.prefix.length")
    _positive_int(self.init_vocab, "model.prefix.init_vocab")
    if self.reparam_hidden is not None:
      _positive_int(self.reparam_hidden, "model.prefix.reparam_hidden")


# The parameter-efficient methods, each a ModelConfig field holding its config class.
PEFT_METHODS = {"lora": LoraConfig, "adalora": AdaLoraConfig, "adapter": AdapterConfig,
                "prompt": PromptConfig, "prefix": PrefixConfig}


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
  # Encoder-decoder (model/encoder_decoder.py): encoder_layers > 0 adds a bidirectional
  # encoder of that many blocks and cross-attention in each of the num_layers decoder
  # blocks; 0 is the decoder-only model.
  encoder_layers: int = 0
  # The original Transformer's post-norm blocks, norm(x + sublayer(x)), instead of
  # pre-norm x + sublayer(norm(x)) (encoder-decoder only).
  post_norm: bool = False
  # The encoder's own token table instead of sharing the decoder's (joint vocabulary).
  separate_source_embeddings: bool = False
  # Parameter-efficient fine-tuning (decoder_jax.peft), at most one of these; None: plain.
  lora: Optional[LoraConfig] = None  # low-rank adapters
  adalora: Optional[AdaLoraConfig] = None  # low-rank adapters with adaptive rank
  adapter: Optional[AdapterConfig] = None  # bottleneck adapters
  prompt: Optional[PromptConfig] = None  # soft prompt (prompt tuning)
  prefix: Optional[PrefixConfig] = None  # per-layer key/value prefix (prefix tuning)

  def __post_init__(self):
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    for name, cls in PEFT_METHODS.items():
      value = getattr(self, name)
      if isinstance(value, dict):  # from JSON / a ConfigDict section
        object.__setattr__(self, name, _from_dict(cls, value, name))
      elif value is not None and not isinstance(value, cls):
        raise ConfigError(f"model.{name} must be None, a {cls.__name__} or a dict, "
                          f"got {value!r}")
    methods = [name for name in PEFT_METHODS if getattr(self, name) is not None]
    if len(methods) > 1:
      raise ConfigError(f"model.{' and model.'.join(methods)} are set: choose one "
                        "parameter-efficient method")
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
    self._check_encoder_decoder(methods)

  def _check_encoder_decoder(self, methods) -> None:
    layers = self.encoder_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
      raise ConfigError(f"model.encoder_layers must be an integer >= 0, got {layers!r}")
    if not layers:
      if self.post_norm or self.separate_source_embeddings:
        raise ConfigError("model.post_norm and model.separate_source_embeddings are for "
                          "encoder-decoders: set model.encoder_layers > 0")
      return
    if methods:
      raise ConfigError(f"model.{methods[0]} is not supported on an encoder-decoder "
                        "(model.encoder_layers > 0) yet")
    if self.scan_layers:
      raise ConfigError("model.scan_layers is not supported on an encoder-decoder "
                        "(model.encoder_layers > 0) yet: set it False")

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

  @property
  def is_encoder_decoder(self) -> bool:
    return self.encoder_layers > 0

  @property
  def peft_method(self) -> Optional[str]:
    """The parameter-efficient method set ("lora", "adalora", ...), or None."""
    return next((name for name in PEFT_METHODS if getattr(self, name) is not None), None)

  @property
  def prefix_length(self) -> int:
    """Positions a soft prompt or a prefix takes before the input (0 without either)."""
    method = self.prompt or self.prefix
    return 0 if method is None else method.length

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


# ModelConfig fields a training run decides when it starts from a checkpoint
# (config.init_from); every other field is the checkpoint's architecture.
TRAINING_FIELDS = ("dtype", "param_dtype", "matmul_dtype", "attention_impl", "remat",
                   "scan_layers", "dropout", *PEFT_METHODS)


def with_training_choices(source: ModelConfig, model_section) -> ModelConfig:
  """`source`'s architecture with the training choices of `model_section` (a ConfigDict
  or dict holding at least TRAINING_FIELDS)."""
  choices = {name: model_section.get(name) for name in TRAINING_FIELDS}
  for name in PEFT_METHODS:
    if hasattr(choices[name], "to_dict"):  # a ConfigDict section
      choices[name] = choices[name].to_dict()
  return dataclasses.replace(source, **choices)
