"""Config sections every experiment shares; experiment files (configs/*.py) override fields."""

import ml_collections
from ml_collections import config_dict

from decoder_jax import compile_cache
from decoder_jax.data.pipeline import default_data_config
from decoder_jax.errors import ConfigError
from decoder_jax.model.config import ModelConfig


def model_section(**fields) -> ml_collections.ConfigDict:
  """Every ModelConfig field (so --config.model.<typo> fails), with `fields` overriding."""
  values = ModelConfig().to_dict()
  values["vocab_size"] = config_dict.placeholder(int)  # None: taken from the tokenizer
  values["num_kv_heads"] = config_dict.placeholder(int)  # None: as many as query heads
  values["mlp_width"] = config_dict.placeholder(int)
  values["qkv_bias"] = config_dict.placeholder(bool)  # None: follows use_bias
  values["mlp_bias"] = config_dict.placeholder(bool)
  values["matmul_dtype"] = config_dict.placeholder(str)  # None: the compute dtype
  values.update(fields)
  return ml_collections.ConfigDict(values)


def train_section(**fields) -> ml_collections.ConfigDict:
  values = dict(
      num_steps=1000,
      stop_at_step=config_dict.placeholder(int),  # stop early (with a checkpoint) at this step, e.g. to test resume
      batch_size=32,
      grad_accum_steps=1,
      # Train steps per compiled call (a lax.scan over that many batches): the host
      # dispatches once per call. Must divide log_every, eval_every and checkpoint_every.
      steps_per_call=1,
      # Data-parallel meshes: sum the gradients across devices as one flat vector, one
      # all-reduce (XLA's CPU runtime pays a device rendezvous per array otherwise).
      flat_grad_allreduce=False,
      learning_rate=1e-3,
      # "cosine": linear warmup over warmup_steps, cosine decay to min_learning_rate at
      # decay_steps; "inverse_sqrt" (Vaswani et al.): linear warmup over warmup_steps, then
      # learning_rate * sqrt(warmup_steps / step) (min_learning_rate, decay_steps unused).
      schedule="cosine",
      min_learning_rate=1e-4,
      warmup_steps=100,
      decay_steps=config_dict.placeholder(int),  # None: num_steps
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip=1.0,
      # eps of the training loss's label smoothing: (1 - eps) * cross-entropy + eps * the
      # mean over the vocabulary of -log p. The eval loss stays plain cross-entropy.
      label_smoothing=0.0,
      log_every=50,
      eval_every=250,
      checkpoint_every=500,
      keep_checkpoints=3,
      async_checkpoints=True,
      # dtype of the frozen parameters (LoRA's base), e.g. "bfloat16"; None: param_dtype.
      frozen_dtype=config_dict.placeholder(str),
      # Tokens per chunk of the chunked LM loss (None: plain loss over full logits).
      loss_chunk_size=config_dict.placeholder(int),
      # Trace this many steps (from the third of the run) into WORKDIR/profile.
      profile_steps=config_dict.placeholder(int),
      # A nan or inf loss (or gradient): "stop" ends the run naming the step, its last
      # checkpoint from before it; "skip" leaves such steps' parameters unchanged
      # (optax.apply_if_finite) and stops after more than max_nonfinite_skips in a row.
      on_nonfinite="stop",
      max_nonfinite_skips=10,
  )
  values.update(fields)
  return ml_collections.ConfigDict(values)


def base_config(*, model, train, data_overrides=None, mesh=None, seed=1337):
  config = ml_collections.ConfigDict()
  config.seed = seed
  # Start from pretrained weights: "gguf:FILE", "hf:DIR", a converted DIR or a training
  # workdir. The architecture and tokenizer are then the source's (see train/init_from.py).
  config.init_from = config_dict.placeholder(str)
  # Compiled programs kept on disk for later runs (decoder_jax/compile_cache.py; the
  # launchers read it; "" turns it off, JAX_COMPILATION_CACHE_DIR overrides it).
  config.compilation_cache_dir = compile_cache.DEFAULT_DIR
  config.model = model
  config.train = train
  config.data = default_data_config()
  for key, value in (data_overrides or {}).items():
    config.data[key] = value
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1,
      # Split a CPU-only host into this many JAX devices (None: JAX's default, one).
      num_cpu_devices=config_dict.placeholder(int)))
  config.mesh.update(mesh or {})
  return config


FINETUNE_METHODS = ("full", "lora", "adalora", "adapter", "prompt", "prefix")
FINETUNE_ARGS = FINETUNE_METHODS + ("cpu",)


def parse_finetune_arg(arg: str | None) -> tuple[str, bool]:
  """"lora,cpu" -> ("lora", True). The method (one of FINETUNE_METHODS) is required."""
  parts = [p for p in (arg or "").split(",") if p]
  unknown = [p for p in parts if p not in FINETUNE_ARGS]
  methods = [p for p in parts if p in FINETUNE_METHODS]
  if unknown or len(methods) != 1 or len(parts) != len(set(parts)):
    raise ConfigError(f"config arg {arg!r}: give one of {', '.join(FINETUNE_METHODS)}, "
                      "optionally with cpu (e.g. ':lora' or ':prefix,cpu')")
  return methods[0], "cpu" in parts


def method_section(method: str, num_steps: int, lora_rank: int = 16,
                   lora_alpha: float = 32.0):
  """The model section field and its settings for a parameter-efficient `method`, sized
  alike: LoRA rank 16 on every attention and MLP projection (4.9M parameters on
  SmolLM2-135M); AdaLoRA from rank 24 down to an average of 16 (LoRA's budget at the
  end); adapters of width 64 after both sublayers (4.5M); 20 soft-prompt or prefix
  positions. AdaLoRA's schedule takes 10% of the steps before pruning and fixes the
  ranks for the last 20%."""
  targets = ("attn/.*", "mlp/.*")
  if method == "lora":
    return dict(rank=lora_rank, alpha=lora_alpha, dropout=0.05, targets=targets,
                rslora=False)
  if method == "adalora":
    return dict(init_rank=lora_rank * 3 // 2, target_rank=lora_rank, alpha=lora_alpha * 3 / 2,
                dropout=0.05, targets=targets, beta1=0.85, beta2=0.85,
                t_init=num_steps // 10, t_final=num_steps // 5,
                delta_t=max(1, num_steps // 30), orth_reg=0.1)
  if method == "adapter":
    return dict(size=64, activation="relu", where=("attn", "mlp"), placement="sequential",
                scale=1.0, init_std=1e-2)
  if method == "prompt":
    return dict(length=20, init="vocab", init_vocab=5000)
  if method == "prefix":
    return dict(length=20, reparam_hidden=512, init_vocab=5000)
  raise ConfigError(f"unknown fine-tuning method {method!r}; known: {FINETUNE_METHODS}")


# Peak learning rates of the methods (AdamW, no weight decay): full fine-tuning moves
# pretrained weights, so it is the smallest; a soft prompt is a few thousand numbers
# steering the whole model and takes the largest (PEFT's examples use 3e-2).
LEARNING_RATES = {"full": 2e-5, "lora": 5e-4, "adalora": 1e-3, "adapter": 1e-3,
                  "prompt": 3e-2, "prefix": 3e-4}


def finetune_config(*, method: str, cpu: bool, task, train, eval_section,
                    init_from: str = "fetch:smollm2-135m-instruct", lora_rank: int = 16,
                    lora_alpha: float = 32.0, seed: int = 0):
  """A fine-tuning experiment: pretrained weights (`init_from`), a task, full or one of
  the parameter-efficient methods (method_section).

  The model section only holds training choices (the architecture is the source's):
  float32 on CPU, bfloat16 compute on an accelerator; a parameter-efficient method
  keeps the frozen base in bfloat16 there.
  """
  model = model_section(
      dtype="float32" if cpu else "bfloat16", scan_layers=True,
      attention_impl="xla" if cpu else "auto")
  if method != "full":
    model[method] = ml_collections.ConfigDict(
        method_section(method, train.num_steps, lora_rank, lora_alpha))
    if not cpu:
      train.frozen_dtype = "bfloat16"
  config = base_config(model=model, train=train, seed=seed,
                       mesh=dict(num_cpu_devices=2) if cpu else None)
  config.init_from = init_from
  config.task = task
  config.eval = eval_section
  return config
