"""Entry point: python -m decoder_jax.train --config=configs/<exp>.py[:arg] --workdir=DIR

Overrides: --config.train.num_steps=100, --config.model.dropout=0.1, ...
"""

from absl import flags
from ml_collections import config_flags

from decoder_jax import cli, compile_cache, xla_flags
from decoder_jax.train.loop import train_and_evaluate
from decoder_jax.train.metrics import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the tokenizer go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  quiet_library_logs()
  xla_flags.apply_launch_flags()  # before JAX starts a backend (it reads XLA_FLAGS once)
  compile_cache.enable(_CONFIG.value.get("compilation_cache_dir"))
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if "eval/loss" in result:
    print(f"final eval/loss {result['eval/loss']:.4f}")


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
