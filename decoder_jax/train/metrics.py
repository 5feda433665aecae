"""Metric sinks: DIR/metrics.jsonl, TensorBoard event files, and console progress."""

from __future__ import annotations

import json
import logging as logging_std
import os
import sys
import time

from absl import logging


class MetricWriter:
  """Appends {"step": int, name: value, ...} lines to metrics.jsonl and TensorBoard.

  Only process 0 writes; every line is flushed so a crash loses nothing written. A run
  resumed from step N first drops lines after N (written by the interrupted run after its
  last checkpoint), so each step appears once.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step and os.path.exists(path):
        _drop_lines_after(path, resume_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step else None)

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


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported lazily (only the writing process needs it).

  tensorboardX imports torch when it is installed, only to accept torch tensors (which we
  never pass): 1.5-3.5 s of start-up on a 2-core machine. Unless torch is already loaded,
  `import torch` is made to fail for the duration of that import (a None entry in
  sys.modules), so tensorboardX takes its numpy-only path; torch stays importable after.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def _drop_lines_after(path: str, step: int) -> None:
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except ValueError:  # a line torn by a crash mid-write
        continue
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)  # atomic: a crash here leaves the old or the new file


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
    if record.getMessage().startswith("Using custom data configuration"):
      return False  # tfds, for every local corpus: our builders always have one
    if "/asyncio/" in record.pathname and "exception was never retrieved" in str(record.msg):
      return False  # at exit, for orbax's writes that failed (a full disk) and were reported
    if "/orbax/" in record.pathname and record.exc_info:
      # orbax's writer threads log a failed write (a full disk) with its traceback, then
      # the loop re-raises it as one `error:` line: their message line is enough.
      record.exc_info, record.exc_text = None, None
    return record.levelno >= logging_std.WARNING or "decoder_jax" in record.pathname


def _quiet_closed_loop(unraisable, default=sys.unraisablehook) -> None:
  # After a failed asynchronous checkpoint write, tensorstore's callbacks still try to wake
  # orbax's already closed asyncio loop; that is no news for the user.
  if "Event loop is closed" not in str(unraisable.exc_value):
    default(unraisable)


def quiet_library_logs() -> None:
  """Console shows decoder_jax's progress lines; other libraries only when they warn."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
  sys.unraisablehook = _quiet_closed_loop
