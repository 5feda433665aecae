"""Character-level GPT on tiny shakespeare: nanoGPT's shakespeare-char recipes.

CPU recipe (arg `cpu`; nanoGPT's README CPU command: 4 layers, 4 heads, width 128,
context 64, batch 12, 2000 steps, dropout 0):

  python -m decoder_jax.train --config=configs/shakespeare_char.py:cpu --workdir=/tmp/shakespeare_cpu

  Expected: final eval/loss about 1.88 (nanoGPT: 1.886), about 47-50 s on 2 AMD EPYC cores,
  58-70 s on 2 Intel Sapphire Rapids ones (benchmarks/RESULTS.md).

GPU recipe (no arg; 6 layers, 6 heads, width 384, context 256, batch 64, dropout 0.2,
5000 steps, bfloat16 compute):

  python -m decoder_jax.train --config=configs/shakespeare_char.py --workdir=/tmp/shakespeare

  Expected: best eval/loss about 1.47 (nanoGPT: 1.4697).

Data: tiny shakespeare, bundled with the package (no download); `data.local_dir`
(default $DECODER_JAX_DATA) holding tiny_shakespeare/input.txt, or `data.path`, reads
another copy instead.
"""

from decoder_jax.train import config_sections as common


def get_config(arg: str | None = None):
  if arg not in (None, "", "cpu"):
    raise ValueError(f"unknown config arg {arg!r}; use ':cpu' or nothing")
  if arg == "cpu":
    # Written-out attention: its backward is cheaper on XLA's CPU backend (whole recipe
    # 139.9 -> 131.0 s on 2 cores, same loss). bfloat16 matmul operands, float32 sums and
    # everything else float32: AMX dots on recent Intel CPUs (the step ~0.7x; final loss
    # 1.8827 vs 1.8836). benchmarks/RESULTS.md.
    model = common.model_section(family="gpt2", num_layers=4, num_heads=4, width=128,
                                 max_length=64, use_bias=False, dropout=0.0,
                                 attention_impl="einsum", matmul_dtype="bfloat16")
    # Ten steps per compiled call: the host's dispatch of each step (~135 state arrays on
    # 2 devices) competed with the 2 cores' compute (step 28.5-29.5 -> 25.2-26.5 ms).
    # The gradients summed across the 2 devices as one flat vector (step 0.94x).
    train = common.train_section(num_steps=2000, batch_size=12, learning_rate=1e-3,
                                 min_learning_rate=1e-4, warmup_steps=100, log_every=100,
                                 eval_every=250, checkpoint_every=1000, steps_per_call=10,
                                 flat_grad_allreduce=True)
  else:
    model = common.model_section(family="gpt2", num_layers=6, num_heads=6, width=384,
                                 max_length=256, use_bias=False, dropout=0.2,
                                 dtype="bfloat16", attention_impl="auto")
    train = common.train_section(num_steps=5000, batch_size=64, learning_rate=1e-3,
                                 min_learning_rate=1e-4, warmup_steps=100, log_every=50,
                                 eval_every=250, checkpoint_every=1000)
  # On CPU, two JAX devices in a data-parallel mesh keep both cores of a 2-core machine busy.
  mesh = dict(num_cpu_devices=2) if arg == "cpu" else None
  return common.base_config(model=model, train=train, mesh=mesh,
                            data_overrides=dict(corpus="tiny_shakespeare", tokenizer="char"))
