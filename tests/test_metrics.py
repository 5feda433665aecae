"""Metric sinks: metrics.jsonl lines, TensorBoard events, and a start-up without torch."""

import json
import subprocess
import sys
import textwrap

import pytest

from decoder_jax.train.metrics import MetricWriter


def test_writer_keeps_one_line_per_step_across_a_resume(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 1.0 / step})
  writer.close()
  resumed = MetricWriter(str(tmp_path), resume_step=2)  # the run restarts from step 2
  resumed.write(3, {"train/loss": 0.25})
  resumed.close()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(m["step"], m["train/loss"]) for m in lines] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  """tensorboardX would import torch (seconds of start-up) when it is installed; the
  writer keeps it out, and torch stays importable afterwards."""
  pytest.importorskip("torch")
  script = textwrap.dedent(f"""
      import sys
      from decoder_jax.train.metrics import MetricWriter
      writer = MetricWriter({str(tmp_path)!r})
      writer.write(1, {{"train/loss": 2.0}})
      writer.close()
      print("torch loaded:", "torch" in sys.modules)
      import importlib.util
      print("torch importable:", importlib.util.find_spec("torch") is not None)
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True).stdout
  assert "torch loaded: False" in out
  assert "torch importable: True" in out
