"""The launch XLA flags: known to this jaxlib, never overriding the user's, switchable off."""

import os
import subprocess
import sys

from decoder_jax import xla_flags


def _runs_with(flags: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"],
                        env=env, capture_output=True, text=True, timeout=120, check=False)


def test_every_launch_flag_is_known_to_this_jaxlib():
  env = {"XLA_FLAGS": ""}
  added = xla_flags.apply_launch_flags(env)
  assert len(added) == len(xla_flags.GPU_FLAGS)
  assert _runs_with(env["XLA_FLAGS"]).returncode == 0
  # XLA refuses unknown flags at start-up, so the check above could have failed.
  bad = _runs_with(env["XLA_FLAGS"] + " --xla_gpu_no_such_flag=true")
  assert bad.returncode != 0 and "Unknown flag" in bad.stderr


def test_the_users_flags_win_and_the_launch_flags_can_be_switched_off():
  env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/x"}
  added = xla_flags.apply_launch_flags(env)
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in added
  assert env["XLA_FLAGS"].startswith("--xla_gpu_enable_latency_hiding_scheduler=false "
                                     "--xla_dump_to=/tmp/x ")
  assert env["XLA_FLAGS"].count("latency_hiding") == 1
  assert xla_flags.apply_launch_flags(env) == []  # a second call adds nothing
  off = {"XLA_FLAGS": "--xla_dump_to=/tmp/x", xla_flags.OPT_OUT: "0"}
  assert xla_flags.apply_launch_flags(off) == [] and off["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
