"""What every benchmark records about the machine it ran on: package versions, cores, CPU."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def matmul_features() -> str:
  """The CPU's matrix instruction sets that decide XLA's bfloat16 dot speed (Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return "unknown"
  wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
  return ", ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)


def busy_cpu_seconds():
  """Busy CPU seconds of the whole machine (all cores), or None off Linux."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
