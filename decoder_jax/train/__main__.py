"""Entry point: python -m decoder_jax.train --config=configs/<exp>.py[:arg] --workdir=DIR

Overrides: --config.train.num_steps=100, --config.model.dropout=0.1, ...

Several processes (launch/local.sh, launch/gpu_slurm.sbatch, launch/tpu_pod.sh) each run
this same command; `--distributed` (decoder_jax/distributed.py) joins them into one run.
"""

from absl import flags
from ml_collections import config_flags

from decoder_jax import cli, compile_cache, distributed, xla_flags
from decoder_jax.train.loop import train_and_evaluate
from decoder_jax.train.metrics import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the tokenizer go")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", distributed.MODES,
    "join the run's other processes with jax.distributed: auto (when the environment names "
    "a multi-process run: JAX_COORDINATOR_ADDRESS, Slurm or Open MPI with several tasks), "
    "on (always, with JAX's cluster detection), off")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  quiet_library_logs()
  xla_flags.apply_launch_flags()  # before JAX starts a backend (it reads XLA_FLAGS once)
  distributed.initialize(_DISTRIBUTED.value)  # before the backend too
  compile_cache.enable(_CONFIG.value.get("compilation_cache_dir"))
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if "eval/loss" in result:
    print(f"final eval/loss {result['eval/loss']:.4f}")


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
