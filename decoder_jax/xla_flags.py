"""XLA flags the launchers (train, the training benchmarks) add to XLA_FLAGS.

XLA reads XLA_FLAGS once, when JAX starts its first backend, so `apply_launch_flags` must
run before any JAX computation. The flags are GPU compiler options: the CPU backend
parses and ignores them, so they are set whatever the platform. A flag the user already
put in XLA_FLAGS keeps the user's value; DECODER_JAX_LAUNCH_FLAGS=0 adds none (for
before/after measurements).

Not yet measured on a GPU (no session has had one): each entry says why it is expected to
help; benchmarks/train_speed.py --no_launch_flags measures without them.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# name -> (value, why)
GPU_FLAGS: dict[str, tuple[str, str]] = {
    "xla_gpu_enable_latency_hiding_scheduler": (
        "true", "schedules all-gathers, reduce-scatters and all-reduces to overlap with "
        "compute instead of in program order (data-parallel and FSDP meshes)"),
    "xla_gpu_enable_while_loop_double_buffering": (
        "true", "with scan over layers, lets the next layer's collectives start while the "
        "current layer computes"),
    "xla_gpu_all_reduce_combine_threshold_bytes": (
        str(128 * 2**20), "gradient all-reduces merged into fewer, larger ones"),
    "xla_gpu_all_gather_combine_threshold_bytes": (
        str(128 * 2**20), "FSDP parameter all-gathers merged likewise"),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": (
        str(128 * 2**20), "FSDP gradient reduce-scatters merged likewise"),
}

OPT_OUT = "DECODER_JAX_LAUNCH_FLAGS"


def _names_in(flags: str) -> set[str]:
  return {f.lstrip("-").split("=", 1)[0] for f in flags.split() if f.startswith("--")}


def apply_launch_flags(environ: MutableMapping[str, str] | None = None) -> list[str]:
  """Appends GPU_FLAGS the user has not set to environ["XLA_FLAGS"]; returns those added."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return []
  current = environ.get("XLA_FLAGS", "")
  present = _names_in(current)
  added = [f"--{name}={value}" for name, (value, _) in GPU_FLAGS.items()
           if name not in present]
  if added:
    environ["XLA_FLAGS"] = " ".join([current.strip()] + added).strip()
  return added
