"""Metric sinks: DIR/metrics.jsonl, TensorBoard event files, and console progress."""

from __future__ import annotations

import json
import logging as logging_std
import os
import time

from absl import logging


class MetricWriter:
  """Appends {"step": int, name: value, ...} lines to metrics.jsonl and TensorBoard.

  Only process 0 writes; every line is flushed so a crash loses nothing written.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # imported lazily: only the writing process needs it
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """Console line with steps/s, tokens/s and time remaining, measured between calls."""

  def __init__(self, total_steps: int, tokens_per_step: int, start_step: int):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def rates(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return {"train/steps_per_sec": steps_per_sec,
            "train/tokens_per_sec": steps_per_sec * self.tokens_per_step}

  def log(self, step: int, metrics: dict[str, float]) -> None:
    remaining = (self.total_steps - step) / max(metrics.get("train/steps_per_sec", 0.0), 1e-9)
    eta = time.strftime("%H:%M:%S", time.gmtime(min(remaining, 359999)))
    shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    logging.info("step %d/%d  %s  eta %s", step, self.total_steps, shown, eta)


class _DropLibraryInfo(logging_std.Filter):
  """Keeps warnings from libraries but drops their INFO chatter (orbax logs every file)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "decoder_jax" in record.pathname


def quiet_library_logs() -> None:
  """Console shows decoder_jax's progress lines; other libraries only when they warn."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
